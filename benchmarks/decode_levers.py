"""What the decode step could cost: a stand-alone prototype of the AR / TiDAR decode step with the
levers of the performance issue applied, timed like decode_latency, as evidence for changes to
tidar_jax/ (this file changes nothing there).

    python -m benchmarks.decode_levers --models 1p5b --blocks 0,8,16 --attention einsum,cudnn \
        --out runs/bench/levers.json --markdown BENCHMARKS.md
    python -m benchmarks.decode_levers --smoke

Same weights and math as `tidar_jax.model.Transformer` (checked against it in
tests/test_benchmarks.py), restructured the way the profile of the real step asks for:

  * weights re-laid-out once before the loop: per-layer arrays (layers unrolled, no dynamic slice
    of stacked weights), q/k/v fused into one [d, (H + 2 Hkv) D] matrix, gate/up into one [d, 2F];
  * one KV cache array per layer, head-major [B, Hkv, S, D] (einsum) or [B, S, Hkv, D] (cuDNN),
    carried by the loop and updated in place: the step writes its T new keys/values at slot p with
    `dynamic_update_slice` first, then attends once over the cache with a [T, S] mask (slot < p, or
    the step's own structured mask at slots p .. p+T-1): no concatenation, no split softmax, no
    separate pass over the new tokens (rejected drafts' slots are simply overwritten next step);
  * attention either as two einsums with an fp32 softmax (XLA), or `jax.nn.dot_product_attention`
    with cuDNN's fused kernel;
  * the TiDAR LM head as in the real step: k verification rows, then (data-dependent on the
    greedy acceptance) the chosen block's k - 1 draft rows.

The loop (`lax.fori_loop` with a traced trip count, one compilation) runs n1 and n2 steps;
ms/step = (t(n2) - t(n1)) / (n2 - n1). Drafts are assumed fully accepted (the cache advances by k),
which only moves where the next step writes.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from tidar_jax import masks
from tidar_jax.config import ModelConfig
from tidar_jax.model import rope

_MASKED = -1e30


def prepare(params: Any, cfg: ModelConfig) -> dict[str, Any]:
  """Per-layer, fused weights (made once, outside the decode loop)."""
  p = params["params"]
  lay, a, m = p["layers"], p["layers"]["attn"], p["layers"]["mlp"]
  L, d, H, Hkv, D = cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def build(lay, a, m):
    wqkv = jnp.concatenate([a["q"]["kernel"].reshape(L, d, H * D), a["k"]["kernel"].reshape(L, d, Hkv * D),
                            a["v"]["kernel"].reshape(L, d, Hkv * D)], axis=2)
    out = {"wqkv": wqkv, "wo": a["o"]["kernel"].reshape(L, H * D, d),
           "wgu": jnp.concatenate([m["gate"]["kernel"], m["up"]["kernel"]], axis=2), "wd": m["down"]["kernel"],
           "attn_norm": lay["attn_norm"]["scale"], "mlp_norm": lay["mlp_norm"]["scale"]}
    if cfg.qkv_bias:
      out["bqkv"] = jnp.concatenate([a["q"]["bias"].reshape(L, H * D), a["k"]["bias"].reshape(L, Hkv * D),
                                     a["v"]["bias"].reshape(L, Hkv * D)], axis=1)
    if cfg.qk_norm:
      out["q_norm"], out["k_norm"] = a["q_norm"]["scale"], a["k_norm"]["scale"]
    return [{k: v[i] for k, v in out.items()} for i in range(L)]

  layers = jax.jit(build)(lay, a, m)
  head = p["lm_head"]["kernel"] if "lm_head" in p else None
  return {"layers": layers, "embed": p["embed"]["embedding"], "final_norm": p["final_norm"]["scale"], "lm_head": head}


def _rms(x, scale, eps, dtype):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))).astype(dtype)


def _attend(q, kc, vc, mask_BTS, layout: str, impl: str):
  """q [B, T, H, D]; cache [B, Hkv, S, D] (bhsd) or [B, S, Hkv, D] (bshd); mask [B, T, S] -> [B, T, H, D]."""
  B, T, H, D = q.shape
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q, kc, vc, mask=mask_BTS[:, None], implementation="cudnn")
  if impl == "xla":
    return jax.nn.dot_product_attention(q, kc, vc, mask=mask_BTS[:, None], implementation="xla")
  Hkv = kc.shape[1] if layout == "bhsd" else kc.shape[2]
  qg = q.reshape(B, T, Hkv, H // Hkv, D)
  kspec = "bksd" if layout == "bhsd" else "bskd"
  s = jnp.einsum(f"btkgd,{kspec}->bkgts", qg, kc, preferred_element_type=jnp.float32) * D**-0.5
  s = jnp.where(mask_BTS[:, None, None], s, _MASKED)
  prob = jax.nn.softmax(s, axis=-1).astype(vc.dtype)
  return jnp.einsum(f"bkgts,{kspec}->btkgd", prob, vc).reshape(B, T, H, D)


def forward(w: dict[str, Any], cfg: ModelConfig, caches: list, tokens, positions, step_mask, write_pos, *,
            layout: str, impl: str):
  """One step over T new tokens: writes their K/V at slots write_pos.., attends over the cache.
  Returns (final-normed hidden [B, T, d], new caches)."""
  dt = cfg.compute_dtype
  B, T = tokens.shape
  H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  S = caches[0][0].shape[2 if layout == "bhsd" else 1]
  slot = jnp.arange(S)[None, :]
  own = jax.lax.dynamic_update_slice(jnp.zeros((T, S), bool), step_mask, (0, write_pos))
  mask = ((slot < write_pos) | own)[None]  # [1, T, S]
  mask = jnp.broadcast_to(mask, (B, T, S))
  x = jnp.take(w["embed"], tokens, axis=0).astype(dt)
  new = []
  for lw, (kc, vc) in zip(w["layers"], caches):
    h = _rms(x, lw["attn_norm"], cfg.norm_eps, dt)
    qkv = jnp.einsum("btd,de->bte", h, lw["wqkv"].astype(dt))
    if "bqkv" in lw:
      qkv = qkv + lw["bqkv"].astype(dt)[None, None, :]
    q = qkv[..., : H * D].reshape(B, T, H, D)
    k = qkv[..., H * D:(H + Hkv) * D].reshape(B, T, Hkv, D)
    v = qkv[..., (H + Hkv) * D:].reshape(B, T, Hkv, D)
    if "q_norm" in lw:
      q, k = _rms(q, lw["q_norm"], cfg.norm_eps, dt), _rms(k, lw["k_norm"], cfg.norm_eps, dt)
    q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    if layout == "bhsd":
      kc = jax.lax.dynamic_update_slice(kc, k.transpose(0, 2, 1, 3).astype(kc.dtype), (0, 0, write_pos, 0))
      vc = jax.lax.dynamic_update_slice(vc, v.transpose(0, 2, 1, 3).astype(vc.dtype), (0, 0, write_pos, 0))
    else:
      kc = jax.lax.dynamic_update_slice(kc, k.astype(kc.dtype), (0, write_pos, 0, 0))
      vc = jax.lax.dynamic_update_slice(vc, v.astype(vc.dtype), (0, write_pos, 0, 0))
    new.append((kc, vc))
    o = _attend(q, kc, vc, mask, layout, impl)
    x = x + jnp.einsum("bte,ed->btd", o.reshape(B, T, H * D), lw["wo"].astype(dt))
    h = _rms(x, lw["mlp_norm"], cfg.norm_eps, dt)
    gu = jnp.einsum("btd,df->btf", h, lw["wgu"].astype(dt))
    g, u = jnp.split(gu, 2, axis=-1)
    x = x + jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, lw["wd"].astype(dt))
  return _rms(x, w["final_norm"], cfg.norm_eps, dt), new


def logits(w, cfg: ModelConfig, h):
  if w["lm_head"] is None:
    return jnp.einsum("...d,vd->...v", h, w["embed"].astype(h.dtype), preferred_element_type=jnp.float32)
  return jnp.einsum("...d,dv->...v", h, w["lm_head"].astype(h.dtype), preferred_element_type=jnp.float32)


def init_caches(cfg: ModelConfig, batch: int, slots: int, layout: str, seed: int = 0) -> list:
  """Random (not zero) caches, one (k, v) pair per layer, each its own buffer: one random draw on the
  host, shifted per layer (a jitted draw per layer makes a program that compiles for minutes)."""
  shape = ((batch, cfg.num_kv_heads, slots, cfg.head_dim) if layout == "bhsd"
           else (batch, slots, cfg.num_kv_heads, cfg.head_dim))
  base = np.random.default_rng(seed).standard_normal((2,) + shape, np.float32)
  dev = [jax.device_put(b.astype(np.float32)) for b in base]
  shift = jax.jit(lambda x, i: (x + 0.01 * i).astype(cfg.compute_dtype))
  return [(shift(dev[0], jnp.float32(i)), shift(dev[1], jnp.float32(-i))) for i in range(cfg.num_layers)]


@functools.partial(jax.jit, static_argnames=("cfg", "k", "layout", "impl"), donate_argnums=(1,))
def decode_loop(w, caches, n, start, *, cfg: ModelConfig, k: int, layout: str, impl: str):
  """n greedy decode steps (AR for k = 0, TiDAR with block k, full acceptance) from cache length start."""
  B = caches[0][0].shape[0]
  mask_id = cfg.vocab_size - 1
  if k == 0:
    T, offsets, step_mask = 1, jnp.zeros((1,), jnp.int32), jnp.ones((1, 1), bool)
  else:
    T = k + k * k
    offsets, step_mask = jnp.asarray(masks.decode_step_offsets(k)), jnp.asarray(masks.decode_step_mask(k))

  def body(_, carry):
    caches, t0, drafts, p = carry
    if k == 0:
      tokens = t0[:, None]
    else:
      tokens = jnp.concatenate([t0[:, None], drafts, jnp.full((B, k * k), mask_id, jnp.int32)], axis=1)
    positions = jnp.broadcast_to(p + offsets[None, :], (B, T))
    h, caches = forward(w, cfg, caches, tokens, positions, step_mask, p, layout=layout, impl=impl)
    if k == 0:
      nxt = jnp.argmax(logits(w, cfg, h[:, 0]), axis=-1).astype(jnp.int32)
      return caches, nxt, drafts, p + 1
    verify = jnp.argmax(logits(w, cfg, h[:, :k]), axis=-1).astype(jnp.int32)  # [B, k]
    ok = jnp.cumprod((verify[:, :-1] == drafts).astype(jnp.int32), axis=1)
    accepted = jnp.sum(ok, axis=1)  # greedy acceptance (data dependent) ...
    block = jnp.maximum(accepted, k - 1)  # ... but the cache advances as if all were accepted
    blocks = h[:, k:].reshape(B, k, k, -1)
    chosen = jnp.take_along_axis(blocks, block[:, None, None, None], axis=1)[:, 0, 1:]  # [B, k-1, d]
    new_drafts = jnp.argmax(logits(w, cfg, chosen), axis=-1).astype(jnp.int32)
    nxt = jnp.take_along_axis(verify, block[:, None], axis=1)[:, 0]
    return caches, nxt, new_drafts, p + k

  t0 = jnp.zeros((B,), jnp.int32) + 7
  drafts = jnp.zeros((B, max(k - 1, 1)), jnp.int32) + 11
  caches, t0, drafts, p = jax.lax.fori_loop(0, n, body, (caches, t0, drafts, start))
  return caches, t0


_PARTS = [
    ("q/k/v projection (one fused matmul)", r"btd,de->bte"),
    ("o projection", r"bte,ed->btd"),
    ("MLP gate/up (one fused matmul)", r"btd,df->btf"),
    ("MLP down", r"btf,fd->btd"),
    ("attention over the cache (scores, softmax, PV)", r"btkgd|bkgts|dot_product_attention|cudnn|softmax|custom"),
    ("LM head + argmax", r"\.\.\.d,vd|\.\.\.d,dv|argmax"),
    ("cache write (in place)", r"dynamic_update_slice"),
    ("norms, RoPE, residual, mask (elementwise)", r"."),
]


def measure(w, cfg: ModelConfig, *, batch: int, kv: int, k: int, layout: str, impl: str, n1: int, n2: int,
            reps: int, profile: bool = False) -> dict[str, Any]:
  advance = 1 if k == 0 else k
  T = 1 if k == 0 else k + k * k
  slots = kv + n2 * advance + T + 8
  caches = init_caches(cfg, batch, slots, layout)
  state = {"caches": caches}

  def run(n):
    state["caches"], t0 = decode_loop(w, state["caches"], jnp.int32(n), jnp.int32(kv), cfg=cfg, k=k, layout=layout,
                                      impl=impl)
    return t0

  print(f"[levers] compiling B={batch} kv={kv} k={k} {impl} ({slots} slots)...", flush=True)
  t = time.perf_counter()
  jax.block_until_ready(run(n1))
  compile_s = time.perf_counter() - t
  t1, t2 = [], []
  for _ in range(reps):
    t1 += common.time_calls(lambda: run(n1), 1, warmup=0)
    t2 += common.time_calls(lambda: run(n2), 1, warmup=0)
  per = (statistics.median(t2) - statistics.median(t1)) / (n2 - n1)
  prof = None
  if profile:  # kernel time per step: all kernels of the loop, over n2 steps
    from benchmarks import profile_step
    kernels, notes = profile_step.trace_kernels(lambda: run(n2))
    kernels = [x for x in kernels if x["module"] in (None, "jit_decode_loop")]
    pid = next((x["program_id"] for x in kernels if x["program_id"] is not None), None)
    op_of = profile_step.hlo_op_names("jit_decode_loop", pid, profile_step.dump_dir_from_flags())
    prof = profile_step.summarize(kernels, op_of, select=lambda op: True, divide=n2, parts=_PARTS)
    prof["hlo_ops_mapped"] = len(op_of)
    prof["kernel_share_of_step"] = prof["kernel_us_total"] / 1e3 / (per * 1e3) if per > 0 else None
  state.clear()
  return {"batch": batch, "kv": kv, "block_size": k, "layout": layout, "attention": impl, "slots": slots,
          "tokens_fed_per_step": T, "ms_per_step": per * 1e3, "first_call_s": compile_s, "t_n1_s": t1, "t_n2_s": t2,
          "n1": n1, "n2": n2, **({"profile": prof} if prof else {})}


def run(rec: common.Recorder, *, models: list[str], batches: list[int], kvs: list[int],
        configs: list[tuple[str, int]], n1: int, n2: int, reps: int, dtype: str, deadline: common.Deadline,
        on_host: bool, bw_GBps: float, profile: bool = False) -> None:
  """configs: (attention, block size) pairs in priority order."""
  for name in models:
    cfg = common.inference_config(name, dtype=dtype)
    w = prepare(common.get_params(cfg, on_host=on_host), cfg)
    common.drop_params()  # the per-layer copy replaces the stacked weights on the device
    for batch in batches:
      for kv in kvs:
        ar = {}
        for impl, k in configs:
          layout = "bhsd" if impl == "einsum" else "bshd"
          label = {"model": name, "batch": batch, "kv": kv, "block_size": k, "attention": impl}
          if deadline.spent():
            rec.add({**label, "skipped": "time budget"})
            continue
          try:
            r = measure(w, cfg, batch=batch, kv=kv, k=k, layout=layout, impl=impl, n1=n1, n2=n2, reps=reps,
                        profile=profile)
          except Exception as e:  # noqa: BLE001  (cuDNN may refuse a shape)
            rec.add({**label, "error": f"{type(e).__name__}: {str(e)[:400]}"})
            print(f"[levers] {label} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
          r["model"] = name
          weights = common.weight_bytes_read_per_step(cfg)
          kv_read = batch * r["slots"] * common.kv_bytes_per_token(cfg)
          r["roofline_ms"] = (weights + batch * kv * common.kv_bytes_per_token(cfg)) / (bw_GBps * 1e9) * 1e3
          r["roofline_slots_ms"] = (weights + kv_read) / (bw_GBps * 1e9) * 1e3
          r["pct_of_roofline"] = 100 * r["roofline_ms"] / r["ms_per_step"] if r["ms_per_step"] > 0 else None
          if k == 0:
            ar[impl] = r["ms_per_step"]
          best_ar = min(ar.values()) if ar else None
          if k and best_ar:
            r["ratio_to_best_ar"] = r["ms_per_step"] / best_ar
          rec.add(r)
          print(f"[levers] {name} B={batch} kv={kv} {'AR' if k == 0 else f'k={k}'} {impl}: {r['ms_per_step']:.3f} "
                f"ms/step ({r['pct_of_roofline'] or float('nan'):.0f}% of roofline {r['roofline_ms']:.3f} ms)"
                + (f", x{r['ratio_to_best_ar']:.2f} best AR" if "ratio_to_best_ar" in r else "")
                + f", first call {r['first_call_s']:.1f}s", flush=True)
    del w


def render(result: dict[str, Any]) -> str:
  meta = result["meta"]
  rows = []
  for r in result["records"]:
    step = "AR" if r["block_size"] == 0 else f"TiDAR k={r['block_size']}"
    if "ms_per_step" not in r:
      rows.append([r["model"], r["batch"], r["kv"], step, r["attention"], (r.get("error") or r.get("skipped", ""))[:70],
                   None, None, None])
      continue
    rows.append([r["model"], r["batch"], r["kv"], step, f"{r['attention']} ({r['layout']})",
                 round(r["ms_per_step"], 3), round(r["roofline_ms"], 3),
                 f"{r['pct_of_roofline'] or float('nan'):.0f}%",
                 f"{r['ratio_to_best_ar']:.2f}" if "ratio_to_best_ar" in r else ""])
  table = common.md_table(["model", "batch", "KV", "step", "attention (cache layout)", "ms/step", "HBM roofline ms",
                           "% of roofline", "÷ best AR step"], rows)
  prof_text = ""
  for r in result["records"]:
    pr = r.get("profile")
    if not pr:
      continue
    total = max(pr["kernel_us_total"], 1e-9)
    step = "AR" if r["block_size"] == 0 else f"TiDAR k={r['block_size']}"
    from benchmarks.profile_step import RELABEL
    rows_p = [[RELABEL.get(part, part), round(us / 1e3, 4), f"{100 * us / total:.1f}%",
               round(pr["by_part_kernels"].get(part, 0))] for part, us in pr["by_part_us"].items()]
    kern = [[k_, round(us / 1e3, 4), f"{100 * us / total:.1f}%"] for k_, us in list(pr["top_kernels_us"].items())[:8]]
    prof_text += (f"\nPrototype {r['model']} {step} ({r['attention']}), B={r['batch']}, KV {r['kv']}: "
                  f"{total / 1e3:.3f} ms of kernels in {pr['kernels']:.0f} launches per step vs "
                  f"{r['ms_per_step']:.3f} ms measured.\n\n"
                  + common.md_table(["part", "ms", "share", "kernels"], rows_p) + "\n\n"
                  + common.md_table(["top kernel", "ms", "share"], kern) + "\n")
  return (f"### decode_levers: prototype step with the levers applied ({meta.get('date', '?')})\n\n"
          f"{common.meta_line(meta)}. Stand-alone step in benchmarks/decode_levers.py (same weights and math as "
          f"the model; per-layer fused weights, unrolled layers, per-layer in-place KV cache, one masked "
          f"attention over the cache), `fori_loop` of n steps, ms/step = (t(n2) − t(n1)) / (n2 − n1), median of "
          f"{meta.get('reps', '?')}.\n\n{table}\n{prof_text}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="1p5b")
  p.add_argument("--batch", default="1")
  p.add_argument("--kv", default="2048")
  p.add_argument("--configs", default="einsum:0,einsum:16,cudnn:16,einsum:8,cudnn:0",
                 help="attention:block pairs in priority order; attention = einsum (XLA, bhsd cache) | cudnn | "
                      "xla (jax.nn.dot_product_attention XLA path, bshd cache); block 0 = AR")
  p.add_argument("--n1", type=int, default=8)
  p.add_argument("--n2", type=int, default=40)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--budget-s", type=float, default=0)
  p.add_argument("--out", default=None)
  p.add_argument("--markdown", default=None)
  p.add_argument("--render", default=None)
  p.add_argument("--profile", action="store_true", help="also trace each configuration (kernel time per part)")
  p.add_argument("--smoke", action="store_true")
  args = p.parse_args(argv)
  if args.render:
    result = common.load_json(args.render)
  else:
    if args.profile and not args.smoke:
      from benchmarks import profile_step
      profile_step.enable_hlo_dump()
    from benchmarks.decode_latency import ceilings, parse_ints
    if args.smoke:
      args.models, args.kv, args.configs, args.n1, args.n2, args.reps = "tiny", "16", "einsum:0,einsum:4", 1, 2, 1
      args.dtype = "float32"
    meta = {**common.device_info(), "reps": args.reps}
    meta.update(ceilings(args.smoke, False))
    rec = common.Recorder(args.out, meta)
    configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs.split(",")]
    run(rec, models=args.models.split(","), batches=parse_ints(args.batch), kvs=parse_ints(args.kv),
        configs=configs, n1=args.n1, n2=args.n2, reps=args.reps,
        dtype=args.dtype, deadline=common.Deadline(args.budget_s), on_host=args.smoke,
        bw_GBps=meta["copy_bandwidth"]["GBps"], profile=args.profile)
    result = rec.result
  text = render(result)
  print(text)
  if args.markdown:
    common.append_markdown(args.markdown, text)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
