"""Evidence for the train-step levers: the pieces the train-step profile points at, timed alone
at the 1p5b TiDAR shape (forward + backward under one jit), each against alternatives.

    python -m benchmarks.train_levers --out runs/bench/train_levers.json --markdown BENCHMARKS.md
    python -m benchmarks.train_levers --smoke

  * embedding gradient: the scatter-add that `jnp.take`'s transpose makes into the fp32 [V, d] table
    vs a one-hot matmul, and vs sorting the token ids first (sorted segment sum);
  * LM head + cross-entropy: fp32 logits left to autodiff (the fp32 cotangent makes both backward
    matmuls fp32/TF32 GEMMs), the model's `lm_head_logits` (fp32 logits, backward in bf16), and
    bf16 logits with the log-sum-exp in fp32;
  * attention over the doubled sequence with the TiDAR mask: cuDNN with the dense boolean mask, cuDNN
    causal (the AR-only mask, no bias tensor: a lower bound), the model's structured path (causal
    clean half + the mask half in query chunks, `attention.mask_half_attention`) at several chunk
    sizes incl. one [L, 2L] call, and XLA's dense path;
  * the parameter update: the trainer's optax chain + add vs one fused expression per parameter.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from tidar_jax import attention, masks
from tidar_jax.model import lm_head_logits


def _time(fn: Callable, args: tuple, reps: int) -> tuple[float, float]:
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t
  times = common.time_calls(lambda: fn(*args), reps, warmup=1)
  return statistics.median(times), first


def embed_grad_cases(n_tokens: int, vocab: int, d: int, seed: int = 0, tidar_ids: bool = True):
  """tidar_ids: like the TiDAR training input, the second half of the ids is the mask token (one row
  of the table receives n/2 updates); else uniform random ids."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab - 2, (n_tokens,))
  if tidar_ids:
    ids[n_tokens // 2:] = vocab - 1
  tok = jnp.asarray(ids, jnp.int32)
  g = jnp.asarray(rng.standard_normal((n_tokens, d)), jnp.bfloat16)  # cotangent of the gathered rows
  table = jnp.asarray(rng.standard_normal((vocab, d)) * 0.02, jnp.float32)
  half = n_tokens // 2

  def grad_of(embed_fn):
    return jax.jit(lambda table, tok, g: jax.grad(
        lambda t: jnp.sum(embed_fn(t, tok).astype(jnp.float32) * g.astype(jnp.float32)))(table))

  def flax_embed(t, tok):  # the model's own layer: nn.Embed(dtype=bf16) casts the table, then takes
    import flax.linen as nn
    emb = nn.Embed(t.shape[0], t.shape[1], dtype=jnp.bfloat16, param_dtype=jnp.float32)
    return emb.apply({"params": {"embedding": t}}, tok)

  def fp32_take(t, tok):  # take from the fp32 table, then cast: the scatter is fp32
    return jnp.take(t, tok, axis=0).astype(jnp.bfloat16)

  def mask_row_broadcast(t, tok):  # TiDAR: the mask half is one row broadcast (its gradient is a sum)
    clean = jnp.take(t, tok[:half], axis=0)
    masked = jnp.broadcast_to(t[tok[half]][None], (n_tokens - half, t.shape[1]))
    return jnp.concatenate([clean, masked]).astype(jnp.bfloat16)

  @jax.jit
  def onehot(table, tok, g):
    oh = jax.nn.one_hot(tok, table.shape[0], dtype=jnp.bfloat16)  # [N, V]
    return jnp.einsum("nv,nd->vd", oh, g, preferred_element_type=jnp.float32)

  @jax.jit
  def sorted_segsum(table, tok, g):
    order = jnp.argsort(tok)
    return jax.ops.segment_sum(g[order].astype(jnp.float32), tok[order], num_segments=table.shape[0],
                               indices_are_sorted=True)

  cases = {"flax nn.Embed(dtype=bf16) grad (as the model)": (grad_of(flax_embed), (table, tok, g)),
           "take from the fp32 table, then cast (fp32 scatter)": (grad_of(fp32_take), (table, tok, g)),
           "one-hot bf16 matmul": (onehot, (table, tok, g)),
           "sort ids + sorted segment_sum": (sorted_segsum, (table, tok, g))}
  if tidar_ids:
    cases["mask half as one broadcast row (clean half scattered)"] = (grad_of(mask_row_broadcast), (table, tok, g))
  return cases


def lm_head_cases(n_tokens: int, vocab: int, d: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.standard_normal((n_tokens, d)), jnp.bfloat16)
  table = jnp.asarray(rng.standard_normal((vocab, d)) * 0.02, jnp.bfloat16)
  tgt = jnp.asarray(rng.integers(0, vocab, (n_tokens,)), jnp.int32)

  def cross_entropy(logits):  # [n, V] fp32
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, tgt[:, None], axis=-1)[:, 0])

  def loss(h, table, logits_dtype):
    return cross_entropy(jnp.einsum("nd,vd->nv", h, table, preferred_element_type=logits_dtype).astype(jnp.float32))

  def loss_model(h, table):  # the model's head: fp32 logits, backward in bf16 (model.lm_head_logits)
    return cross_entropy(lm_head_logits(h, table, True))

  f32 = jax.jit(jax.grad(lambda h, t: loss(h, t, jnp.float32), argnums=(0, 1)))
  bf16 = jax.jit(jax.grad(lambda h, t: loss(h, t, jnp.bfloat16), argnums=(0, 1)))
  model = jax.jit(jax.grad(loss_model, argnums=(0, 1)))
  return {"fp32 logits, fp32 backward (before)": (f32, (h, table)),
          "fp32 logits, backward in bf16 (as now: model.lm_head_logits)": (model, (h, table)),
          "bf16 logits, fp32 log-sum-exp": (bf16, (h, table))}


