"""mllmrec.data: loading the MMRec atomic format and one-line errors for bad input."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest

from conftest import run_module, tiny_overrides
from mllmrec.data import TEST, TRAIN, VALID, flatten_categories, load_dataset
from mllmrec.errors import DataError

HEADER = "userID\titemID\tx_label\n"


def read_inter(path: Path) -> list[tuple[int, int, int]]:
    with open(path) as f:
        return [(int(r["userID"]), int(r["itemID"]), int(r["x_label"])) for r in csv.DictReader(f, delimiter="\t")]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def assert_data_error(excinfo, path: Path, column: str | None = None, line: int | None = None) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    if column is not None:
        assert f"column '{column}'" in msg, msg
    if line is not None:
        assert f"line {line}:" in msg, msg
    return msg


# ---------------------------------------------------------------- the tiny fixture
def test_tiny_counts_and_splits(tiny_data, tiny_dir):
    rows = read_inter(tiny_dir / "tiny.inter")
    d = tiny_data
    assert (d.n_users, d.n_items) == (40, 30)
    assert len(d.users) == len(rows) == 290
    for code in (TRAIN, VALID, TEST):
        assert int((d.split == code).sum()) == sum(1 for r in rows if r[2] == code)
    # MMRec split of users with < 10 interactions: exactly one valid and one test item each
    assert np.all(np.bincount(d.users[d.split == VALID], minlength=40) == 1)
    assert np.all(np.bincount(d.users[d.split == TEST], minlength=40) == 1)
    assert np.all(np.bincount(d.users, minlength=40) >= 5)
    assert d.train_matrix.shape == (40, 30) and d.train_matrix.nnz == int((d.split == TRAIN).sum())
    assert d.sources["duplicates_dropped"] == 0
    assert len(d.fingerprint) == 64
    assert "40 users, 30 items, 290 interactions" in d.summary()


def test_tiny_history_follows_file_order(tiny_data, tiny_dir):
    rows = read_inter(tiny_dir / "tiny.inter")
    train_hist, all_hist = tiny_data.history("train"), tiny_data.history("all")
    assert len(train_hist) == len(all_hist) == 40
    for u in range(40):
        assert train_hist[u].tolist() == [i for uu, i, s in rows if uu == u and s == TRAIN]
        assert all_hist[u].tolist() == [i for uu, i, _ in rows if uu == u]
    # the fixture is not sorted within users, so this really checks the order
    assert any(h.tolist() != sorted(h.tolist()) for h in train_hist)


def test_tiny_meta_text(tiny_data):
    meta = tiny_data.meta
    assert list(meta.columns) == ["title", "brand", "categories", "description"]
    assert len(meta) == 30
    # HTML entities unescaped
    assert meta.loc[12, "title"] == "Baby Bee Shampoo & Wash"
    assert meta.loc[12, "brand"] == "Burt's Bees"
    assert meta.loc[3, "description"] == "Leak proof valve & easy grip handles."
    assert meta.loc[17, "description"] == 'Natural goat hair brush "for cradle cap".'
    assert not meta.apply(lambda col: col.str.contains("&amp;|&quot;|&#39;")).any().any()
    # Python-literal lists of lists flattened (duplicates once, in order); plain strings kept
    assert meta.loc[1, "categories"] == "Baby, Feeding, Dishes"
    assert meta.loc[12, "categories"] == "Baby, Bathing & Skin Care, Gifts"
    assert meta.loc[0, "categories"] == "Baby, Feeding, Bottles"
    assert meta.loc[11, "brand"] == ""
    assert tiny_data.item_field("title")[0] == "Glass Baby Bottle 8oz"


def test_flatten_categories():
    assert flatten_categories("[['Baby', 'Feeding'], ['Baby', 'Gifts']]") == "Baby, Feeding, Gifts"
    assert flatten_categories("Baby, Feeding") == "Baby, Feeding"
    assert flatten_categories("[not a literal") == "[not a literal"


def test_interleaved_users_keep_file_order(tmp_path):
    write(tmp_path / "x.inter", HEADER + "1\t4\t0\n0\t3\t0\n1\t0\t0\n0\t1\t0\n0\t2\t1\n1\t2\t0\n")
    d = load_dataset("x", tmp_path)
    assert [h.tolist() for h in d.history("train")] == [[3, 1], [4, 0, 2]]
    assert [h.tolist() for h in d.history("all")] == [[3, 1, 2], [4, 0, 2]]
    assert d.meta is None and d.item_field("title") == [""] * 5


def test_timestamp_orders_history(tmp_path):
    write(
        tmp_path / "x.inter",
        "userID\titemID\tx_label\ttimestamp\n"
        "0\t1\t0\t300\n"
        "1\t0\t0\t20\n"
        "0\t2\t2\t400\n"
        "0\t3\t0\t100\n"
        "0\t4\t0\t200\n"
        "1\t1\t1\t10\n"
        "0\t0\t0\t200\n"  # same time as item 4: file order breaks the tie
        "1\t2\t0\t5\n",
    )
    d = load_dataset("x", tmp_path)
    assert d.history("train")[0].tolist() == [3, 4, 0, 1]
    assert d.history("all")[0].tolist() == [3, 4, 0, 1, 2]
    assert d.history("all")[1].tolist() == [2, 1, 0]
    assert d.history("train")[1].tolist() == [2, 0]


def test_gzip_files_are_found(tmp_path, tiny_dir):
    import gzip

    for name in ("tiny.inter", "meta-tiny.csv"):
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress((tiny_dir / name).read_bytes()))
    d = load_dataset("tiny", tmp_path)
    assert (d.n_users, d.n_items, len(d.users)) == (40, 30, 290)
    assert d.meta.loc[12, "title"] == "Baby Bee Shampoo & Wash"


def test_duplicates_collapsed_with_a_count(tmp_path, caplog):
    path = write(tmp_path / "x.inter", HEADER + "0\t1\t0\n0\t2\t0\n1\t0\t0\n0\t1\t1\n1\t2\t0\n1\t0\t2\n")
    with caplog.at_level(logging.WARNING, logger="mllmrec"):
        d = load_dataset("x", tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("2 duplicate" in w and str(path) in w for w in warnings), warnings
    assert len(d.users) == 4 and d.sources["duplicates_dropped"] == 2
    pairs = {(int(u), int(i)): int(s) for u, i, s in zip(d.users, d.items, d.split)}
    assert pairs == {(0, 1): VALID, (0, 2): TRAIN, (1, 0): TEST, (1, 2): TRAIN}  # the latest row wins


# ---------------------------------------------------------------- bad input
def test_missing_inter_file(tmp_path):
    with pytest.raises(DataError) as ei:
        load_dataset("nothere", tmp_path)
    msg = assert_data_error(ei, tmp_path / "nothere.inter")
    assert "not found" in msg


def test_empty_file(tmp_path):
    path = write(tmp_path / "x.inter", "")
    with pytest.raises(DataError) as ei:
        load_dataset("x", tmp_path)
    assert "empty" in assert_data_error(ei, path)


def test_header_only_file(tmp_path):
    path = write(tmp_path / "x.inter", HEADER)
    with pytest.raises(DataError) as ei:
        load_dataset("x", tmp_path)
    assert "no interactions" in assert_data_error(ei, path)


@pytest.mark.parametrize("missing", ["userID", "itemID", "x_label"])
def test_missing_required_column(tmp_path, missing):
    cols = [c for c in ("userID", "itemID", "x_label") if c != missing]
    path = write(tmp_path / "x.inter", "\t".join(cols) + "\n" + "\t".join(["0"] * len(cols)) + "\n")
    with pytest.raises(DataError) as ei:
        load_dataset("x", tmp_path)
    assert "missing" in assert_data_error(ei, path, column=missing)


@pytest.mark.parametrize(
    "column,row,value,line",
    [("itemID", 4, "abc", 6), ("userID", 0, "1.5", 2), ("itemID", 2, "", 4), ("x_label", 3, "train", 5)],
)
def test_non_integer_value(tmp_path, column, row, value, line):
    rows = [["0", "0", "0"], ["0", "1", "0"], ["1", "0", "0"], ["1", "2", "0"], ["2", "1", "0"]]
    rows[row][["userID", "itemID", "x_label"].index(column)] = value
    path = write(tmp_path / "x.inter", HEADER + "".join("\t".join(r) + "\n" for r in rows))
    with pytest.raises(DataError) as ei:
        load_dataset("x", tmp_path)
    msg = assert_data_error(ei, path, column=column, line=line)
    assert "non-integer" in msg and repr(value) in msg


@pytest.mark.parametrize("column", ["userID", "itemID"])
def test_negative_id(tmp_path, column):
    rows = [["0", "0", "0"], ["1", "1", "0"], ["2", "2", "0"]]
    rows[2][0 if column == "userID" else 1] = "-3"
    path = write(tmp_path / "x.inter", HEADER + "".join("\t".join(r) + "\n" for r in rows))
    with pytest.raises(DataError) as ei:
        load_dataset("x", tmp_path)
    assert "negative" in assert_data_error(ei, path, column=column, line=4)


def test_bad_x_label(tmp_path):
    path = write(tmp_path / "x.inter", HEADER + "0\t0\t0\n0\t1\t1\n1\t0\t3\n1\t1\t2\n")
    with pytest.raises(DataError) as ei:
        load_dataset("x", tmp_path)
    assert "got 3" in assert_data_error(ei, path, column="x_label", line=4)


def test_no_training_interactions(tmp_path):
    path = write(tmp_path / "x.inter", HEADER + "0\t0\t1\n0\t1\t2\n")
    with pytest.raises(DataError) as ei:
        load_dataset("x", tmp_path)
    assert_data_error(ei, path, column="x_label")


def test_row_with_too_many_fields(tmp_path):
    path = write(tmp_path / "x.inter", HEADER + "0\t0\t0\n0\t1\t0\t7\n1\t0\t0\n")
    with pytest.raises(DataError) as ei:
        load_dataset("x", tmp_path)
    assert "line 3" in assert_data_error(ei, path)


def test_meta_item_not_in_data(tiny_copy):
    meta = tiny_copy / "meta-tiny.csv"
    lines = meta.read_text().splitlines()
    lines.insert(3, '99,"Ghost Item",Nobody,"Baby",not in the interactions')  # becomes file line 4
    meta.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as ei:
        load_dataset("tiny", tiny_copy)
    msg = assert_data_error(ei, meta, column="itemID", line=4)
    assert "99" in msg


def test_meta_without_item_id_column(tiny_copy):
    meta = tiny_copy / "meta-tiny.csv"
    meta.write_text("title,brand\nA,B\n")
    with pytest.raises(DataError) as ei:
        load_dataset("tiny", tiny_copy)
    assert_data_error(ei, meta, column="itemID")


@pytest.mark.slow
def test_cli_reports_data_error_in_one_line(tmp_path, tiny_dir):
    broken = tmp_path / "broken"
    lines = (tiny_dir / "tiny.inter").read_text().splitlines()
    lines[7] = "3\tseven\t0"  # file line 8
    write(broken / "tiny.inter", "\n".join(lines) + "\n")
    out = tmp_path / "out"
    proc = run_module("mllmrec.train", *tiny_overrides(out, "trainer.max_epochs=1", data_dir=broken, run=out / "run"),
                      cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1, proc.stderr
    assert str(broken / "tiny.inter") in err_lines[0]
    assert "column 'itemID', line 8" in err_lines[0] and "'seven'" in err_lines[0]
    assert proc.stderr.strip().splitlines()[-1] == err_lines[0]  # the last thing said
    assert not (out / "cache").exists() or not any((out / "cache").rglob("manifest.json"))


def test_line_number_counts_blank_lines(tmp_path):
    path = write(tmp_path / "x.inter", HEADER + "0\t1\t0\n\n0\tx\t0\n")  # 'x' is on file line 4
    with pytest.raises(DataError) as ei:
        load_dataset("x", tmp_path)
    assert_data_error(ei, path, column="itemID", line=4)


def test_meta_line_number_counts_multiline_cells(tmp_path):
    write(tmp_path / "x.inter", HEADER + "0\t1\t0\n1\t0\t0\n")
    meta = write(tmp_path / "meta-x.csv", 'itemID,title,description\n0,a,"two\nlines"\n5,b,c\n')  # 5 on line 4
    with pytest.raises(DataError) as ei:
        load_dataset("x", tmp_path)
    assert_data_error(ei, meta, column="itemID", line=4)
