"""Raw Amazon 2014 files -> MMRec format (mllmrec.prepare, python -m stages.prepare)."""

from __future__ import annotations

import gzip
import json
import logging
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_module
from mllmrec.data import load_dataset
from mllmrec.errors import ConfigError, DataError
from mllmrec.prepare import collapse_duplicates, kcore_mask, prepare, read_reviews, split_labels

# ---------------------------------------------------------------- raw fixture
#
# Users U00..U09 review items I00..I(4+u) (5..14 reviews). Items I10..I13 have fewer than 5
# reviewers, so the 5-core drops them; user UZZ (I00..I03 + I13) then has 4 reviews left and is
# dropped in the next pass (a removal that triggers another). UYY/Q99 is a lone review.
# Duplicates (appended last): U03/I02 three times, the latest by time is not the last line;
# U04/I01 twice with the same time, so the last line wins.
N_CORE_USERS = 10
KEPT_ITEMS = [f"I{i:02d}" for i in range(10)]
KEPT_USERS = [f"U{u:02d}" for u in range(N_CORE_USERS)]


def _review(user, item, rating, stamp):
    return json.dumps(
        {"reviewerID": user, "asin": item, "reviewerName": "X", "helpful": [0, 0], "reviewText": "ok",
         "overall": rating, "summary": "s", "unixReviewTime": stamp, "reviewTime": "01 1, 2014"}
    )


def review_lines() -> list[str]:
    lines = []
    for u in range(N_CORE_USERS):
        for i in range(5 + u):
            if (u, i) in ((3, 2), (4, 1)):
                continue
            lines.append(_review(f"U{u:02d}", f"I{i:02d}", float(1 + (u + i) % 5), 1_300_000_000 + 1000 * u + 10 * i))
    lines += [_review("UZZ", f"I{i:02d}", 5.0, 1_400_000_000 + i) for i in (0, 1, 2, 3, 13)]
    lines.append(_review("UYY", "Q99", 3.0, 1_400_000_000))
    random.Random(7).shuffle(lines)  # first appearance order != sorted order
    lines += [
        _review("U03", "I02", 2.0, 1_300_009_000),  # the latest
        _review("U03", "I02", 4.0, 1_300_001_000),
        _review("U04", "I01", 3.0, 1_300_005_000),
        _review("U04", "I01", 5.0, 1_300_005_000),  # same time, last in file
    ]
    return lines


MALFORMED_REVIEW = '{"reviewerID": "U01", "asin": '  # truncated JSON


def meta_lines() -> list[str]:
    """Python-literal metadata; I05 has none, line 4 is malformed, I13 is an item the k-core drops."""
    recs = []
    for i in range(14):
        if i == 5:
            continue
        rec = {"asin": f"I{i:02d}", "title": f"Item {i}", "price": 3.17, "imUrl": f"http://img/{i}.jpg",
               "related": {"also_bought": ["I01"]}, "salesRank": {"Baby": 1000 + i},
               "categories": [["Baby", "Feeding"]]}
        recs.append(repr(rec))
    recs[1] = repr({"asin": "I01", "title": "Baby Bee Shampoo &amp; Wash", "brand": "Burt&#39;s Bees",
                    "description": "A 5&quot; bottle.\nTear free.", "imUrl": "http://img/1.jpg",
                    "categories": [["Baby", "Bathing &amp; Skin Care"], ["Baby", "Gifts"]]})
    recs[2] = repr({"asin": "I02", "title": "Mom's Bottle", "categories": [["Baby"]]})  # a "..." string literal
    recs[6] = json.dumps({"asin": "I07", "title": "Json Item", "brand": None, "categories": [["Baby"]]})
    recs.insert(3, "{'asin': 'I04', 'title': 'Broken")  # file line 4: unterminated literal
    return recs


META_BAD_LINE = 4


def write_raw(folder: Path, compress: bool, reviews=None, meta=None, extra_review_lines=()) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    r_text = "\n".join((reviews or review_lines()) + list(extra_review_lines)) + "\n"
    m_text = "\n".join(meta or meta_lines()) + "\n"
    suffix = ".json.gz" if compress else ".json"
    r_path, m_path = folder / f"reviews_Toy{suffix}", folder / f"meta_Toy{suffix}"
    for path, text in ((r_path, r_text), (m_path, m_text)):
        if compress:
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            path.write_text(text, encoding="utf-8")
    return r_path, m_path


