"""The mask half of TiDAR's training attention, computed by its structure.

A mask token of block b sees the clean tokens before its block and the mask tokens of its own block
(docs/method.md §1), in one softmax. Split along that line:

* the prefix part, mask-half queries over the clean keys, is a subset of the causal triangle (key
  j < b·k <= query i), so a flash kernel in causal mode skips the tiles above the diagonal and a
  bias masks the rest: ~L²/2 scores per row, no key copies;
* the own-block part is [L/k, k, k] scores;

and the two are merged by their log-sum-exps. The backward of a merged softmax is each part's flash
backward run with the merged output and log-sum-exp (so rowsum(dout · out) and exp(s - lse) are the
joint ones), which is why the prefix part needs a kernel whose backward takes them
(`kernels.cudnn_attention`) and why this is one custom VJP.

With cuDNN the own part and the merge are Pallas kernels (`kernels.own_block_attention`: XLA runs
[L/k, k, k] products and the merge's passes at a few percent of the card); elsewhere they are the
einsums and elementwise ops below, the kernels' reference.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from tidar_jax import masks
from tidar_jax.kernels import own_block_attention
from tidar_jax.masks import MASKED


class Core(NamedTuple):
  """Attention over keys a static [q_len, k_len] mask allows, as a flash kernel's two halves.
  forward(q, k, v, allowed, scale) -> (out [B, T, H, D], lse [B, H, T] fp32);
  backward(q, k, v, allowed, scale, out, lse, dout) -> (dq, dk, dv), with out/lse those of the
  softmax the keys belong to (possibly merged with other keys)."""
  forward: Callable[..., tuple[jax.Array, jax.Array]]
  backward: Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


def _scores(q, k, allowed, scale):  # -> [batch, kv_heads, group, q_len, k_len] fp32
  B, T, H, D = q.shape
  Hkv = k.shape[2]
  qg = q.reshape(B, T, Hkv, H // Hkv, D)
  s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  return jnp.where(jnp.asarray(allowed), s, MASKED)


def dense_forward(q, k, v, allowed, scale):
  B, T, H, D = q.shape
  s = _scores(q, k, allowed, scale)
  lse = jax.nn.logsumexp(s, axis=-1)  # [batch, kv_heads, group, q_len]
  p = jnp.exp(s - lse[..., None])
  out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
  return out.reshape(B, T, H, D).astype(q.dtype), lse.reshape(B, H, T)


def dense_backward(q, k, v, allowed, scale, out, lse, dout):
  B, T, H, D = q.shape
  Hkv = k.shape[2]
  G = H // Hkv
  f32 = jnp.float32
  p = jnp.exp(_scores(q, k, allowed, scale) - lse.reshape(B, Hkv, G, T)[..., None])  # [B, Hkv, G, T, S]
  do = dout.reshape(B, T, Hkv, G, D).astype(f32)
  delta = jnp.einsum("btkgd,btkgd->bkgt", do, out.reshape(B, T, Hkv, G, D).astype(f32))
  dp = jnp.einsum("btkgd,bskd->bkgts", do, v.astype(f32))
  ds = p * (dp - delta[..., None]) * scale
  dq = jnp.einsum("bkgts,bskd->btkgd", ds, k.astype(f32)).reshape(B, T, H, D)
  dk = jnp.einsum("bkgts,btkgd->bskd", ds, q.reshape(B, T, Hkv, G, D).astype(f32))
  dv = jnp.einsum("bkgts,btkgd->bskd", p, do)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


DENSE = Core(dense_forward, dense_backward)


def _core(implementation: str) -> Core:
  if implementation == "cudnn":
    from tidar_jax.kernels import cudnn_attention  # jax's cuDNN internals: imported only where used
    return Core(cudnn_attention.forward, cudnn_attention.backward)
  return DENSE


def _own_tile(L: int, block_size: int, head_dim: int, implementation: str) -> int | None:
  """The own-block kernel's tile, or None for the XLA path (no cuDNN, or shapes it does not take)."""
  if implementation != "cudnn":
    return None
  return own_block_attention.tile_for(L, block_size, head_dim)


