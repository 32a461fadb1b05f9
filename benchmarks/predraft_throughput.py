"""Pruned pre-drafting at batch > 1: tokens/s of AR, full TiDAR and pruned TiDAR under stated
acceptance laws.

    python -m benchmarks.predraft_throughput --models 1p5b --kv 2048 --batches 1,8,32 --block 8 \
        --laws small,mean3 --sets "0,1,2,7" --out runs/bench/predraft.json --markdown BENCHMARKS.md
    python -m benchmarks.predraft_throughput --smoke

Random bf16 weights at the real shape, greedy. Each TiDAR row's accepted count is drawn per step from
the law (`benchmarks/acceptance.py`; capped at the row's valid drafts, so a pruned step accepts what
its fallback allows), so full and pruned pre-drafting are timed on the same acceptance. Per (law,
batch): AR, TiDAR with every block, the set `predraft.best_counts` picks for that law and batch from
the shipped step-cost table, and each set of --sets. Reported: ms per step, its ratio to the AR step,
tokens per step, decode tokens/s and its ratio to AR's at the same batch.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from benchmarks import acceptance, common
from benchmarks.decode_latency import measure_generate
from tidar_jax import predraft


def _sets(text: str) -> list[tuple[int, ...]]:
  return [tuple(int(x) for x in s.split(",")) for s in text.split(";") if s.strip()]


def run(rec: common.Recorder, *, models: list[str], batches: list[int], kv: int, new_tokens: int, block: int,
        laws: list[str], sets: list[tuple[int, ...]], reps: int, dtype: str, deadline: common.Deadline,
        on_host: bool = False, config_overrides: dict[str, str] | None = None) -> None:
  for name in models:
    cfg = common.inference_config(name, dtype=dtype, config_overrides=config_overrides)
    params = common.get_params(cfg, on_host=on_host)
    max_len = common.shared_max_len(kv, new_tokens, [block])
    for batch in batches:
      ar = None
      for law in laws:
        best, predicted = predraft.best_counts(acceptance.LAWS[law], batch)
        runs = [(0, "all", "AR"), (block, "all", "all")] if ar is None else [(block, "all", "all")]
        runs += [(block, best, "best")] + [(block, s, "set") for s in sets if s != best]
        for k, kept, role in runs:
          label = dict(model=name, batch=batch, kv=kv, law=law if k else "", role=role,
                       predraft=list(predraft.counts(kept, k)) if k else [], block_size=k)
          if deadline.spent():
            rec.add({**label, "skipped": "time budget"})
            continue
          r, _ = measure_generate(params, cfg, batch=batch, prompt_len=kv, max_new_tokens=new_tokens, block_size=k,
                                  max_len=max_len, reps=reps, predraft=kept, law=law if k else None)
          r.update(label)
          if k == 0:
            ar = r
          else:
            r["step_ratio_to_ar"] = r["ms_per_step"] / ar["ms_per_step"]
            r["tokens_per_s_ratio_to_ar"] = r["decode_tokens_per_s"] / ar["decode_tokens_per_s"]
            if role == "best":
              r["predicted_ratio_to_ar"] = predicted
          rec.add(r)
          print(f"[predraft] {name} B={batch} {label['law'] or 'AR'} {role} {label['predraft']}: "
                f"{r['ms_per_step']:.3f} ms/step, {r['tokens_per_step']:.2f} tokens/step, "
                f"{r['decode_tokens_per_s']:,.0f} tok/s"
                + (f", x{r['tokens_per_s_ratio_to_ar']:.2f} AR" if k else ""), flush=True)


def render(result: dict[str, Any]) -> str:
  rows = []
  for r in result["records"]:
    decoder = "AR" if r["block_size"] == 0 else f"k={r['block_size']} {r['role']} {r['predraft']}"
    if "ms_per_step" not in r:
      rows.append([r["model"], r["batch"], r.get("law", ""), decoder, r.get("skipped", r.get("error", ""))]
                  + [None] * 5)
      continue
    rows.append([r["model"], r["batch"], r["law"], decoder, round(r["ms_per_step"], 3),
                 f"{r['step_ratio_to_ar']:.2f}" if "step_ratio_to_ar" in r else "",
                 f"{r['tokens_per_step']:.2f}", round(r["decode_tokens_per_s"]),
                 f"{r['tokens_per_s_ratio_to_ar']:.2f}x" if "tokens_per_s_ratio_to_ar" in r else "",
                 f"{r['predicted_ratio_to_ar']:.2f}x" if "predicted_ratio_to_ar" in r else ""])
  table = common.md_table(["model", "batch", "law", "decoder", "ms/step", "step ÷ AR step", "tokens/step",
                           "decode tok/s", "tok/s ÷ AR", "predicted"], rows)
  return common.section("predraft_throughput", result["meta"], (
      "Random bf16 weights, greedy; each TiDAR row's accepted count drawn per step from the law (capped at its "
      "valid drafts). 'best' = `predraft.best_counts` for the law and batch; 'predicted' = its model of tok/s ÷ AR."),
      table)


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--models", default="1p5b")
  p.add_argument("--batches", default="1,8,32")
  p.add_argument("--kv", type=int, default=2048)
  p.add_argument("--new-tokens", type=int, default=256)
  p.add_argument("--block", type=int, default=8)
  p.add_argument("--laws", default="small,mean3", help=f"comma list of {sorted(acceptance.LAWS)}")
  p.add_argument("--sets", default="0,1,2,7", help="kept-count sets timed besides 'all' and the best, ';'-separated")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--budget-s", type=float, default=0)


def measure_from_args(args: argparse.Namespace) -> dict[str, Any]:
  if args.smoke:
    args.models, args.kv, args.new_tokens, args.batches, args.reps, args.dtype = "tiny", 16, 9, "2", 1, "float32"
    args.laws = "mean3"
  rec = common.Recorder(args.out, {**common.device_info(), "reps": args.reps, "laws": acceptance.LAWS})
  run(rec, models=args.models.split(","), batches=[int(b) for b in args.batches.split(",")], kv=args.kv,
      new_tokens=args.new_tokens, block=args.block, laws=args.laws.split(","), sets=_sets(args.sets),
      reps=args.reps, dtype=args.dtype, deadline=common.Deadline(args.budget_s), on_host=args.smoke,
      config_overrides=args.config_overrides)
  return rec.result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return common.cli(__doc__, add_args, measure_from_args, render, argv)


if __name__ == "__main__":
  main(sys.argv[1:])
