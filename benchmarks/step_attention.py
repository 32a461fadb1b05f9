"""The decode step's attention alone: T step queries over a per-layer KV cache, every layer of a
model (distinct buffers, so the cache streams from HBM as in a real step, not from L2), chained
through the output. Compares cuDNN with the step's boolean mask, XLA's dense einsum, and the
split-KV Pallas kernel (`tidar_jax/kernels/split_kv_attention.py`) at its default tiling and a
sweep of row tiles / key splits / warps; each kernel's output is checked against the dense one.

    python -m benchmarks.step_attention --model 1p5b --batch 1,8 --kv 2048,8192 --blocks 0,4,8,16 --out att.json
    python -m benchmarks.step_attention --smoke
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import common
from tidar_jax import dispatch, masks
from tidar_jax.decode import engine, loop
from tidar_jax.kernels import split_kv_attention


def step_mask(block: int) -> masks.StepIntervals:
  return masks.causal_step(1) if block == 0 else masks.decode_step_intervals(block)


def make_case(cfg, batch: int, kv: int, block: int, layers: int, seed: int = 0):
  """Random bf16 q and `layers` caches of `kv` committed slots (+ the step's own), max_len aligned
  as the decode loop's default."""
  T = loop.step_tokens(block)
  max_len = -(-(kv + T) // dispatch.CACHE_ALIGN) * dispatch.CACHE_ALIGN
  key = jax.random.key(seed)
  shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  ks = [jax.random.normal(jax.random.fold_in(key, 2 * i), shape, jnp.bfloat16) for i in range(layers)]
  vs = [jax.random.normal(jax.random.fold_in(key, 2 * i + 1), shape, jnp.bfloat16) for i in range(layers)]
  q = jax.random.normal(jax.random.fold_in(key, 2 * layers), (batch, T, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
  lengths = jnp.full((batch,), kv, jnp.int32)
  return q, tuple(ks), tuple(vs), lengths


def chained(kernel: str, step: masks.StepIntervals, **kw):
  """jit: every layer's attention in turn, layer i's output is layer i+1's queries."""

  @jax.jit
  def f(q, ks, vs, lengths):
    outs = []
    for k_buf, v_buf in zip(ks, vs):
      if kernel == "split_kv":
        o = split_kv_attention.step_attention(q, k_buf, v_buf, lengths, step, **kw)
      else:
        o = engine.attend(q, k_buf, v_buf, lengths, step, kernel)
      outs.append(o)
      q = o
    return jnp.stack(outs)  # [layers, batch, T, heads, head_dim]

  return f


def variants(on_gpu: bool, T: int, group: int, sweep: bool) -> list[tuple[str, str, dict[str, Any]]]:
  out = [("dense (XLA einsum)", "dense", {})]
  if on_gpu:
    out.insert(0, ("cuDNN, boolean mask (before)", "cudnn", {}))
  out.append(("split-KV Pallas, default tiling", "split_kv", {}))
  if sweep and on_gpu:
    rows = T * group
    if rows <= 32:
      for tile in (16, 32):
        for splits in (2, 4, 8, 16):
          out.append((f"split-KV tile {tile} splits {splits}", "split_kv", dict(row_tile=tile, splits=splits)))
    else:
      for tile in (64, 128):
        for warps in (4, 8):
          for bk in (64, 128):
            for stages in (2, 3):
              out.append((f"split-KV tile {tile} warps {warps} block_k {bk} stages {stages}", "split_kv",
                          dict(row_tile=tile, num_warps=warps, block_k=bk, num_stages=stages)))
  return out


def run(rec: common.Recorder, cfg, model: str, batches, kvs, blocks, layers: int, reps: int, sweep_batch1: bool,
        deadline: common.Deadline) -> None:
  on_gpu = jax.default_backend() == "gpu"
  group = cfg.num_heads // cfg.num_kv_heads
  for batch in batches:
    for kv in kvs:
      for block in blocks:
        m = step_mask(block)
        args = make_case(cfg, batch, kv, block, layers)
        ref = None
        for name, kernel, kw in variants(on_gpu, m.tokens, group, sweep_batch1 and batch == 1):
          label = {"model": model, "batch": batch, "kv": kv, "block_size": block, "tokens": m.tokens,
                   "layers": layers, "variant": name, **kw}
          if kernel == "split_kv":
            label["tile"], label["splits"] = split_kv_attention.tiling(
                batch, m.tokens, cfg.num_heads, cfg.num_kv_heads, args[1][0].shape[1],
                kw.get("row_tile", 0), kw.get("splits", 0))
          if deadline.spent():
            rec.add({**label, "skipped": "time budget"})
            continue
          try:
            f = chained(kernel, m, **kw)
            out = jax.block_until_ready(f(*args))
            times = common.time_calls(lambda: f(*args), reps, warmup=1)
          except Exception as e:  # noqa: BLE001  (a tiling Triton refuses is recorded, not fatal)
            rec.add({**label, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"[step_attention] {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
          if kernel == "dense":
            ref = out
          err = None if ref is None else float(
              jnp.max(jnp.abs(out[:1].astype(jnp.float32) - ref[:1].astype(jnp.float32))))
          us = statistics.median(times) / layers * 1e6
          rec.add({**label, "us_per_layer": us, "max_abs_err_layer0_vs_dense": err})
          print(f"[step_attention] B={batch} kv={kv} k={block} {name}: {us:.1f} us/layer err {err}", flush=True)
        args = None  # frees this case's caches before the next case's are made (not del: the timing lambda names it)


def render(result: dict[str, Any]) -> str:
  meta = result["meta"]
  best: dict[tuple, float] = {}
  for r in result["records"]:
    if "us_per_layer" in r and r["variant"].startswith("split-KV"):
      key = (r["batch"], r["kv"], r["block_size"])
      best[key] = min(best.get(key, float("inf")), r["us_per_layer"])
  rows = []
  for r in result["records"]:
    key = (r["batch"], r["kv"], r["block_size"])
    val = round(r["us_per_layer"], 1) if "us_per_layer" in r else (r.get("error") or r.get("skipped", ""))[:60]
    if "us_per_layer" in r and r["variant"].startswith("split-KV") and "default" not in r["variant"] \
        and r["us_per_layer"] > best[key] * 1.3:
      continue  # the sweep's slow corners: kept in the JSON, left out of the table
    err = r.get("max_abs_err_layer0_vs_dense")
    name = r["variant"] + (f" ({r['tile']} rows, {r['splits']} splits)" if "default" in r["variant"] else "")
    rows.append([r["batch"], r["kv"], "AR" if r["block_size"] == 0 else f"k={r['block_size']}", r["tokens"],
                 name, val, "" if err is None else f"{err:.3g}"])
  return common.section("step_attention", meta, (
      f"{meta.get('shape', '')}; µs per layer = median over {meta.get('reps', '?')} calls of all layers chained ÷ "
      f"layers; split-KV sweep rows slower than 1.3 × the best are in the JSON only."),
      common.md_table(["batch", "KV", "step", "queries", "kernel", "µs / layer", "max |Δ| vs dense (bf16)"], rows))


def add_args(p: argparse.ArgumentParser) -> None:
  common.add_chain_args(p, reps=10)
  p.add_argument("--batch", default="1")
  p.add_argument("--kv", default="2048")
  p.add_argument("--blocks", default="0,8,16")
  p.add_argument("--sweep", action="store_true", help="sweep split-KV tilings at batch 1")


def measure_from_args(args: argparse.Namespace) -> dict[str, Any]:
  model = "tiny" if args.smoke else args.model
  cfg = common.model_config(model, args.config_overrides)
  layers = args.layers or cfg.num_layers
  batches, kvs, blocks = ([int(x) for x in s.split(",")] for s in (args.batch, args.kv, args.blocks))
  if args.smoke:
    layers, batches, kvs, blocks, args.reps = 2, [1], [40], [2], 1
  shape = (f"{model} shape: {cfg.num_heads}/{cfg.num_kv_heads} heads x {cfg.head_dim}, {layers} layers, "
           f"cache slots = KV + step tokens rounded up to {dispatch.CACHE_ALIGN}")
  rec = common.Recorder(args.out, {**common.device_info(), "reps": args.reps, "shape": shape})
  run(rec, cfg, model, batches, kvs, blocks, layers, args.reps, args.sweep, common.Deadline(args.budget_s))
  return rec.result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return common.cli(__doc__, add_args, measure_from_args, render, argv)


if __name__ == "__main__":
  main()
