"""Train-step time, tokens/s and MFU: TiDAR's doubled-sequence objective vs the AR-only baseline at
the same seq_len, on one device.

    python -m benchmarks.train_step --models tiny,1p5b --seq-len 2048 --batch 2 \
        --out runs/bench/train.json --markdown BENCHMARKS.md
    python -m benchmarks.train_step --smoke

The step is the trainer's own (`tidar_jax.train_step.create_train_state` + `make_train_step`: AdamW,
clipping, the config's remat/attention/scan settings), jitted with the state donated, on random
tokens. Time = median wall time of single steps after two warm-up steps. MFU = model FLOPs
(6 x matmul params x tokens through the model, LM head included, + 12 x layers x heads x head_dim x
attended (query, key) pairs; no remat recompute) / step time / peak; the peak is the device's dense
bf16 datasheet figure (accelerators.ACCELERATORS: 989 TFLOP/s on an H100 SXM or H200) and the bf16
matmul rate measured in the same run is given too.
TiDAR feeds 2L tokens per row (clean + mask halves), AR feeds L.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

from benchmarks import common
from benchmarks.config_loader import apply_overrides, load_config
from tidar_jax import accelerators, flops


def build(name: str, *, seq_len: int, batch: int, objective: str, overrides: dict[str, Any]):
  """(model config, full ConfigDict) for one benchmark point. overrides: model fields by name, or
  any field dotted as on the command line ("train.loss_chunk"); None keeps the config's."""
  from tidar_jax.config import validate
  config = apply_overrides(load_config(name), {
      "train.seq_len": seq_len, "train.batch_size": batch, "train.grad_accum": 1, "tidar.objective": objective,
      **{(k if "." in k else f"model.{k}"): v for k, v in overrides.items() if v is not None}})
  return validate(config), config


# The last measured (key, jitted step, state, tokens): profile_step traces one more step of it
# without compiling again. Cleared before the next state is built (one state on the device).
LAST: dict[tuple, tuple] = {}


def run_key(name, seq_len, batch, objective, overrides) -> tuple:
  return (name, seq_len, batch, objective, tuple(sorted((k, v) for k, v in overrides.items() if v is not None)))


