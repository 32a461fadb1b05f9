"""One run of the reproduction: its config (the base config with its objective and block size), its
training by the project's trainer under an optional time budget, then `evaluate` on the trained
weights, everything recorded in DIR/<run>/result.json as it happens."""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import threading
import time
from typing import Any, Sequence

from benchmarks import common
from benchmarks.reproduce.evaluate import evaluate_run
from benchmarks.reproduce.results import RESULT_FILE, RunResult, log, read_metrics
from tidar_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_RE = re.compile(r"^(ar|tidar)(\d*)$")


# ----------------------------------------------------------------------------------------------
# Runs and their configs


def parse_runs(runs: str, block_sizes: str, default_k: int) -> list[tuple[str, str, int]]:
  """(name, objective, block size) per run: "ar", "tidar" (the config's k), "tidar<k>"."""
  out: list[tuple[str, str, int]] = []
  names = [r.strip() for r in runs.split(",") if r.strip()]
  names += [f"tidar{k.strip()}" for k in block_sizes.split(",") if k.strip()]
  for name in names:
    m = RUN_RE.match(name)
    if not m or (m.group(1) == "ar" and m.group(2)) or (m.group(2) and int(m.group(2)) < 1):
      raise ValueError(f"--runs/--block-sizes: {name!r} is not a run name; use ar, tidar (the config's block "
                       "size) or tidar<k> with k >= 1 (e.g. tidar8)")
    if m.group(1) == "ar":
      run = ("ar", "ar", default_k)
    else:
      k = int(m.group(2)) if m.group(2) else default_k
      run = (f"tidar{k}", "tidar", k)
    if run[0] not in [r[0] for r in out]:
      out.append(run)
  if not out:
    raise ValueError("--runs is empty: name at least one of ar, tidar, tidar<k>")
  return out


def run_config(base, objective: str, block_size: int):
  config = copy.deepcopy(base)
  config.tidar.objective = objective
  config.tidar.block_size = block_size
  return config


def config_digest(config, sections: Sequence[str]) -> str:
  """Digest of the config sections that must match between compared runs (data, train, model)."""
  fields = {s: json.loads(config[s].to_json_best_effort()) for s in sections}
  return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def source_digest() -> str:
  """sha1 of the project's Python sources: identifies the code where no git checkout exists."""
  h = hashlib.sha1()
  for pattern in ("tidar_jax/**/*.py", "configs/*.py", "benchmarks/**/*.py"):
    for path in sorted(glob.glob(os.path.join(ROOT, pattern), recursive=True)):
      h.update(os.path.relpath(path, ROOT).encode())
      with open(path, "rb") as f:
        h.update(f.read())
  return h.hexdigest()[:12]


def git_commit() -> str | None:
  """HEAD (+ "-dirty" with local changes), or None without git (the device machine has no .git)."""
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    if head.returncode:
      return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return None


# ----------------------------------------------------------------------------------------------
# Training


class _BudgetWatcher:
  """Stops the trainer after `budget_s` seconds of its training loop, through its own SIGTERM path
  (checkpoint at the next step boundary, clean exit). The clock starts when the trainer installs its
  SIGTERM handler (data, tokenizer and state are ready; the first step's compilation counts)."""

  def __init__(self, budget_s: float | None):
    self.budget_s, self.fired, self.loop_started = budget_s, False, None
    self._stop = threading.Event()
    self._thread = None
    if budget_s:
      self._thread = threading.Thread(target=self._watch, daemon=True)
      self._thread.start()

  def _watch(self) -> None:
    while not self._stop.wait(0.25):
      if not isinstance(signal.getsignal(signal.SIGTERM), train._StopFlag):
        continue
      if self.loop_started is None:
        self.loop_started = time.monotonic()
      elif time.monotonic() - self.loop_started >= self.budget_s:
        self.fired = True
        log(f"training budget of {self.budget_s:.0f}s spent: stopping at the next step")
        os.kill(os.getpid(), signal.SIGTERM)
        return

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)


