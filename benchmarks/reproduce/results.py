"""The reproduction's files: DIR/<run>/result.json (written as a run goes), the trainer's
metrics.jsonl beside it, and DIR/RESULTS.md rendered from them."""

from __future__ import annotations

import glob
import json
import os
import time
import traceback
from typing import Any

from benchmarks import common
from tidar_jax import metrics

PROGRAM = "python -m benchmarks.reproduce"  # how the recorded command lines start
RESULT_FILE = "result.json"
RESULTS_MD = "RESULTS.md"
NOTES_MD = "NOTES.md"  # optional, hand-written: rendered into RESULTS.md


class RunResult(common.Recorder):
  """DIR/<run>/result.json (`.result`), rewritten atomically after every section."""

  def __init__(self, path: str, result: dict[str, Any]):
    super().__init__(path, meta=result.get("meta", {}))
    self.result = result
    self.flush()

  def error(self, where: str, e: BaseException) -> None:
    msg = f"{where}: {type(e).__name__}: {e}"
    self.result.setdefault("errors", []).append({"where": where, "error": msg[:2000],
                                                 "traceback": traceback.format_exc()[-4000:]})
    self.flush()
    log(f"ERROR in {where}: {msg[:500]}")


def log(msg: str) -> None:
  print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.jsonl")
  return metrics.read_jsonl(path) if os.path.exists(path) else []


def load_results(out_dir: str) -> list[dict[str, Any]]:
  """Every DIR/*/result.json (with "_dir", its folder), the AR baseline first, then by block size."""
  results = []
  for path in sorted(glob.glob(os.path.join(out_dir, "*", RESULT_FILE))):
    with open(path) as f:
      r = json.load(f)
    r["_dir"] = os.path.dirname(path)
    results.append(r)

  def order(r):
    return (0, 0) if r.get("objective") == "ar" else (1, r.get("block_size", 0))

  return sorted(results, key=order)


def lookup(d: Any, *path: str) -> Any:
  """d[path[0]][path[1]]... of a result, None where any part is absent."""
  for p in path:
    if not isinstance(d, dict) or p not in d:
      return None
    d = d[p]
  return d