def read_inter(dest: Path, name: str = "toy") -> pd.DataFrame:
    return pd.read_csv(dest / f"{name}.inter", sep="\t")


@pytest.fixture(params=[True, False], ids=["gz", "plain"])
def prepared(request, tmp_path):
    r, m = write_raw(tmp_path / "raw", request.param)
    dest = tmp_path / "data" / "toy"
    report = prepare("toy", r, m, dest, progress=False)
    return dest, report, r, m


# ---------------------------------------------------------------- k-core
def test_kcore_cascade_unit():
    pairs = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2),  # a 2-core block
             (2, 3), (2, 4),  # i3 is alone -> u2 drops to 1 -> i4 drops to 1
             (3, 4), (3, 5), (3, 6), (4, 5), (4, 6)]  # u3 keeps i5, i6
    u, i = (np.array(x) for x in zip(*pairs))
    mask, passes = kcore_mask(u, i, 2)
    kept = {p for p, m in zip(pairs, mask) if m}
    assert kept == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (3, 5), (3, 6), (4, 5), (4, 6)}
    assert passes >= 4  # i3, then u2, then i4 removed in turn, then a pass that confirms
    # every kept user and item has >= k interactions; nothing removed could be added back
    assert np.bincount(u[mask]).max() >= 2 and (np.bincount(u[mask])[np.unique(u[mask])] >= 2).all()
    assert (np.bincount(i[mask])[np.unique(i[mask])] >= 2).all()


def test_kcore_cascade_and_contiguous_sorted_ids(prepared):
    dest, report, _, _ = prepared
    inter = read_inter(dest)
    imap = pd.read_csv(dest / "i_id_mapping.csv", sep="\t", dtype={"asin": str})
    umap = pd.read_csv(dest / "u_id_mapping.csv", sep="\t", dtype={"user_id": str})
    assert list(imap.columns) == ["asin", "itemID"] and list(umap.columns) == ["user_id", "userID"]
    assert imap["asin"].tolist() == KEPT_ITEMS  # I10..I13, Q99 dropped; sorted asin -> 0..n-1
    assert umap["user_id"].tolist() == KEPT_USERS  # UZZ dropped by the cascade, UYY alone
    assert imap["itemID"].tolist() == list(range(10)) and umap["userID"].tolist() == list(range(10))
    assert sorted(inter["itemID"].unique()) == list(range(10))
    assert sorted(inter["userID"].unique()) == list(range(10))
    assert (inter.groupby("userID").size() >= 5).all() and (inter.groupby("itemID").size() >= 5).all()
    assert report["users"] == 10 and report["items"] == 10
    assert report["before_kcore"] == {"users": 12, "items": 15, "interactions": len(review_lines()) - 2}
    assert report["kcore_passes"] >= 3
    # user u keeps items I00..I(min(4+u, 9))
    counts = inter.groupby("userID").size().tolist()
    assert counts == [min(5 + u, 10) for u in range(10)]
    assert report["interactions"] == len(inter) == sum(counts)
    assert report["sparsity"] == pytest.approx(1 - len(inter) / 100)


def test_duplicates_collapse_to_latest_and_rating_timestamp_kept(prepared):
    dest, report, _, _ = prepared
    inter = read_inter(dest)
    assert list(inter.columns) == ["userID", "itemID", "rating", "timestamp", "x_label"]
    assert report["duplicates_collapsed"] == 2
    assert not inter.duplicated(["userID", "itemID"]).any()
    row = inter[(inter.userID == 3) & (inter.itemID == 2)]
    assert row[["rating", "timestamp"]].values.tolist() == [[2.0, 1_300_009_000]]  # the latest time
    row = inter[(inter.userID == 4) & (inter.itemID == 1)]
    assert row[["rating", "timestamp"]].values.tolist() == [[5.0, 1_300_005_000]]  # tie: last line
    row = inter[(inter.userID == 7) & (inter.itemID == 6)]
    assert row[["rating", "timestamp"]].values.tolist() == [[float(1 + 13 % 5), 1_300_007_060]]


