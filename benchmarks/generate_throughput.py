"""End-to-end generation throughput, AR vs TiDAR, prefill reported separately.

    python -m benchmarks.generate_throughput --models 1p5b --prompt-len 2048 --new-tokens 256 \
        --blocks 0,8,16 --out runs/bench/throughput.json --markdown BENCHMARKS.md
    python -m benchmarks.generate_throughput --smoke

Random bf16 weights at the real shape, greedy. TiDAR's drafts are forced to the AR greedy
continuation (`generate_tidar(..., forced_drafts=...)`), so acceptance is (near) full and the
numbers are the per-step cost at full acceptance; the measured mean tokens/step is reported, and
"tok/s at k/step" converts the step cost to the ideal k tokens per step. Prefill (+ the first
token) is timed as the same call stopped by an EOS at the first token (one compilation for both),
so decode time = total - prefill. Random weights say nothing about real acceptance rates.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from benchmarks import common
from benchmarks.decode_latency import forced_table, measure_generate, parse_ints


def run(rec: common.Recorder, *, models: list[str], batch: int, prompt_len: int, new_tokens: int,
        blocks: list[int], reps: int, dtype: str, deadline: common.Deadline, on_host: bool = False,
        accept: str = "forced", decode_quant: str | None = None, config_overrides: dict[str, str] | None = None
        ) -> None:
  """accept: "forced" (drafts = the AR continuation) or "always" (the decoder's test-only
  always_accept override: every step accepts all k - 1 drafts)."""
  for name in models:
    cfg = common.inference_config(name, dtype=dtype, decode_quant=decode_quant, config_overrides=config_overrides)
    params = common.get_params(cfg, on_host=on_host)
    max_len = common.shared_max_len(prompt_len, new_tokens, blocks)
    ar = None
    ar_tokens = None
    for k in ([0] if 0 in blocks else []) + [b for b in blocks if b]:
      label = dict(model=name, batch=batch, prompt_len=prompt_len, block_size=k, accept=accept if k else "",
                   decode_quant=cfg.decode_quant)
      if deadline.spent():
        rec.add({**label, "skipped": "time budget"})
        continue
      forced = None if (k == 0 or ar_tokens is None) else forced_table(ar_tokens, prompt_len, max_len)
      r, tokens = measure_generate(params, cfg, batch=batch, prompt_len=prompt_len, max_new_tokens=new_tokens,
                                   block_size=k, max_len=max_len, forced=forced, reps=reps,
                                   always_accept=(accept == "always" and k > 0))
      r.update(label)
      r["e2e_tokens_per_s"] = r["generated"] * batch / (r["total_ms"] / 1e3)
      r["ideal_tokens_per_step"] = 1 if k == 0 else k
      r["tokens_per_s_at_full_acceptance"] = r["ideal_tokens_per_step"] * batch / (r["ms_per_step"] / 1e3)
      if k == 0:
        ar, ar_tokens = r, tokens
      elif ar is not None:
        r["speedup_e2e"] = r["e2e_tokens_per_s"] / ar["e2e_tokens_per_s"]
        r["speedup_decode"] = r["decode_tokens_per_s"] / ar["decode_tokens_per_s"]
        r["speedup_at_full_acceptance"] = r["tokens_per_s_at_full_acceptance"] / ar["tokens_per_s_at_full_acceptance"]
      rec.add(r)
      print(f"[throughput] {name} B={batch} prompt={prompt_len} {'AR' if k == 0 else f'k={k}'}: prefill "
            f"{r['prefill_ms']:.1f} ms, decode {r['decode_ms']:.1f} ms for {r['generated']} tokens/row "
            f"({r['tokens_per_step']:.2f}/step), e2e {r['e2e_tokens_per_s']:,.0f} tok/s, decode "
            f"{r['decode_tokens_per_s']:,.0f} tok/s", flush=True)


def render(result: dict[str, Any]) -> str:
  meta = result["meta"]
  rows = []
  for r in result["records"]:
    name = "AR" if r["block_size"] == 0 else f"TiDAR k={r['block_size']}" + (
        " (always accept)" if r.get("accept") == "always" else " (forced drafts)")
    name += ", int8 weights" if r.get("decode_quant") == "int8" else ""
    if "total_ms" not in r:
      rows.append([r["model"], r["batch"], r["prompt_len"], name, r.get("skipped", r.get("error", ""))] + [None] * 8)
      continue
    rows.append([r["model"], r["batch"], r["prompt_len"], name, round(r["prefill_ms"], 1), round(r["decode_ms"], 1),
                 r["generated"], f"{r['tokens_per_step']:.2f}", round(r["ms_per_step"], 3),
                 round(r["e2e_tokens_per_s"]), round(r["decode_tokens_per_s"]),
                 round(r["tokens_per_s_at_full_acceptance"]),
                 f"{r['speedup_decode']:.2f}x" if "speedup_decode" in r else ""])
  table = common.md_table(["model", "batch", "prompt", "decoder", "prefill+1st token ms", "decode ms",
                           "tokens/row", "tokens/step", "ms/step", "e2e tok/s", "decode tok/s",
                           "tok/s at k/step", "decode speedup vs AR"], rows)
  return common.section("generate_throughput", meta, (
      "Random bf16 weights, greedy. TiDAR acceptance: 'forced drafts' = drafts forced to the AR continuation "
      "(with random bf16 weights the verifier's argmax differs from the AR run's at near-ties, so few are "
      "accepted: see tokens/step); 'always accept' = the decoder's test-only always_accept override (all k − 1 "
      "drafts accepted every step). e2e = all generated tokens ÷ (prefill + decode); 'tok/s at k/step' = k ÷ "
      f"measured step time; median of {meta.get('reps', '?')}."), table)


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--models", default="1p5b")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--prompt-len", type=int, default=2048)
  p.add_argument("--new-tokens", type=int, default=256)
  p.add_argument("--blocks", default="0,8,16")
  p.add_argument("--accept", default="forced", choices=["forced", "always"],
                 help="forced: drafts = the AR continuation; always: the test-only always_accept override")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--decode-quant", default=None, help="override model.decode_quant (none|int8)")
  p.add_argument("--budget-s", type=float, default=0)


def measure_from_args(args: argparse.Namespace) -> dict[str, Any]:
  if args.smoke:
    args.models, args.prompt_len, args.new_tokens, args.blocks, args.reps = "tiny", 16, 9, "0,4", 1
    args.dtype = "float32"
  rec = common.Recorder(args.out, {**common.device_info(), "reps": args.reps})
  t = time.perf_counter()
  run(rec, models=args.models.split(","), batch=args.batch, prompt_len=args.prompt_len,
      new_tokens=args.new_tokens, blocks=parse_ints(args.blocks), reps=args.reps, dtype=args.dtype,
      deadline=common.Deadline(args.budget_s), on_host=args.smoke, accept=args.accept,
      decode_quant=args.decode_quant, config_overrides=args.config_overrides)
  print(f"[throughput] done in {time.perf_counter() - t:.1f}s", flush=True)
  return rec.result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return common.cli(__doc__, add_args, measure_from_args, render, argv)


if __name__ == "__main__":
  main(sys.argv[1:])
