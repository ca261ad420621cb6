"""Read what an offline wandb run recorded (``<run dir>/wandb/offline-run-*/run-<id>.wandb``), without a network.

The file is wandb's transaction log: a 7-byte header (``:W&B``, magic, version), then LevelDB-log records in
32 KiB blocks (7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST), each payload a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list:
    """Every record of a ``.wandb`` file, in order."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, payload, out = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            out.append(pb.Record.FromString(payload))
            payload = b""
    return out


def offline_runs(run_dir: str | Path) -> list[Path]:
    """The offline run folders under ``run_dir/wandb`` (one per wandb.init), oldest first."""
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*"))


def summarize(run_folder: str | Path) -> dict:
    """What one offline run recorded: id, group, name, exit code, history keys, the final summary and the config
    (summary and config values as their JSON text)."""
    (log,) = Path(run_folder).glob("run-*.wandb")
    out = {"id": None, "group": None, "name": None, "exit_code": None, "history_keys": set(), "summary": {}}
    out["config"] = {}
    for rec in read_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(id=rec.run.run_id, group=rec.run.run_group, name=rec.run.display_name)
        elif kind == "history":
            out["history_keys"] |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = item.value_json
        elif kind == "config":
            for item in rec.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = item.value_json
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out
