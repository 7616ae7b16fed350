"""Read an offline W&B run file (``run-*.wandb``) without a server: the LevelDB-style record log
that W&B writes (7-byte file header, 32 KiB blocks, records of checksum/length/type), each record
a ``wandb_internal_pb2.Record``."""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32768
FILE_HEADER = struct.Struct("<4sHB")
RECORD_HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, _magic, _version = FILE_HEADER.unpack_from(data, 0)
    assert ident == b":W&B", ident
    pos, pending = FILE_HEADER.size, b""
    while pos + RECORD_HEADER.size <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD_HEADER.size:
            pos += left_in_block
            continue
        _crc, length, kind = RECORD_HEADER.unpack_from(data, pos)
        pos += RECORD_HEADER.size
        chunk = data[pos : pos + length]
        pos += length
        if kind == FULL:
            payload = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            payload, pending = pending + chunk, b""
        else:  # zero padding at the end of the file
            break
        rec = pb.Record()
        rec.ParseFromString(payload)
        yield rec


def history_keys(path: Path) -> set[str]:
    keys = set()
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            for item in rec.history.item:
                keys.add(item.key or "/".join(item.nested_key))
    return keys


def summary_values(path: Path) -> dict:
    """The run summary (``run.summary``) as written to the file: key -> decoded JSON value, last write wins."""
    import json

    out = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "summary":
            for item in rec.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
