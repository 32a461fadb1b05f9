"""Decode-step latency inside the jitted `lax.while_loop`: AR (1 token) vs TiDAR steps (k + k^2 tokens).

    python -m benchmarks.decode_latency --models 1p5b --batch 1 --kv 2048 --blocks 0,8,16 \
        --out runs/bench/decode.json --markdown BENCHMARKS.md
    python -m benchmarks.decode_latency --smoke          # one tiny iteration (CPU CI)

Method. The public decoders (`generate_ar`, `generate_tidar`) run greedily on random bf16 weights at
the real shape, on a prompt of `kv` tokens (identical rows), twice per configuration with ONE
compilation: with eos_id=None the loop runs its full count of steps; with eos_id = the first
emitted token every row stops in the prefill and the loop runs 0 steps (the EOS id is a traced
argument, so both calls share the executable). The step count comes from the decoder's own stats
(max forward_passes - 1), so

    ms/step = (median t_full - median t_prefill_only) / steps

is the cost of one iteration of the real loop body (model forward over the cache, LM head,
verification, sampling, cache write, emission), with prefill and host overhead cancelled.
TiDAR runs with `forced_drafts` = the AR greedy continuation, so (up to bf16 near-ties between
the 1-token and the (k+k^2)-token forward) every step accepts all k-1 drafts.

Roofline: a step must read every weight once (an untied input embedding only gathered) plus the
valid KV cache (average length over the run); floor = those bytes / the copy bandwidth measured in
the same run. The compute floor (model FLOPs / measured bf16 matmul rate) is reported beside it:
TiDAR steps at large k and batch stop being memory bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

from benchmarks import acceptance, common
from tidar_jax import predraft as predraft_lib
from tidar_jax.decode import tidar
from tidar_jax.decode.ar import generate_ar
from tidar_jax.decode.sampling import SamplingParams
from tidar_jax.decode.tidar import generate_tidar

GREEDY = SamplingParams(temperature=0.0)


def make_prompts(cfg, batch: int, prompt_len: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """One random prompt (ids below the mask id) repeated over the batch: every row does the same work
  and stops at the same EOS."""
  rng = np.random.default_rng(seed)
  row = rng.integers(0, cfg.vocab_size - 2, (1, prompt_len), dtype=np.int64).astype(np.int32)
  return np.repeat(row, batch, axis=0), np.full((batch,), prompt_len, np.int32)


def forced_table(ar_tokens: np.ndarray, prompt_len: int, max_len: int) -> np.ndarray:
  """forced_drafts [batch, max_len]: the AR continuation at its absolute positions, -1 elsewhere."""
  B, M = ar_tokens.shape
  table = np.full((B, max_len), -1, np.int32)
  table[:, prompt_len:prompt_len + M] = np.where(ar_tokens >= 0, ar_tokens, -1)
  return table


def measure_generate(params: Any, cfg, *, batch: int, prompt_len: int, max_new_tokens: int, block_size: int,
                     max_len: int, forced: np.ndarray | None = None, reps: int = 3,
                     verify_beta: float | None = None, always_accept: bool = False, predraft: Any = "all",
                     law: str | None = None) -> tuple[dict[str, Any], np.ndarray]:
  """Times one decoder configuration; returns (record, the full run's tokens [batch, max_new_tokens]).

  always_accept: `acceptance.ALWAYS_ACCEPT` hooks on generate_tidar (every step accepts
  its k - 1 drafts whatever they are): full acceptance regardless of bf16 near-ties.
  law: a name in `acceptance.LAWS`: each row's count drawn per step from that histogram.
  predraft: TiDAR's kept draft blocks (`tidar_jax.predraft.counts`)."""
  hooks = acceptance.ALWAYS_ACCEPT if always_accept else tidar.HOOKS
  if law:
    hooks = acceptance.law_hooks(acceptance.LAWS[law])
  prompts, lengths = make_prompts(cfg, batch, prompt_len)
  key = jax.random.key(0)

  def call(eos):
    if block_size == 0:
      return generate_ar(params, cfg, prompts, lengths, max_new_tokens=max_new_tokens, sampling=GREEDY,
                         key=key, eos_id=eos, max_len=max_len)
    return generate_tidar(params, cfg, prompts, lengths, max_new_tokens=max_new_tokens, sampling=GREEDY,
                          key=key, eos_id=eos, mask_id=cfg.vocab_size - 1, max_len=max_len,
                          block_size=block_size, forced_drafts=forced, verify_beta=verify_beta, hooks=hooks,
                          predraft=predraft)

  t = time.perf_counter()
  full = jax.block_until_ready(call(None))
  first_call_s = time.perf_counter() - t  # compile + one run
  tokens = np.asarray(full.tokens)
  eos = int(tokens[0, 0])
  short = jax.block_until_ready(call(eos))
  steps_full = int(np.asarray(full.stats.forward_passes).max()) - 1
  steps_short = int(np.asarray(short.stats.forward_passes).max()) - 1
  t_full, t_short = [], []
  for _ in range(reps):  # interleaved, so drift hits both alike
    t_full += common.time_calls(lambda: call(None), 1, warmup=0)
    t_short += common.time_calls(lambda: call(eos), 1, warmup=0)
  med_full, med_short = statistics.median(t_full), statistics.median(t_short)
  steps = max(steps_full - steps_short, 1)
  per_step = (med_full - med_short) / steps
  # Spread: the same difference from the fastest and the slowest full run.
  spread = (max(t_full) - min(t_full)) / steps
  hist = np.asarray(full.stats.accepted_hist)  # [batch, k]: steps that accepted a drafts
  kept = list(predraft_lib.counts(predraft, block_size)) if block_size else []
  generated = int(np.asarray(full.lengths).max())
  if block_size:
    a = np.arange(hist.shape[1])
    mean_accept = float((hist * a).sum() / max(hist.sum(), 1))
    tokens_per_step = mean_accept + 1
  else:
    mean_accept, tokens_per_step = 0.0, 1.0
  record = {
      "block_size": block_size, "batch": batch, "prompt_len": prompt_len, "max_new_tokens": max_new_tokens,
      "max_len": max_len,
      "tokens_fed_per_step": 1 if block_size == 0 else predraft_lib.step_tokens(block_size, kept),
      "predraft": kept, "law": law,
      "steps": steps, "steps_prefill_only": steps_short, "generated": generated,
      "ms_per_step": per_step * 1e3, "ms_per_step_spread": spread * 1e3,
      "prefill_ms": med_short * 1e3, "total_ms": med_full * 1e3, "first_call_s": first_call_s,
      # decode = the full call less the one stopped at the first token (prefill + that token)
      "decode_ms": (med_full - med_short) * 1e3,
      "decode_tokens_per_s": (generated - 1) * batch / max(med_full - med_short, 1e-12),
      "t_full_s": t_full, "t_prefill_only_s": t_short,
      "mean_accepted_drafts": mean_accept, "tokens_per_step": tokens_per_step,
      "verify_beta": verify_beta, "always_accept": always_accept,
  }
  return record, tokens


def roofline(record: dict[str, Any], cfg, bw_GBps: float, matmul_TFLOPs: float | None) -> dict[str, float]:
  kv_len = record["prompt_len"] + record["generated"] / 2  # average valid cache length over the run
  weights = common.weight_bytes_read_per_step(cfg)
  kv = record["batch"] * kv_len * common.kv_bytes_per_token(cfg)
  mem_ms = (weights + kv) / (bw_GBps * 1e9) * 1e3
  flops = common.decode_step_flops(cfg, record["batch"], record["block_size"], kv_len)
  out = {"bytes_weights": weights, "bytes_kv": kv, "roofline_ms": mem_ms,
         "pct_of_roofline": 100 * mem_ms / record["ms_per_step"] if record["ms_per_step"] > 0 else None,
         "step_gflops": flops / 1e9}
  if matmul_TFLOPs:
    out["compute_floor_ms"] = flops / (matmul_TFLOPs * 1e12) * 1e3
    out["floor_ms"] = max(mem_ms, out["compute_floor_ms"])
  return out


# (model, batch, kv, scan_layers) -> (AR ms/step, AR greedy tokens): the reference of later TiDAR
# configurations of the same group, also across run_grid calls of one process.
LAST_AR: dict[tuple, tuple[float, np.ndarray]] = {}
LAST_AR_TOKENS: dict[tuple, np.ndarray] = {}


def run_grid(rec: common.Recorder, *, models: list[str], batches: list[int], kvs: list[int], blocks: list[int],
             max_new_tokens: int, reps: int, scan_layers: bool | None, dtype: str, deadline: common.Deadline,
             bw_GBps: float, matmul_TFLOPs: float | None, verify_beta: float | None = None,
             on_host: bool = False, on_config=None, attention: str | None = None,
             decode_quant: str | None = None, config_overrides: dict[str, str] | None = None) -> None:
  """Measures every (model, batch, kv, block) in priority order: AR first in each group (its tokens
  force the TiDAR drafts; TiDAR ratios are to it)."""
  for name in models:
    cfg = common.inference_config(name, dtype=dtype, scan_layers=scan_layers, attention=attention,
                                  decode_quant=decode_quant, config_overrides=config_overrides)
    params = common.get_params(cfg, on_host=on_host)
    for batch in batches:
      for kv in kvs:
        max_len = common.shared_max_len(kv, max_new_tokens, blocks)
        group = (name, batch, kv, cfg.scan_layers, cfg.attention, cfg.decode_quant)
        ar_ms, ar_tokens = LAST_AR.get(group, (None, None))
        order = ([0] if 0 in blocks else []) + [k for k in blocks if k != 0]
        for k in order:
          label = dict(model=name, batch=batch, kv=kv, block_size=k, scan_layers=cfg.scan_layers,
                       attention=cfg.attention, decode_quant=cfg.decode_quant)
          if deadline.spent():
            rec.add({**label, "skipped": "time budget"})
            continue
          # Without an AR run in the group (blocks lacks 0) TiDAR keeps the model's own drafts.
          forced = None if (k == 0 or ar_tokens is None) else forced_table(ar_tokens, kv, max_len)
          fallback = None
          try:
            r, tokens = measure_generate(params, cfg, batch=batch, prompt_len=kv, max_new_tokens=max_new_tokens,
                                         block_size=k, max_len=max_len, forced=forced, reps=reps,
                                         verify_beta=verify_beta if k else None)
          except Exception as e:  # noqa: BLE001  (e.g. out of memory at a large batch x kv)
            err = f"{type(e).__name__}: {str(e)[:400]}"
            print(f"[decode] {label} failed: {err[:300]}", flush=True)
            if cfg.attention == "dense":
              rec.add({**label, "error": err})
              continue
            # cuDNN attention (prefill and step) is the one GPU-only piece: retry (and go on) with the
            # dense reference.
            cfg = dataclasses.replace(cfg, attention="dense")
            fallback = f"attention=dense after: {err}"
            try:
              r, tokens = measure_generate(params, cfg, batch=batch, prompt_len=kv, max_new_tokens=max_new_tokens,
                                           block_size=k, max_len=max_len, forced=forced, reps=reps,
                                           verify_beta=verify_beta if k else None)
            except Exception as e2:  # noqa: BLE001
              rec.add({**label, "error": err, "error_dense": f"{type(e2).__name__}: {str(e2)[:400]}"})
              continue
          r.update(label)
          r["attention"] = cfg.attention
          if fallback:
            r["fallback"] = fallback
          r.update(roofline(r, cfg, bw_GBps, matmul_TFLOPs))
          if k == 0:
            ar_ms, ar_tokens = r["ms_per_step"], tokens
            LAST_AR[group] = (ar_ms, tokens)
            LAST_AR_TOKENS[group] = tokens
          elif ar_ms:
            r["ratio_to_ar"] = r["ms_per_step"] / ar_ms
          rec.add(r)
          print(f"[decode] {name} B={batch} kv={kv} {'AR' if k == 0 else f'k={k}'} scan={cfg.scan_layers}: "
                f"{r['ms_per_step']:.3f} ms/step (±{r['ms_per_step_spread']:.3f}) over {r['steps']} steps, "
                f"{r['pct_of_roofline'] or float('nan'):.0f}% of roofline {r['roofline_ms']:.3f} ms"
                + (f", x{r['ratio_to_ar']:.2f} AR" if 'ratio_to_ar' in r else "")
                + f", tokens/step {r['tokens_per_step']:.2f}, prefill {r['prefill_ms']:.1f} ms, "
                f"first call {r['first_call_s']:.1f}s", flush=True)
          if on_config is not None:
            on_config(name, cfg, params, r)


def _step_name(r: dict[str, Any]) -> str:
  if r["block_size"] == 0:
    return "AR"
  beta = r.get("verify_beta")
  return f"k={r['block_size']}" + (f" (β={beta:g})" if beta is not None else "")


def _layers_name(r: dict[str, Any]) -> str:
  name = "scan" if r.get("scan_layers", True) else "unrolled"
  name += f", {r['attention']}" if r.get("attention") not in (None, "auto") else ""
  return name + (", int8 weights" if r.get("decode_quant") == "int8" else "")


def render(result: dict[str, Any]) -> str:
  meta = result["meta"]
  rows = []
  for r in result["records"]:
    if "ms_per_step" not in r:
      rows.append([r["model"], r["batch"], r["kv"], _step_name(r),
                   _layers_name(r), r.get("skipped") or r.get("error", "")[:60],
                   None, None, None, None, None, None])
      continue
    rows.append([r["model"], r["batch"], r["kv"], _step_name(r),
                 _layers_name(r), r["tokens_fed_per_step"],
                 round(r["ms_per_step"], 3), round(r["roofline_ms"], 3),
                 f"{r['pct_of_roofline'] or float('nan'):.0f}%", round(r.get("compute_floor_ms", float("nan")), 3),
                 f"{r['ratio_to_ar']:.2f}" if "ratio_to_ar" in r else "", f"{r['tokens_per_step']:.2f}"])
  table = common.md_table(["model", "batch", "KV (prompt)", "step", "layers", "tokens fed", "ms/step",
                           "HBM roofline ms", "% of roofline", "compute floor ms", "÷ AR step",
                           "tokens/step"], rows)
  return common.section("decode_latency", meta, (
      f"Random bf16 weights, greedy, {meta.get('max_new_tokens', '?')} new tokens; ms/step = "
      f"(full run − prefill-only run) / steps inside the jitted while_loop, median of "
      f"{meta.get('reps', '?')}. Roofline = (weights + average valid KV) bytes ÷ measured copy bandwidth; "
      f"compute floor = model FLOPs ÷ measured matmul rate. TiDAR drafts forced to the AR continuation "
      f"(tokens/step = accepted + 1)."), table)


def parse_ints(s: str) -> list[int]:
  return [int(x) for x in s.split(",") if x.strip()]


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--models", default="1p5b", help="comma list of configs/ names: tiny, 1p5b, 8b")
  p.add_argument("--batch", default="1", help="comma list of batch sizes")
  p.add_argument("--kv", default="2048", help="comma list of prompt (KV) lengths")
  p.add_argument("--blocks", default="0,4,8,16", help="comma list of block sizes; 0 = the AR step")
  p.add_argument("--new-tokens", type=int, default=256)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--unroll", action="store_true", help="scan_layers=False (fully unrolled layers)")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--attention", default=None, help="override model.attention (dense|cudnn|auto)")
  p.add_argument("--decode-quant", default=None, help="override model.decode_quant (none|int8)")
  p.add_argument("--verify-beta", type=float, default=None)
  p.add_argument("--budget-s", type=float, default=0, help="soft time budget; later configs are skipped")
  p.add_argument("--no-ceilings", action="store_true", help="skip the bandwidth/matmul measurements")