def attention_cases(batch: int, seq_len: int, heads: int, kv_heads: int, head_dim: int, block: int, seed: int = 0):
  """TiDAR doubled sequence: q/k/v [B, 2L, H, D] with training_mask(L, k)."""
  rng = np.random.default_rng(seed)
  T = 2 * seq_len
  q = jnp.asarray(rng.standard_normal((batch, T, heads, head_dim)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((batch, T, kv_heads, head_dim)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((batch, T, kv_heads, head_dim)), jnp.bfloat16)
  mask = jnp.asarray(masks.training_mask(seq_len, block))

  def make(impl, use_mask, causal):
    def f(q, k, v):
      m = jnp.broadcast_to(mask[None, None], (batch, 1, T, T)) if use_mask else None
      out = jax.nn.dot_product_attention(q, k, v, mask=m, is_causal=causal, implementation=impl)
      return jnp.sum(out.astype(jnp.float32) ** 2)
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

  def structured(chunk):  # the model's path: clean half causal + the mask half in query chunks
    def f(q, k, v):
      out = attention.tidar_training_attention(q, k, v, block, "cudnn", chunk=chunk)
      return jnp.sum(out.astype(jnp.float32) ** 2)
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

  default = masks.mask_half_chunk(seq_len, block)
  cases = {"cuDNN, dense [2L, 2L] TiDAR boolean mask": (make("cudnn", True, False), (q, k, v)),
           "cuDNN, causal (AR mask, no bias: lower bound)": (make("cudnn", False, True), (q, k, v)),
           "cuDNN causal clean half + one [L, 2L] mask-half call (before)": (structured(seq_len), (q, k, v))}
  for chunk in sorted({default, 2 * default, default // 2} - {seq_len}, reverse=True):
    if chunk >= block and seq_len % chunk == 0 and chunk % block == 0:
      tag = " (as now)" if chunk == default else ""
      cases[f"cuDNN causal clean half + mask half in {seq_len // chunk} chunks of {chunk}{tag}"] = (
          structured(chunk), (q, k, v))
  cases["XLA dense, TiDAR boolean mask"] = (make("xla", True, False), (q, k, v))
  return cases


def optimizer_cases(cfg, train_cfg):
  """The parameter update alone (clipping + AdamW + the add), as the trainer runs it, vs the same
  math as one expression per parameter (p, g, mu, nu -> p', mu', nu'): is the optax chain's extra
  pass over the parameters worth a fused optimizer of our own?"""
  import optax

  from tidar_jax.optimizer import _decay_mask, learning_rate_schedule, make_optimizer
  from tidar_jax.train_step import create_train_state
  tx = make_optimizer(train_cfg)
  state = create_train_state(cfg, tx, 0, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state["params"])
  sched, b1, b2 = learning_rate_schedule(train_cfg), train_cfg.adam_b1, train_cfg.adam_b2

  @jax.jit
  def trainer(state, grads):  # what make_train_step does after the gradients
    updates, _ = tx.update(grads, state["opt_state"], state["params"])
    return jax.tree.map(jnp.add, state["params"], updates)

  @jax.jit
  def fused(state, grads):
    _, (adam, _, sched_state) = state["opt_state"]  # chain(clip, adamw) with the default adamw layout
    count = (adam.count + 1).astype(jnp.float32)
    scale = 1.0
    if train_cfg.grad_clip > 0:
      norm = optax.global_norm(grads)
      scale = jnp.where(norm < train_cfg.grad_clip, 1.0, train_cfg.grad_clip / norm)
    lr = sched(sched_state.count)

    def leaf(p, g, mu, nu, decay):
      g = g * scale
      mu, nu = b1 * mu + (1 - b1) * g, b2 * nu + (1 - b2) * g * g
      u = (mu / (1 - b1 ** count)) / (jnp.sqrt(nu / (1 - b2 ** count)) + 1e-8)
      return p - lr * (u + train_cfg.weight_decay * p if decay else u), mu, nu

    out = jax.tree.map(leaf, state["params"], grads, adam.mu, adam.nu, _decay_mask(state["params"]))
    return jax.tree.map(lambda o: o[0], out, is_leaf=lambda x: isinstance(x, tuple))  # new params

  return {"optax chain + tree add (as the trainer)": (trainer, (state, grads)),
          "one fused expression per parameter": (fused, (state, grads))}


def run(rec: common.Recorder, *, batch: int, seq_len: int, cfg, block: int, reps: int, deadline: common.Deadline,
        on_cpu: bool, only: tuple[str, ...] = (), train_cfg=None) -> None:
  n = batch * 2 * seq_len  # tokens through the model (TiDAR doubled sequence)
  groups = [("embed", "embedding gradient, TiDAR ids (second half = the mask id)",
             lambda: embed_grad_cases(n, cfg.vocab_size, cfg.d_model)),
            ("embed", "embedding gradient, uniform random ids",
             lambda: embed_grad_cases(n, cfg.vocab_size, cfg.d_model, tidar_ids=False)),
            ("lm_head", "LM head + cross-entropy, forward + backward", lambda: lm_head_cases(n, cfg.vocab_size, cfg.d_model))]
  if not on_cpu:  # cuDNN is GPU-only
    groups.append(("attention", "attention over the doubled sequence, forward + backward, one layer",
                   lambda: attention_cases(batch, seq_len, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, block)))
  if train_cfg is not None:
    groups.append(("optimizer", "parameter update (clipping + AdamW + add), all parameters",
                   lambda: optimizer_cases(cfg, train_cfg)))
  for key, group, make in groups:
    if only and key not in only:
      continue
    cases = make()
    # every case returns the same result: check each against the reference case (XLA's attention,
    # fp32 autodiff of the LM head, the first of the others)
    ref_fn, ref_args = list(cases.values())[-1 if key == "attention" else 0]
    reference = jax.tree.leaves(ref_fn(*ref_args)) if not deadline.spent() else None
    for name, (fn, args) in cases.items():
      label = {"group": group, "case": name, "tokens": n}
      if deadline.spent():
        rec.add({**label, "skipped": "time budget"})
        continue
      try:
        t, first = _time(fn, args, reps)
      except Exception as e:  # noqa: BLE001
        rec.add({**label, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(f"[train_levers] {group} / {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        continue
      err = None
      if reference is not None:
        got = jax.tree.leaves(fn(*args))
        err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                  / max(float(jnp.max(jnp.abs(b.astype(jnp.float32)))), 1e-30) for a, b in zip(got, reference))
      rec.add({**label, "ms": t * 1e3, "first_call_s": first, "max_rel_err_vs_reference": err})
      print(f"[train_levers] {group} / {name}: {t * 1e3:.2f} ms", flush=True)
    del cases


def render(result: dict[str, Any]) -> str:
  meta = result["meta"]
  def err(r):
    e = r.get("max_rel_err_vs_reference")
    return "" if e is None else f"{e:.1e}"

  rows = [[r["group"], r["case"], round(r["ms"], 2) if "ms" in r else (r.get("error") or r.get("skipped", ""))[:60],
           err(r)] for r in result["records"]]
  return (f"### train_levers ({meta.get('date', '?')})\n\n{common.meta_line(meta)}. {meta.get('shape', '')}; "
          f"median of {meta.get('reps', '?')}; results checked against the group's reference (attention: XLA "
          f"dense; LM head: fp32 autodiff; others: the first case), max |Δ| ÷ max |reference|.\n\n"
          + common.md_table(["piece", "variant", "ms", "max rel. Δ"], rows) + "\n")


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", default="1p5b")
  p.add_argument("--seq-len", type=int, default=2048)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--budget-s", type=float, default=0)
  p.add_argument("--only", default="", help="comma list of piece groups to run: embed, lm_head, attention, optimizer")


def measure_from_args(args: argparse.Namespace) -> dict[str, Any]:
  cfg = common.model_config(args.model)
  block = common.load_config(args.model).tidar.block_size
  if args.smoke:
    cfg = common.model_config("tiny")
    args.seq_len, args.batch, args.reps, block = 32, 1, 1, 8
  shape = (f"{args.model if not args.smoke else 'tiny'} shape: batch {args.batch} x 2 x seq_len {args.seq_len} = "
           f"{args.batch * 2 * args.seq_len} tokens, vocab {cfg.vocab_size}, d_model {cfg.d_model}, "
           f"{cfg.num_heads}/{cfg.num_kv_heads} heads, block {block}")
  rec = common.Recorder(args.out, {**common.device_info(), "reps": args.reps, "shape": shape})
  train_cfg = common.load_config("tiny" if args.smoke else args.model).train
  run(rec, batch=args.batch, seq_len=args.seq_len, cfg=cfg, block=block, reps=args.reps,
      deadline=common.Deadline(args.budget_s), on_cpu=jax.default_backend() == "cpu",
      only=tuple(x for x in args.only.split(",") if x), train_cfg=train_cfg)
  return rec.result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return common.cli(__doc__, add_args, measure_from_args, render, argv)


if __name__ == "__main__":
  main(sys.argv[1:])
