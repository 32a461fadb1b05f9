"""T/NFE against tokens trained: TiDAR's greedy tokens per forward on HumanEval prompts at every
checkpoint a training run kept, beside the run's validation losses at those steps.

    python -m benchmarks.acceptance_curve --workdir runs/smollm2_tidar8 --base runs/smollm2 \
        --prompts 48 --max-new-tokens 128 --batch 8 --out results/smollm2/acceptance_curve.json

--base: the export the run started from, shown at 0 tokens. The decoders compile once: every
checkpoint has the same shapes, so each point costs its decoding alone. Keep checkpoints along the
run to get points (e.g. --config.train.checkpoint_every=100 --config.train.keep_checkpoints=10).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from benchmarks import common
from benchmarks.reproduce.results import read_metrics
from tidar_jax import checkpoint
from tidar_jax.config import validate
from tidar_jax.decode.sampling import SamplingParams
from tidar_jax.evaluation import decoding, humaneval

EVAL_KEYS = ("eval_ar_loss", "eval_diffusion_loss")


def eval_losses_by_step(workdir: str) -> dict[int, dict[str, float]]:
  """The validation losses the trainer logged, by step (metrics.jsonl; empty if there is none)."""
  return {r["step"]: {k: r[k] for k in EVAL_KEYS if k in r} for r in read_metrics(workdir) if "eval_ar_loss" in r}


def point(params: Any, config: Any, tokenizer: Any, prompts: decoding.PromptSet, *, batch: int,
          max_new_tokens: int, dtype: str) -> dict[str, Any]:
  """TiDAR greedy decoding of the prompt set with these weights: T/NFE and the accepted-drafts histogram."""
  model_cfg = dataclasses.replace(validate(config), dtype=dtype, param_dtype=dtype, remat="none")
  r = decoding.run_decoder("tidar", decoding.decode_params(params, dtype), model_cfg, prompts,
                           block_size=config.tidar.block_size, sampling=SamplingParams(temperature=0.0),
                           max_new_tokens=max_new_tokens, batch=batch, seed=0, eos_id=tokenizer.special_ids(),
                           mask_id=tokenizer.mask_id)
  return {k: r[k] for k in ("tokens_per_forward", "mean_tokens_per_step", "accepted_hist", "generated_tokens",
                            "forward_passes")}


def run(rec: common.Recorder, *, workdir: str, base: str | None, prompts: int, max_new_tokens: int, batch: int,
        dtype: str) -> None:
  steps = checkpoint.checkpoint_steps(workdir)
  if not steps:
    raise SystemExit(f"--workdir={workdir}: no checkpoints; train with checkpoints kept along the run")
  last = checkpoint.load_for_inference(workdir, flag="--workdir", step=steps[-1])  # decoded last, not loaded again
  _, config, tokenizer = last
  if config.tidar.objective != "tidar":
    raise SystemExit(f"--workdir={workdir} trained the {config.tidar.objective!r} objective: T/NFE needs a TiDAR run")
  problems = humaneval.problems(prompts)
  ps = decoding.humaneval_prompts(tokenizer, problems)
  tokens_per_step = config.train.batch_size * config.train.seq_len
  losses = eval_losses_by_step(workdir)
  rec.set("run", {"workdir": os.path.abspath(workdir), "block_size": config.tidar.block_size, "prompts": len(problems),
                  "max_new_tokens": max_new_tokens, "batch": batch, "dtype": dtype,
                  "clean_tokens_per_step": tokens_per_step})
  points: list[tuple[int, str, str | None]] = [(0, base, None)] if base else []
  points += [(s, workdir, s) for s in steps]
  for step, path, at in points:
    params, cfg, _ = last if at == steps[-1] else checkpoint.load_for_inference(
        path, flag="--base" if at is None else "--workdir", step=at)
    if at is None:  # the base export: decoded as the run's TiDAR model (its block size, mask id)
      cfg.tidar.update(objective="tidar", block_size=config.tidar.block_size)
    r = point(params, cfg, tokenizer, ps, batch=batch, max_new_tokens=max_new_tokens, dtype=dtype)
    r.update(step=step, clean_tokens=step * tokens_per_step, **losses.get(step, {}))
    rec.add(r)
    print(f"[acceptance_curve] step {step} ({step * tokens_per_step / 1e6:.1f}M clean tokens): "
          f"T/NFE {r['tokens_per_forward']:.3f}, accepted-drafts hist {r['accepted_hist']}", flush=True)


def render(result: dict[str, Any]) -> str:
  run_ = result.get("run", {})
  rows = [[r["step"], f"{r['clean_tokens'] / 1e6:.1f}", f"{r['tokens_per_forward']:.3f}",
           r.get("eval_ar_loss"), r.get("eval_diffusion_loss"), " ".join(map(str, r["accepted_hist"]))]
          for r in result["records"]]
  table = common.md_table(["step", "clean tokens (M)", "T/NFE", "val AR NLL", "val diffusion loss",
                           "accepted drafts 0..k-1 (steps)"], rows)
  return common.section("acceptance_curve", result["meta"], (
      f"TiDAR k={run_.get('block_size')} greedy on the first {run_.get('prompts')} HumanEval prompts, "
      f"{run_.get('max_new_tokens')} new tokens, batch {run_.get('batch')}, {run_.get('dtype')}; validation "
      "losses as the trainer logged them at that step (blank where it did not evaluate)."), table)


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workdir", required=True, help="a TiDAR training workdir with checkpoints kept along the run")
  p.add_argument("--base", default=None, help="the export the run started from (plotted at 0 tokens)")
  p.add_argument("--prompts", type=int, default=48, help="the first N HumanEval prompts")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])


def measure_from_args(args: argparse.Namespace) -> dict[str, Any]:
  if args.smoke:
    args.prompts, args.max_new_tokens, args.batch, args.dtype = 2, 6, 2, "float32"
  rec = common.Recorder(args.out, common.device_info())
  run(rec, workdir=args.workdir, base=args.base, prompts=args.prompts, max_new_tokens=args.max_new_tokens,
      batch=args.batch, dtype=args.dtype)
  return rec.result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return common.cli(__doc__, add_args, measure_from_args, render, argv)


if __name__ == "__main__":
  main(sys.argv[1:])