def _blocks(x: jax.Array, k: int) -> jax.Array:  # [B, L, ...] -> [B * L/k, k, ...]: one batch entry a block
  return x.reshape((x.shape[0] * (x.shape[1] // k), k) + x.shape[2:])


def _unblocks(x: jax.Array, batch: int) -> jax.Array:  # the inverse of `_blocks`
  return x.reshape((batch, -1) + x.shape[2:])


def _lse_blocks(lse: jax.Array, k: int) -> jax.Array:  # [B, H, L] -> [B * L/k, H, k]
  B, H, L = lse.shape
  return lse.reshape(B, H, L // k, k).transpose(0, 2, 1, 3).reshape(B * (L // k), H, k)


def _lse_unblocks(lse: jax.Array, batch: int) -> jax.Array:  # [B * n, H, k] -> [B, H, n * k]
  n, H, k = lse.shape[0] // batch, lse.shape[1], lse.shape[2]
  return lse.reshape(batch, n, H, k).transpose(0, 2, 1, 3).reshape(batch, H, n * k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def attention(q: jax.Array,  # [batch, L, heads, head_dim] the mask half's queries
              kc: jax.Array,  # [batch, L, kv_heads, head_dim] the clean half's keys
              vc: jax.Array,  # [batch, L, kv_heads, head_dim]
              km: jax.Array,  # [batch, L, kv_heads, head_dim] the mask half's keys
              vm: jax.Array,  # [batch, L, kv_heads, head_dim]
              block_size: int, implementation: str) -> jax.Array:  # [batch, L, heads, head_dim]
  """The mask half's attention output under the training mask; `implementation` picks the prefix
  part's kernel ("cudnn", else dense einsums)."""
  return _forward(q, kc, vc, km, vm, block_size, implementation)[0]


def _forward(q, kc, vc, km, vm, block_size, implementation):
  B, L, H, D = q.shape
  scale = D**-0.5
  prefix, own = masks.training_blocks(L, block_size, block_size)
  o_pre, lse_pre = _core(implementation).forward(q, kc, vc, prefix, scale)
  tile = _own_tile(L, block_size, D, implementation)
  if tile is not None:
    out, lse = own_block_attention.forward(q, km, vm, o_pre, lse_pre, block_size, tile)
    return out, (q, kc, vc, km, vm, out, lse)
  k = block_size
  o_own, lse_own = DENSE.forward(_blocks(q, k), _blocks(km, k), _blocks(vm, k), own, scale)
  o_own, lse_own = _unblocks(o_own, B), _lse_unblocks(lse_own, B)
  lse = jnp.logaddexp(lse_pre, lse_own)  # [batch, heads, L]
  # a row of block 0 sees no clean key: its prefix lse is hugely negative and its weight exactly 0
  w_pre = jnp.exp(lse_pre - lse).transpose(0, 2, 1)[..., None]  # [batch, L, heads, 1]
  w_own = jnp.exp(lse_own - lse).transpose(0, 2, 1)[..., None]
  out = (w_pre * o_pre.astype(jnp.float32) + w_own * o_own.astype(jnp.float32)).astype(q.dtype)
  return out, (q, kc, vc, km, vm, out, lse)


def _backward(block_size, implementation, res, dout):
  q, kc, vc, km, vm, out, lse = res
  B, L, H, D = q.shape
  scale = D**-0.5
  prefix, own = masks.training_blocks(L, block_size, block_size)
  dq_pre, dkc, dvc = _core(implementation).backward(q, kc, vc, prefix, scale, out, lse, dout)
  tile = _own_tile(L, block_size, D, implementation)
  if tile is not None:
    dq, dkm, dvm = own_block_attention.backward(q, km, vm, out, lse, dout, dq_pre, block_size, tile)
    return dq, dkc, dvc, dkm, dvm
  k = block_size
  dq_own, dkm, dvm = DENSE.backward(*(_blocks(x, k) for x in (q, km, vm)), own, scale, _blocks(out, k),
                                    _lse_blocks(lse, k), _blocks(dout, k))
  dq = (dq_pre.astype(jnp.float32) + _unblocks(dq_own, B).astype(jnp.float32)).astype(q.dtype)
  return dq, dkc, dvc, _unblocks(dkm, B), _unblocks(dvm, B)


attention.defvjp(_forward, _backward)
