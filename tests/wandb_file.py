"""Read the records of a wandb offline run file (`offline-run-*/run-*.wandb`) without a network or wandb's
internal reader (wandb >= 0.20 keeps it in its Go core): the file is wandb's 7-byte header, then a LevelDB log
(32 KiB blocks of chunks: crc32, length, type) whose payloads are `wandb_internal_pb2.Record` messages."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7  # b":W&B" + magic (2 bytes) + version (1 byte)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    out, pos, pending = [], HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


def summary(path: Path) -> dict:
    """The run's config `experiment`, and every logged history row (key -> value)."""
    cfg, history = {}, []
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            cfg = {i.key: json.loads(i.value_json) for i in rec.run.config.update}
        elif kind == "history":
            history.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            )
    return {"config": cfg, "history": history}