def setup(name: str, *, seq_len: int, batch: int, objective: str, overrides: dict[str, Any]):
  """(model_cfg, config, jitted train step, fresh state, tokens, init seconds)."""
  from tidar_jax.optimizer import make_optimizer
  from tidar_jax.train_step import create_train_state, make_train_step

  LAST.clear()
  model_cfg, config = build(name, seq_len=seq_len, batch=batch, objective=objective, overrides=overrides)
  tx = make_optimizer(config.train)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  t = time.perf_counter()
  state = jax.block_until_ready(create_train_state(model_cfg, tx, config.seed, sharding))
  init_s = time.perf_counter() - t
  step = jax.jit(make_train_step(model_cfg, config, tx, model_cfg.vocab_size - 1), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  tokens = jax.device_put(rng.integers(0, model_cfg.vocab_size - 2, (batch, seq_len)).astype(np.int32), sharding)
  return model_cfg, config, step, state, tokens, init_s


def measure(name: str, *, seq_len: int, batch: int, objective: str, steps: int, overrides: dict[str, Any],
            keep: bool = False) -> dict[str, Any]:
  model_cfg, config, step, state, tokens, init_s = setup(name, seq_len=seq_len, batch=batch, objective=objective,
                                                         overrides=overrides)
  t = time.perf_counter()
  state, metrics = step(state, tokens)
  jax.block_until_ready(metrics)
  first_s = time.perf_counter() - t
  state, metrics = step(state, tokens)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = step(state, tokens)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  loss = float(metrics["loss"])
  mem = common.memory_stats()
  if keep:
    LAST[run_key(name, seq_len, batch, objective, overrides)] = (step, state, tokens, model_cfg)
  del state
  med = statistics.median(times)
  peak = accelerators.bf16_peak_tflops(jax.devices()[0].device_kind)
  step_flops = flops.train_step_flops(model_cfg, batch, seq_len, objective, config.tidar.block_size)
  return {
      "model": name, "objective": objective, "seq_len": seq_len, "batch": batch,
      "block_size": config.tidar.block_size, "remat": model_cfg.remat, "attention": model_cfg.attention,
      "dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype, "scan_layers": model_cfg.scan_layers,
      "step_s": med, "step_s_all": times, "init_s": init_s, "first_step_s": first_s, "loss": loss,
      "clean_tokens_per_s": batch * seq_len / med, "model_tokens_per_s": step_flops["model_tokens"] / med,
      "model_tflop_per_step": step_flops["total"] / 1e12, "attention_tflop_per_step": step_flops["attention"] / 1e12,
      "achieved_tflops": step_flops["total"] / med / 1e12,
      "mfu_pct": None if peak is None else 100 * step_flops["total"] / med / (peak * 1e12),
      "memory_gib": mem,
  }


def _pct(x: float | None) -> str:
  return "n/a" if x is None else f"{x:.1f}%"


def _peak_words(meta: dict[str, Any]) -> str:
  peak = meta.get("peak_tflops", 989.0)  # results written before the table quoted the H100 SXM's
  if peak is None:
    return f"the device's bf16 peak (not in accelerators.ACCELERATORS for {meta.get('device', '?')}: no MFU)"
  return f"{peak:.0f} TFLOP/s ({meta.get('device', '?')} dense bf16 datasheet peak)"


def render(result: dict[str, Any]) -> str:
  meta = result["meta"]
  recs = result["records"]
  by = {(r["model"], r.get("seq_len"), r.get("batch"), r["objective"]): r for r in recs}
  rows = []
  for r in recs:
    if "step_s" not in r:
      rows.append([r["model"], r["objective"], r.get("seq_len"), r.get("batch"),
                   r.get("error", r.get("skipped", ""))[:80]]
                  + [None] * 7)
      continue
    ar = by.get((r["model"], r["seq_len"], r["batch"], "ar"))
    ratio = f"{r['step_s'] / ar['step_s']:.2f}" if (r["objective"] == "tidar" and ar and "step_s" in ar) else ""
    layers = "" if r.get("scan_layers", True) else "/unrolled"  # scanned: the default, left unsaid
    rows.append([r["model"], r["objective"], r["seq_len"], r["batch"], f"{r['remat']}/{r['attention']}{layers}",
                 round(r["step_s"] * 1e3, 1), round(r["clean_tokens_per_s"]), round(r["model_tokens_per_s"]),
                 round(r["model_tflop_per_step"], 2), round(r["achieved_tflops"], 1), _pct(r["mfu_pct"]), ratio,
                 round(r["memory_gib"].get("peak_bytes_in_use", float("nan")), 1)])
  table = common.md_table(["model", "objective", "seq_len", "batch", "remat/attention", "step ms",
                           "clean tok/s", "model tok/s", "model TFLOP/step", "TFLOP/s", "MFU", "TiDAR ÷ AR",
                           "process peak GiB so far"], rows)
  return common.section("train_step", meta, (
      f"One device, the trainer's jitted step (AdamW, state donated), random tokens, median of "
      f"{meta.get('steps', '?')} steps after 2 warm-up steps. MFU = model FLOPs (matmuls incl. LM head + "
      f"attended pairs, no remat recompute) ÷ {_peak_words(meta)}. TiDAR feeds 2 x seq_len tokens per row."), table)


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--models", default="tiny,1p5b")
  p.add_argument("--seq-len", default="", help="comma list per model (default: tiny 256, others 2048)")
  p.add_argument("--batch", default="", help="comma list per model (default: tiny 8, others 2)")
  p.add_argument("--objectives", default="ar,tidar")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--remat", default=None, help="override model.remat (none|full|dots)")
  p.add_argument("--attention", default=None, help="override model.attention (dense|cudnn|auto)")
  p.add_argument("--budget-s", type=float, default=0)
  p.add_argument("--no-ceilings", action="store_true")


def measure_from_args(args: argparse.Namespace) -> dict[str, Any]:
  if args.smoke:
    # TiDAR only: the AR objective is the same code path, and CI time is short.
    args.models, args.seq_len, args.batch, args.steps, args.objectives = "tiny", "32", "2", 1, "tidar"
  models = args.models.split(",")
  defaults = {"tiny": (256, 8)}
  seqs = [int(x) for x in args.seq_len.split(",")] if args.seq_len else [defaults.get(m, (2048, 2))[0] for m in models]
  batches = [int(x) for x in args.batch.split(",")] if args.batch else [defaults.get(m, (2048, 2))[1] for m in models]
  seqs += seqs[-1:] * (len(models) - len(seqs))
  batches += batches[-1:] * (len(models) - len(batches))
  meta = {**common.device_info(), "steps": args.steps}
  meta["peak_tflops"] = accelerators.bf16_peak_tflops(meta["device"])
  if not args.no_ceilings and not args.smoke:
    meta["matmul"] = common.matmul_rate()
  rec = common.Recorder(args.out, meta)
  run(rec, models=models, seqs=seqs, batches=batches, objectives=args.objectives.split(","), steps=args.steps,
      overrides={"remat": args.remat, "attention": args.attention, **args.config_overrides},
      deadline=common.Deadline(args.budget_s),
      keep_last=args.smoke)
  return rec.result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return common.cli(__doc__, add_args, measure_from_args, render, argv)


def run(rec: common.Recorder, *, models: list[str], seqs: list[int], batches: list[int], objectives: list[str],
        steps: int, overrides: dict[str, Any], deadline: common.Deadline, keep_last: bool = False) -> None:
  for name, seq_len, batch in zip(models, seqs, batches):
    for objective in objectives:
      label = {"model": name, "objective": objective, "seq_len": seq_len, "batch": batch}
      if deadline.spent():
        rec.add({**label, "skipped": "time budget"})
        continue
      try:
        r = measure(name, seq_len=seq_len, batch=batch, objective=objective, steps=steps, overrides=overrides,
                    keep=keep_last)
      except Exception as e:  # noqa: BLE001  (out of memory at too large a batch)
        err = f"{type(e).__name__}: {str(e)[:400]}"
        print(f"[train] {label} failed: {err[:300]}", flush=True)
        rec.add({**label, "error": err})
        if "RESOURCE_EXHAUSTED" in err or "out of memory" in err.lower():
          if batch > 1:  # halve the batch once
            batch //= 2
            label = {**label, "batch": batch}
            try:
              r = measure(name, seq_len=seq_len, batch=batch, objective=objective, steps=steps, overrides=overrides,
                          keep=keep_last)
              r["note"] = f"batch halved after: {err[:200]}"
              rec.add(r)
            except Exception as e3:  # noqa: BLE001
              rec.add({**label, "error": f"{type(e3).__name__}: {str(e3)[:400]}"})
          continue
        if overrides.get("attention") == "dense":
          continue
        overrides = {**overrides, "attention": "dense"}  # the cuDNN path is the GPU-only piece: retry dense
        try:
          r = measure(name, seq_len=seq_len, batch=batch, objective=objective, steps=steps, overrides=overrides,
                      keep=keep_last)
          r["fallback"] = f"attention=dense after: {err}"
        except Exception as e2:  # noqa: BLE001
          rec.add({**label, "error": f"dense retry: {type(e2).__name__}: {str(e2)[:400]}"})
          continue
      rec.add(r)
      print(f"[train] {name} {objective} L={seq_len} B={batch}: {r['step_s'] * 1e3:.1f} ms/step, "
            f"{r['clean_tokens_per_s']:,.0f} clean tok/s, {r['achieved_tflops']:.0f} TFLOP/s, "
            f"MFU {_pct(r['mfu_pct'])}, "
            f"first step {r['first_step_s']:.1f}s, "
            f"peak {r['memory_gib'].get('peak_bytes_in_use', float('nan')):.1f} GiB",
            flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
