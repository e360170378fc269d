"""Read an offline W&B run back from its `run-*.wandb` file, for tests.

wandb 0.31 ships no reader. The file is a LevelDB-style log: a 7-byte file header (`:W&B`, a
2-byte magic, a version byte), then 32 KiB blocks of chunks, each with a 7-byte header (CRC-32 of
type and payload, payload length, type: full, first, middle or last piece of a record). A chunk
never straddles blocks; a block tail too short for a header is padding. Each reassembled record
is a serialized `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import zlib
from typing import Any

from wandb.proto.wandb_internal_pb2 import Record

BLOCK = 32 * 1024
HEADER = struct.Struct("<IHB")  # crc32, length, chunk type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str) -> list[Record]:
    """Every record of a `run-*.wandb` file, in write order; checks the file header and each CRC."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run log")
    records, pieces, pos = [], [], 7
    while pos + HEADER.size <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER.size:
            pos += left_in_block
            continue
        crc, length, kind = HEADER.unpack_from(data, pos)
        payload = data[pos + HEADER.size : pos + HEADER.size + length]
        pos += HEADER.size + length
        if kind == 0:  # zero padding at the end of the last block
            break
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        pieces.append(payload)
        if kind in (FULL, LAST):
            record = Record()
            record.ParseFromString(b"".join(pieces))
            records.append(record)
            pieces = []
    return records


def run_file(save_dir: str) -> str:
    """The one `run-*.wandb` file an offline run wrote under `save_dir`."""
    (path,) = glob.glob(os.path.join(save_dir, "wandb", "offline-run-*", "run-*.wandb"))
    return path


def history(records: list[Record]) -> list[dict[str, Any]]:
    """The logged rows, as `{key: value}` with JSON-decoded values (a table is a dict of its fields)."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            if item.key:
                row[item.key] = json.loads(item.value_json)
            else:  # a nested value such as a logged table: nested_key is its path
                *parents, leaf = item.nested_key
                node = row
                for parent in parents:
                    node = node.setdefault(parent, {})
                node[leaf] = json.loads(item.value_json)
        rows.append(row)
    return rows