def ceilings(smoke: bool, skip: bool) -> dict[str, Any]:
  if skip:
    return {}
  if smoke:  # the code path only (the matmul rate is not needed for the roofline)
    return {"copy_bandwidth": common.copy_bandwidth(1 << 20, reps=1)}
  return {"copy_bandwidth": common.copy_bandwidth(), "matmul": common.matmul_rate()}


def measure_from_args(args: argparse.Namespace) -> dict[str, Any]:
  if args.smoke:
    args.models, args.batch, args.kv, args.blocks = "tiny", "1", "16", "0,4"
    args.new_tokens, args.reps, args.dtype = 9, 1, "float32"  # f32 compiles faster on CPU
  meta = {**common.device_info(), "reps": args.reps, "max_new_tokens": args.new_tokens}
  meta.update(ceilings(args.smoke, args.no_ceilings))
  rec = common.Recorder(args.out, meta)
  bw = meta.get("copy_bandwidth", {}).get("GBps", float("nan"))
  mm = meta.get("matmul", {}).get("TFLOPs")
  run_grid(rec, models=args.models.split(","), batches=parse_ints(args.batch), kvs=parse_ints(args.kv),
           blocks=parse_ints(args.blocks), max_new_tokens=args.new_tokens, reps=args.reps,
           scan_layers=False if args.unroll else None, dtype=args.dtype,
           deadline=common.Deadline(args.budget_s), bw_GBps=bw, matmul_TFLOPs=mm,
           verify_beta=args.verify_beta, on_host=args.smoke, attention=args.attention,
           decode_quant=args.decode_quant, config_overrides=args.config_overrides)
  return rec.result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return common.cli(__doc__, add_args, measure_from_args, render, argv)


if __name__ == "__main__":
  main(sys.argv[1:])
