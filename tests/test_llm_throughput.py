"""``python -m mllmrec.llm.throughput``'s parts that need no engine: the official client's loop
(``sequential``) against the stub server, the rows (ratio to sequential, texts compared user by
user), the variants' overrides and the output file (fast; the real run is in docs/llm.md)."""

from __future__ import annotations

import csv
import json

import pytest

from llm_fakes import StubServer
from mllmrec.errors import ConfigError
from mllmrec.llm import throughput
from mllmrec.llm.backends import Request


def test_sequential_sends_one_request_at_a_time_and_rewrites_the_csv_every_10(tmp_path):
    reqs = [Request(i, f"prompt {i}") for i in range(12)]
    sampling = {"temperature": 1.0, "top_p": 0.95, "top_k": 64, "max_tokens": 96, "seed": 0}
    with StubServer(delay=0.01) as server:
        row = throughput.sequential(server.url, "m", reqs, sampling, tmp_path / "prefs.csv", load_s=1.0)
    assert server.max_in_flight == 1 and len(server.requests) == 12
    assert server.requests[0]["body"] == {"model": "m", "messages": reqs[0].messages(), **sampling}
    assert row["mode"] == "sequential" and row["requests"] == 12 and row["requests_per_s"] > 0
    assert sorted(row["_texts"]) == list(range(12)) and all(t.startswith("The user likes") for t in row["_texts"].values())
    with open(tmp_path / "prefs.csv") as f:
        assert [int(r["userID"]) for r in csv.DictReader(f)] == list(range(12))


def _row(mode, rps, texts, **extra):
    return throughput._row(mode, 4, 4 / rps, 40, 20, 1.0, texts, **extra)


def test_rows_get_the_ratio_to_sequential_and_whether_every_text_is_the_same(tmp_path):
    same = {0: "a", 1: "b"}
    rows = [_row("sequential", 0.5, dict(same)), _row("offline", 3.0, dict(same), variant="default"),
            _row("served", 1.0, {0: "a", 1: "other"}, concurrency=8)]
    out = throughput.finish(rows, 0.25, 2, tmp_path / "office", tmp_path / "model")
    assert [r["ratio_to_sequential"] for r in out] == [1.0, 6.0, 2.0]
    assert [r["texts_identical"] for r in out] == [True, True, False] and out[2]["texts_differing"] == 1
    assert all("_texts" not in r for r in out) and out[1]["variant"] == "default" and out[2]["concurrency"] == 8
    throughput.write(out, tmp_path / "t.json")
    assert [(r["mode"], r["requests_per_s"]) for r in json.loads((tmp_path / "t.json").read_text())] == [
        ("sequential", 0.5), ("offline", 3.0), ("served", 1.0)]
    throughput.write(out, tmp_path / "t.csv")
    with open(tmp_path / "t.csv") as f:
        assert [r["mode"] for r in csv.DictReader(f)] == ["sequential", "offline", "served"]
    assert "| offline |  | default |" in throughput.table(out)


def test_variants_become_overrides_and_bad_ones_are_one_line():
    assert throughput.parse_variant("big:max_num_seqs=64,chunk_size=200") == (
        "big", ["++llm.engine_extra.max_num_seqs=64", "llm.chunk_size=200"])
    for bad in ("nolabel", ":x=1", "l:x"):
        with pytest.raises(ConfigError, match="--variant"):
            throughput.parse_variant(bad)