def train_summary(rows: list[dict[str, Any]], tokens_per_step: int) -> dict[str, Any]:
  """Loop time and steady-state speed from metrics.jsonl (the trainer's log lines)."""
  train_rows = [r for r in rows if "loss" in r and "tokens_per_s" in r]
  out: dict[str, Any] = {}
  start = [r for r in rows if r.get("step") == 0]
  if train_rows and start:
    out["loop_s"] = train_rows[-1]["time"] - start[-1]["time"]  # first step's compile and evals included
  rates = [r["tokens_per_s"] for r in train_rows[1:]]  # the first window holds the compilation
  if rates:
    out["steady_tokens_per_s"] = statistics.median(rates)
    out["steady_step_s"] = tokens_per_step / out["steady_tokens_per_s"]
  if train_rows:
    out["final_train_loss"] = train_rows[-1]["loss"]
    out["final_train_ar_loss"] = train_rows[-1].get("ar_loss")
    if "diffusion_loss" in train_rows[-1]:
      out["final_train_diffusion_loss"] = train_rows[-1]["diffusion_loss"]
  return out


def train_run(config, workdir: str, budget_s: float | None) -> tuple[Any, dict[str, Any]]:
  """(params, training record) from the project's trainer; resumes an existing workdir."""
  watcher = _BudgetWatcher(budget_s)
  t = time.perf_counter()
  try:
    out = train.train_and_evaluate(config, workdir)
  finally:
    watcher.close()
  wall = time.perf_counter() - t
  step = int(out["step"])
  tokens_per_step = config.train.batch_size * config.train.seq_len
  record = {
      "steps": step, "planned_steps": config.train.steps, "tokens_seen": step * tokens_per_step,
      "planned_tokens": config.train.steps * tokens_per_step, "tokens_per_step": tokens_per_step,
      "model_tokens_per_step": tokens_per_step * (2 if config.tidar.objective == "tidar" else 1),
      "wall_s": wall, "stopped_by_budget": watcher.fired, "budget_s": budget_s,
      "first_eval": out.get("first_eval"), "last_eval": out.get("last_eval"),
  }
  record.update(train_summary(read_metrics(workdir), tokens_per_step))
  return out["state"]["params"], record


# ----------------------------------------------------------------------------------------------
# One run


def do_run(name: str, objective: str, k: int, base_config, args, command: str, meta: dict[str, Any],
           deadline: common.Deadline) -> dict[str, Any]:
  """Trains run `name` (`command`: the command line that asked for it, recorded), evaluates it,
  and returns its result.json content."""
  config = run_config(base_config, objective, k)
  run_dir = os.path.join(args.out_dir, name)
  workdir = os.path.join(args.workdir_root, name) if args.workdir_root else run_dir
  if args.fresh:
    for d in {run_dir, workdir}:
      shutil.rmtree(d, ignore_errors=True)
  os.makedirs(run_dir, exist_ok=True)
  rec = RunResult(os.path.join(run_dir, RESULT_FILE), {
      "run": name, "objective": objective, "block_size": k, "meta": meta, "command": command,
      "config_path": args.config, "workdir": workdir,
      "compare_digest": config_digest(config, ("data", "train", "model")),
      "config": json.loads(config.to_json_best_effort()), "status": "training",
  })
  log(f"run {name}: objective={objective} k={k}, {config.train.steps} steps x {config.train.batch_size} x "
      f"{config.train.seq_len} tokens, workdir {workdir}")

  budget = args.budget_s or None
  if args.deadline_s:  # leave time for the evaluation
    left = deadline.left() - args.eval_reserve_s
    budget = min(budget or left, left)
    if budget <= 0:
      rec.set("status", "skipped: no time left for training")
      return rec.result
  try:
    params, train_rec = train_run(config, workdir, budget)
  except Exception as e:  # noqa: BLE001
    rec.error("train", e)
    rec.set("status", "failed in training")
    return rec.result
  rec.set("train", train_rec)
  if workdir != run_dir and os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    shutil.copy(os.path.join(workdir, "metrics.jsonl"), os.path.join(run_dir, "metrics.jsonl"))
  log(f"trained {name}: {train_rec['steps']} steps, {train_rec['tokens_seen']:,} tokens in {train_rec['wall_s']:.0f}s"
      + (f" (steady {train_rec['steady_tokens_per_s']:,.0f} tok/s)" if "steady_tokens_per_s" in train_rec else "")
      + (" - STOPPED BY THE TIME BUDGET" if train_rec["stopped_by_budget"] else ""))
  rec.set("status", "evaluating")
  mem = common.memory_stats()
  if mem:
    rec.set("memory_gib_after_training", mem)
  evaluate_run(rec, params, config, args, deadline)
  mem = common.memory_stats()
  if mem:
    rec.set("memory_gib_end", mem)
  rec.set("status", "done" if not rec.result.get("errors") else "done with errors")
  if not args.keep_checkpoints:
    shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
  return rec.result
