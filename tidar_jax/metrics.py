"""Metrics sinks: one JSON object per line in `workdir/metrics.jsonl` plus TensorBoard scalars.

Only process 0 writes (`enabled=False` elsewhere), so multi-host runs keep one log. A resumed run
first drops the lines past the step it resumed from (`keep_through`), so metrics.jsonl tells one
history however often the run was killed; TensorBoard keeps its events (it shows the overlap).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import numpy as np


class MetricsWriter:

  def __init__(self, workdir: str, enabled: bool = True, keep_through: int = -1):
    """keep_through: the step the run resumes from; the lines of later steps are dropped (-1: a fresh
    run, which drops them all)."""
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    _truncate_after(path, keep_through)
    self._jsonl = open(path, "a")
    from tensorboardX import SummaryWriter  # local: only process 0 pays for the import

    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")
    self._jsonl.flush()
    for k, v in values.items():
      self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _truncate_after(path: str, step: int) -> None:
  """Rewrites `path` without the records of steps after `step` (and a torn last line of a killed run)."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError):  # the line a kill cut short
        continue
  with open(path + ".tmp", "w") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)  # atomic: a kill now leaves the old file or the new one