def test_collapse_duplicates_unit(tmp_path):
    r, _ = write_raw(tmp_path, False)
    raw = read_reviews(r, progress=False)
    dedup, n = collapse_duplicates(raw)
    assert n == 2 and len(dedup) == len(raw) - 2
    u3, i2 = raw.user_ids.index("U03"), raw.item_ids.index("I02")
    sel = (dedup.users == u3) & (dedup.items == i2)
    assert dedup.times[sel].tolist() == [1_300_009_000] and dedup.ratings[sel].tolist() == [2.0]
    # survivors stay in file order: the rows before the duplicates are untouched
    assert np.array_equal(dedup.times[: len(raw) - 4], raw.times[: len(raw) - 4])


# ---------------------------------------------------------------- split
@pytest.mark.parametrize("rule", ["random", "chronological"])
def test_split_counts_per_user(rule):
    sizes = [3, 5, 9, 10, 14, 25, 50, 51]
    users = np.repeat(np.arange(len(sizes)), sizes)
    times = np.random.default_rng(0).integers(0, 10**6, len(users))
    labels = split_labels(users, times, rule=rule, seed=5)
    for u, n in enumerate(sizes):
        lab = labels[users == u]
        held = 2 if n < 10 else int(0.2 * n)
        expected = (n - held, held // 2, held - held // 2)
        assert tuple(int((lab == c).sum()) for c in (0, 1, 2)) == expected, (rule, n)
    assert tuple(int((labels[users == 6] == c).sum()) for c in (0, 1, 2)) == (40, 5, 5)
    assert tuple(int((labels[users == 5] == c).sum()) for c in (0, 1, 2)) == (20, 2, 3)


def test_split_random_is_seeded_and_chronological_holds_out_the_latest():
    sizes = [5, 8, 12, 30, 40]
    users = np.repeat(np.arange(len(sizes)), sizes)
    times = np.arange(len(users))[::-1].copy()  # later rows are older
    a = split_labels(users, times, rule="random", seed=1)
    assert np.array_equal(a, split_labels(users, times, rule="random", seed=1))
    assert not np.array_equal(a, split_labels(users, times, rule="random", seed=2))
    chrono = split_labels(users, times, rule="chronological", seed=1)
    assert np.array_equal(chrono, split_labels(users, times, rule="chronological", seed=2))  # seed-free
    for u in range(len(sizes)):
        sel = users == u
        t, lab = times[sel], chrono[sel]
        assert t[lab == 0].max() < t[lab == 1].min() and t[lab == 1].max() < t[lab == 2].min()
    with pytest.raises(ConfigError, match="prepare.split"):
        split_labels(users, times, rule="leave-one-out")


def test_split_options_end_to_end(tmp_path):
    r, m = write_raw(tmp_path / "raw", True)
    reports = {}
    for tag, kwargs in {"a": dict(seed=3), "b": dict(seed=3), "c": dict(seed=4),
                        "chrono": dict(split="chronological")}.items():
        reports[tag] = prepare("toy", r, m, tmp_path / tag / "toy", progress=False, **kwargs)
    files = {t: (tmp_path / t / "toy" / "toy.inter").read_bytes() for t in reports}
    assert files["a"] == files["b"] and files["a"] != files["c"]
    inter = read_inter(tmp_path / "chrono" / "toy")
    for _, g in inter.groupby("userID"):
        assert g.loc[g.x_label == 0, "timestamp"].max() <= g.loc[g.x_label != 0, "timestamp"].min()
    for rep in reports.values():
        n = [min(5 + u, 10) for u in range(10)]
        assert rep["split_counts"] == {"train": sum(n) - 20, "valid": 10, "test": 10}


# ---------------------------------------------------------------- metadata
def test_metadata_text_unescaped_missing_and_malformed(prepared, caplog):
    dest, report, _, m = prepared
    meta = pd.read_csv(dest / "meta-toy.csv", dtype=str, keep_default_na=False)
    assert list(meta.columns) == ["itemID", "asin", "title", "brand", "categories", "description", "imUrl"]
    assert meta["asin"].tolist() == KEPT_ITEMS and meta["itemID"].tolist() == [str(i) for i in range(10)]
    i1 = meta.iloc[1]
    assert i1.title == "Baby Bee Shampoo & Wash" and i1.brand == "Burt's Bees"
    assert i1.categories == "Baby, Bathing & Skin Care, Gifts"
    assert i1.description == 'A 5" bottle. Tear free.' and i1.imUrl == "http://img/1.jpg"
    assert meta.iloc[2].title == "Mom's Bottle"
    assert meta.iloc[4].title == "Item 4"  # its malformed line was skipped, the good one kept
    assert meta.iloc[7].title == "Json Item" and meta.iloc[7].brand == ""  # a strict-JSON line also parses
    assert (meta.iloc[5][["title", "brand", "categories", "description", "imUrl"]] == "").all()  # no metadata
    assert meta.iloc[5].asin == "I05"
    assert report["items_without_meta"] == 1
    assert report["meta_malformed_lines"] == 1 and report["meta_malformed_first_lines"] == [META_BAD_LINE]
    assert report["meta_lines_of_dropped_items"] == 4  # I10..I13, never parsed
    on_disk = json.loads((dest / "prepare_report.json").read_text())
    assert on_disk["items_without_meta"] == 1 and on_disk["users"] == 10


def test_malformed_lines_warn_with_line_number_or_fail_when_strict(tmp_path, caplog):
    r, m = write_raw(tmp_path / "raw", True, extra_review_lines=[MALFORMED_REVIEW, "[1, 2]"])
    n_reviews = len(review_lines())
    with caplog.at_level(logging.WARNING, logger="mllmrec.prepare"):
        report = prepare("toy", r, m, tmp_path / "out" / "toy", progress=False)
    text = "\n".join(rec.getMessage() for rec in caplog.records)
    assert f"{m}: line {META_BAD_LINE}: malformed metadata line" in text
    assert f"{r}: line {n_reviews + 1}: malformed review line" in text
    assert f"{r}: line {n_reviews + 2}: malformed review line" in text
    assert report["review_malformed_lines"] == 2 and report["meta_malformed_lines"] == 1
    assert report["users"] == 10

    with pytest.raises(DataError) as ei:
        prepare("toy", r, m, tmp_path / "strict" / "toy", strict=True, progress=False)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{r}: line {n_reviews + 1}: malformed review line")
    assert not (tmp_path / "strict").exists() or not any((tmp_path / "strict").iterdir())

    r2, m2 = write_raw(tmp_path / "raw2", False)
    with pytest.raises(DataError) as ei:
        prepare("toy", r2, m2, tmp_path / "strict2" / "toy", strict=True, progress=False)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{m2}: line {META_BAD_LINE}: malformed metadata line")
    parent = tmp_path / "strict2"
    assert not parent.exists() or not any(parent.iterdir())  # no half-written folder, no temp left


def test_without_meta_and_no_eval(tmp_path):
    r, _ = write_raw(tmp_path / "raw", False)
    evil = tmp_path / "raw" / "meta_evil.json"
    marker = tmp_path / "pwned"
    evil.write_text(f"__import__('pathlib').Path({str(marker)!r}).touch()\n" + "\n".join(meta_lines()) + "\n")
    report = prepare("toy", r, evil, tmp_path / "out" / "toy", progress=False)
    assert not marker.exists() and report["meta_malformed_lines"] == 2
    report = prepare("toy", r, None, tmp_path / "nometa" / "toy", progress=False)
    assert not (tmp_path / "nometa" / "toy" / "meta-toy.csv").exists()
    assert report["items_without_meta"] == 10


# ---------------------------------------------------------------- output folder
def test_output_loads_with_load_dataset(prepared):
    dest, report, _, _ = prepared
    data = load_dataset("toy", dest)
    assert (data.n_users, data.n_items) == (10, 10)
    assert len(data.users) == report["interactions"]
    assert data.meta is not None and data.meta.loc[1, "title"] == "Baby Bee Shampoo & Wash"
    assert data.meta.loc[1, "categories"] == "Baby, Bathing & Skin Care, Gifts"
    assert int((data.split == 1).sum()) == 10 and int((data.split == 2).sum()) == 10


def test_refuses_to_overwrite_and_replaces_atomically(tmp_path):
    r, m = write_raw(tmp_path / "raw", False)
    dest = tmp_path / "data" / "toy"
    dest.mkdir(parents=True)  # an empty folder is fine
    prepare("toy", r, m, dest, progress=False)
    before = (dest / "toy.inter").read_bytes()
    with pytest.raises(ConfigError, match="prepare.overwrite"):
        prepare("toy", r, m, dest, seed=1, progress=False)
    assert (dest / "toy.inter").read_bytes() == before
    (dest / "stale.txt").write_text("old")
    prepare("toy", r, m, dest, seed=1, overwrite=True, progress=False)
    assert not (dest / "stale.txt").exists() and (dest / "toy.inter").read_bytes() != before
    assert sorted(p.name for p in dest.parent.iterdir()) == ["toy"]  # no temp or backup folder left


def test_bad_inputs_are_one_line_errors(tmp_path):
    r, m = write_raw(tmp_path / "raw", False)
    with pytest.raises(DataError, match="reviews file not found"):
        prepare("toy", tmp_path / "nope.json.gz", m, tmp_path / "o" / "toy", progress=False)
    with pytest.raises(DataError, match="metadata file not found"):
        prepare("toy", r, tmp_path / "nope.json.gz", tmp_path / "o" / "toy", progress=False)
    with pytest.raises(ConfigError, match="prepare.k"):
        prepare("toy", r, m, tmp_path / "o" / "toy", k=0, progress=False)
    with pytest.raises(DataError, match="no interactions left after the 50-core"):
        prepare("toy", r, m, tmp_path / "o" / "toy", k=50, progress=False)
    trunc = tmp_path / "trunc.json.gz"
    trunc.write_bytes(gzip.compress(("\n".join(review_lines()) + "\n").encode())[:-40])
    with pytest.raises(DataError, match="cannot be read"):
        prepare("toy", trunc, m, tmp_path / "o" / "toy", progress=False)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


# ---------------------------------------------------------------- config and CLI
def test_dataset_configs_find_prepared_folders(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from mllmrec.config import CONF_DIR

    monkeypatch.setenv("MLLMREC_DATA_ROOT", str(tmp_path / "root"))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["dataset=sports"])
        assert cfg.dataset.data_dir == f"{tmp_path / 'root'}/sports"
        assert cfg.prepare.output_dir == cfg.dataset.data_dir and cfg.prepare.seed == cfg.seed
        cfg = compose("train", overrides=["dataset=baby", f"paths.data_dir={tmp_path}"])
        assert cfg.dataset.data_dir == f"{tmp_path}/baby"
        cfg = compose("train", overrides=["dataset=clothing", "dataset.data_dir=/mmrec/clothing"])
        assert cfg.dataset.data_dir == "/mmrec/clothing"
        cfg = compose("train")
        assert cfg.dataset.name == "office" and Path(cfg.dataset.data_dir).name == "office"


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    r, m = write_raw(tmp_path / "raw", True)
    args = ["dataset=baby", f"prepare.reviews={r}", f"prepare.meta={m}", f"paths.data_dir={tmp_path / 'data'}",
            f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_module("stages.prepare", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dest = tmp_path / "data" / "baby"
    assert {p.name for p in dest.iterdir()} == {
        "baby.inter", "meta-baby.csv", "i_id_mapping.csv", "u_id_mapping.csv", "prepare_report.json"}
    assert "10 users, 10 items" in proc.stdout and "python -m mllmrec.train dataset=baby" in proc.stdout
    assert json.loads((dest / "prepare_report.json").read_text())["settings"]["seed"] == 999
    assert load_dataset("baby", dest).n_items == 10

    again = run_module("stages.prepare", *args, cwd=tmp_path)  # refuses to overwrite
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0
    assert again.stderr.startswith("error: config 'prepare.overwrite'") and "Traceback" not in again.stderr


@pytest.mark.slow
def test_cli_missing_reviews_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "reviews_Nope.json.gz"
    proc = run_module("stages.prepare", "dataset.name=nope", f"prepare.reviews={missing}",
                      f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert str(missing) in proc.stderr and "not found" in proc.stderr
    assert not (tmp_path / "data").exists()
