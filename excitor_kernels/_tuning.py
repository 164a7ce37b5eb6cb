"""The measured table behind ``backend="auto"``: which backend was fastest, per GPU and kind of call.

``python -m bench.tune`` times every backend that runs on the GPU it finds and writes ``auto_table.json``
beside this file (merged by GPU architecture). The file is absent until a GPU session has written it; no
number in it is ever estimated. Format (version 1)::

    {"format": 1,
     "gpus": {"sm_90": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.13.0", "triton": "3.9.0",
                        "date": "2026-11-22",
                        "entries": [{"op": "excitor", "mode": "training", "dtype": "bf16", "head_dim": 128,
                                     "gqa": 4, "seq": 4096,
                                     "ms": {"triton": 3.1, "sdpa": 2.4, "sdpa_concat": 2.9, "cuda": null}}]}}}

An entry is one (operator, inference or training, dtype, head dim, GQA ratio ``Hq / Hkv``, sequence length)
case with the median milliseconds of each backend (``null``: it could not run). A call is matched to the
entries of its GPU architecture, operator, mode and dtype, then to the nearest head dim, then the nearest GQA
ratio, then the nearest sequence length (``max(M, N)``), distances taken between base-2 logarithms.
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch

from ._validate import Problem

TABLE_PATH = Path(__file__).with_name("auto_table.json")
_TABLE_STR = str(TABLE_PATH)
FORMAT = 1
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def arch(device: torch.device) -> str:
    """``sm_<major><minor>`` of a CUDA device."""
    return _arch(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def case_of(op: str, p: Problem) -> dict:
    """The table's description of a call: the fields an entry is matched on."""
    return dict(op=op.split("_")[0],
                mode="training" if p.requires_grad else "inference", dtype=DTYPE_NAMES.get(p.dtype, str(p.dtype)),
                head_dim=p.head_dim, gqa=p.q_heads // p.kv_heads, seq=max(p.q_len, p.kv_len))


def _path() -> Path:
    return Path(os.environ.get("EXCITOR_AUTO_TABLE") or TABLE_PATH)


@functools.lru_cache(maxsize=4)
def _read(path: Path, mtime: float) -> dict:
    table = json.loads(path.read_text())
    if table.get("format") != FORMAT:
        raise ValueError(f"{path}: table format {table.get('format')!r}, this version reads {FORMAT}")
    return table


def load_file(path: Path) -> dict | None:
    """The table at ``path`` (re-read when the file changes), or None when there is none."""
    if not path.is_file():
        return None
    return _read(path, path.stat().st_mtime)


def load() -> dict | None:
    """The table ``backend="auto"`` reads: the shipped one, or ``EXCITOR_AUTO_TABLE``'s path when set."""
    return load_file(_path())


def _distance(a: int, b: int) -> float:
    return abs(math.log2(a) - math.log2(b))


def lookup(table: dict | None, gpu: str, case: dict) -> dict | None:
    """The entry of ``table`` nearest to ``case`` on GPU architecture ``gpu`` (None if the table has none)."""
    if table is None or gpu not in table.get("gpus", {}):
        return None
    same = [e for e in table["gpus"][gpu]["entries"]
            if (e["op"], e["mode"], e["dtype"]) == (case["op"], case["mode"], case["dtype"])]
    if not same:
        return None
    return min(same, key=lambda e: tuple(_distance(e[f], case[f]) for f in ("head_dim", "gqa", "seq")))


@torch.compiler.assume_constant_result
def measured_on(device_type: str, device_index: int) -> tuple:
    """``(gpu, measured)``: the architecture name (the device type off CUDA) and whether the current table has
    entries for it; a constant under ``torch.compile``, asked before :func:`nearest_times`, whose sizes may be
    symbolic in a graph of dynamic shapes."""
    gpu, path, mtime = _table_of(device_type, device_index)
    return gpu, mtime is not None and bool(_read(Path(path), mtime).get("gpus", {}).get(gpu, {}).get("entries"))


def _table_of(device_type: str, device_index: int) -> tuple:
    """(gpu, path, mtime) of the current table for a device (mtime None: no table)."""
    gpu = _arch(device_index) if device_type == "cuda" else device_type
    path = os.environ.get("EXCITOR_AUTO_TABLE") or _TABLE_STR
    try:
        return gpu, path, os.stat(path).st_mtime
    except FileNotFoundError:
        return gpu, path, None


@torch.compiler.assume_constant_result
def nearest_times(device_type: str, device_index: int, op: str, mode: str, dtype: str, head_dim: int, gqa: int,
                  seq: int) -> tuple:
    """``(gpu, entry)`` for a call: ``gpu`` the architecture name (the device type off CUDA) and ``entry`` the
    nearest entry of the current table as ``(head_dim, gqa, seq, ((backend, ms), ...))``, or None. A call costs
    one ``stat`` of the table; the search is cached per (table file and its mtime, gpu, case). Under
    ``torch.compile`` it runs once at trace time and its result is a constant (no file reads in the graph)."""
    gpu, path, mtime = _table_of(device_type, device_index)
    return gpu, None if mtime is None else _nearest(path, mtime, gpu, (op, mode, dtype, head_dim, gqa, seq))


@functools.lru_cache(maxsize=1024)
def _nearest(path: str, mtime: float, gpu: str, case: tuple) -> tuple | None:
    e = lookup(_read(Path(path), mtime), gpu, dict(zip(("op", "mode", "dtype", "head_dim", "gqa", "seq"), case)))
    if e is None:
        return None
    return (e["head_dim"], e["gqa"], e["seq"], tuple((n, ms) for n, ms in sorted(e["ms"].items()) if ms is not None))


def merge(table: dict | None, gpu: str, info: dict, entries: list) -> dict:
    """``table`` with ``entries`` of GPU ``gpu`` added (an entry of the same case is replaced)."""
    table = table or {"format": FORMAT, "gpus": {}}
    section = table["gpus"].setdefault(gpu, {"entries": []})
    section.update(info)
    fields = ("op", "mode", "dtype", "head_dim", "gqa", "seq")
    new = {tuple(e[f] for f in fields) for e in entries}
    section["entries"] = [e for e in section["entries"] if tuple(e[f] for f in fields) not in new] + list(entries)
    return table


def write(table: dict, path: Path | None = None) -> Path:
    path = path or _path()
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return path
