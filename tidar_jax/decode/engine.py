"""The decode step's transformer: the model's weights and math, laid out for a decode loop.

`Transformer` (model.py) keeps layer-stacked params for training. Inside a decode loop that layout
copies every layer's weights out of the stacked arrays on every step, and attention over a stacked
cache plus the new tokens becomes a split softmax of badly shaped kernels. Here, with the same
weights and math (tests/test_decode_engine.py):

  * `prepare_weights` re-lays the params out once, before the loop: one array per layer (the layer
    loop is unrolled and reads them in place), q/k/v fused into one matmul, gate/up into one, and
    q/k/v, o and down stored transposed ([d_out, d_in]) for the one-row step (`_matmul`);
  * `forward` first writes the step's T new keys/values into each layer's own cache buffer at every
    row's slots lengths[b] .. lengths[b] + T - 1 (in place), then runs ONE attention of the T
    queries over the cache: each sees the row's committed slots plus the step tokens its static
    [T, T] step mask allows. On a GPU that is the split-KV Pallas kernel
    (`split_kv_attention.py`), which splits the keys across programs; cuDNN and the dense einsum
    read a per-row [T, max_len] mask instead. `lengths` is left to the caller, who commits only
    what it accepted (the rest is overwritten next step);
  * on the split-KV path, everything between a step's q/k/v matmul and its o matmul -- norm scale,
    bias, qk-norm, RoPE, the cache write, attention and the split merge -- runs in Pallas kernels
    (`_fused_attention`), fewer launches per layer: two for a one-token step (AR,
    `one_token_attention.py`), three for a TiDAR step (`multi_token_attention.py`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax.attention import MASKED, auto_implementation
from tidar_jax.config import ModelConfig
from tidar_jax.decode import gemv, multi_token_attention, one_token_attention, split_kv_attention
from tidar_jax.decode.cache import KVCache, valid_slots, write_rows
from tidar_jax.model import fp32_logits, inverse_rms, rms_norm, rope, rope_cos_sin, rope_inv_freq


class Int8Matrix(NamedTuple):
  """W ~= q * scale: int8 values, one fp32 scale per output channel (cfg.decode_quant). q has W's
  layout: [d_in, d_out], or [d_out, d_in] for the matrices stored transposed."""

  q: jax.Array  # int8, W's layout
  scale: jax.Array  # [d_out] fp32


def quantize_int8(w: jax.Array) -> Int8Matrix:
  """Symmetric per-output-column int8: scale = max |W[:, j]| / 127, q = round(W / scale)."""
  w32 = w.astype(jnp.float32)
  scale = jnp.max(jnp.abs(w32), axis=0) / 127.0  # [d_out]
  scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero column stays zero
  return Int8Matrix(jnp.clip(jnp.round(w32 / scale[None, :]), -127, 127).astype(jnp.int8), scale)


Matrix = jax.Array | Int8Matrix


class LayerWeights(NamedTuple):
  """A `_t` matrix is stored transposed, [d_out, d_in]: a one-row step reads it as a row reduction
  (see `_matmul`). gate/up is not: its 72- and 272-row TiDAR matmuls were slower that way."""

  attn_norm: jax.Array  # [d_model]
  wqkv_t: Matrix  # [(heads + 2 * kv_heads) * head_dim, d_model]: q, then k, then v rows
  bqkv: jax.Array | None  # [(heads + 2 * kv_heads) * head_dim]; None without qkv_bias
  q_norm: jax.Array | None  # [head_dim]; None without qk_norm
  k_norm: jax.Array | None  # [head_dim]; None without qk_norm
  wo_t: Matrix  # [d_model, heads * head_dim]
  mlp_norm: jax.Array  # [d_model]
  wgu: Matrix  # [d_model, 2 * mlp_dim]: gate, then up columns
  wd_t: Matrix  # [d_model, mlp_dim]


class DecodeWeights(NamedTuple):
  layers: tuple[LayerWeights, ...]
  embed: jax.Array  # [vocab, d_model]
  final_norm: jax.Array  # [d_model]
  lm_head: jax.Array | None  # [d_model, vocab]; None: tied to `embed`


def prepare_weights(params: Any, cfg: ModelConfig) -> DecodeWeights:
  """`Transformer` params ({"params": ...}, boxed or not) -> DecodeWeights.

  Call it once before the decode loop (inside the same jit is fine): it copies the layer weights
  once, where the stacked layout costs a copy per step. Matrices (and the embedding, which the tied
  head reads as a matrix) are cast to the compute dtype here, as the model casts them at every use;
  norm gains stay as stored (rms_norm computes in fp32). cfg.decode_quant == "int8": the layer
  matrices become `Int8Matrix`es (the embedding and LM head stay in the compute dtype).
  """
  p = nn.unbox(params)["params"]
  lay, attn, mlp = p["layers"], p["layers"]["attn"], p["layers"]["mlp"]
  L, d, H, Hkv, D = cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  dt = cfg.compute_dtype
  wqkv = jnp.concatenate([attn["q"]["kernel"].reshape(L, d, H * D), attn["k"]["kernel"].reshape(L, d, Hkv * D),
                          attn["v"]["kernel"].reshape(L, d, Hkv * D)], axis=2).astype(dt)  # [L, d, (H+2Hkv)D]
  bqkv = None
  if cfg.qkv_bias:
    bqkv = jnp.concatenate([attn["q"]["bias"].reshape(L, H * D), attn["k"]["bias"].reshape(L, Hkv * D),
                            attn["v"]["bias"].reshape(L, Hkv * D)], axis=1).astype(dt)  # [L, (H+2Hkv)D]
  wo = attn["o"]["kernel"].reshape(L, H * D, d).astype(dt)
  wgu = jnp.concatenate([mlp["gate"]["kernel"], mlp["up"]["kernel"]], axis=2).astype(dt)  # [L, d, 2F]
  wd = mlp["down"]["kernel"].astype(dt)  # [L, F, d]

  def matrix(m: jax.Array, transposed: bool) -> Matrix:  # m [d_in, d_out]
    if cfg.decode_quant == "int8":
      q = quantize_int8(m)
      return Int8Matrix(q.q.T, q.scale) if transposed else q
    return m.T if transposed else m

  def layer(i: int) -> LayerWeights:
    return LayerWeights(
        attn_norm=lay["attn_norm"]["scale"][i], wqkv_t=matrix(wqkv[i], True),
        bqkv=None if bqkv is None else bqkv[i],
        q_norm=attn["q_norm"]["scale"][i] if cfg.qk_norm else None,
        k_norm=attn["k_norm"]["scale"][i] if cfg.qk_norm else None,
        wo_t=matrix(wo[i], True), mlp_norm=lay["mlp_norm"]["scale"][i], wgu=matrix(wgu[i], False),
        wd_t=matrix(wd[i], True))

  head = None if cfg.tie_embeddings else p["lm_head"]["kernel"].astype(dt)
  return DecodeWeights(tuple(layer(i) for i in range(L)), p["embed"]["embedding"].astype(dt),
                       p["final_norm"]["scale"], head)


def step_attention_mask(cache: KVCache, step_mask: np.ndarray) -> jax.Array:
  """[batch, T, max_len] bool: new token t may read the row's committed slots (< lengths[b]) and
  the slot lengths[b] + j of new token j where step_mask[t, j]."""
  T = step_mask.shape[0]

  def own_slots(offset: jax.Array) -> jax.Array:  # [T, max_len]
    return jax.lax.dynamic_update_slice(jnp.zeros((T, cache.max_len), bool), jnp.asarray(step_mask), (0, offset))

  return valid_slots(cache)[:, None, :] | jax.vmap(own_slots)(cache.lengths)


KERNELS = ("dense", "cudnn", "split_kv")


# "auto" takes the split-KV kernel for steps of up to SPLIT_KV_MAX_ROWS tokens over the whole batch:
# it beats cuDNN where cuDNN's (batch x heads x query tiles) grid leaves SMs idle and, with the
# fused attention block around it, up to the largest step timed (batch 8 x k=16's 8 x 272 rows).
SPLIT_KV_MAX_ROWS = 2176


def attention_kernel(setting: str, dtype: Any, step_mask: np.ndarray, max_len: int, batch: int) -> str:
  """cfg.attention -> the step attention: "auto" is, on a GPU in 16-bit dtypes, the split-KV kernel
  where it applies (the step mask has an interval form, max_len % 16 == 0) and pays (batch x T <=
  SPLIT_KV_MAX_ROWS), cuDNN otherwise; off the GPU it is always the dense einsum (cuDNN has no CPU
  kernel; Triton neither)."""
  if setting == "auto":
    T = step_mask.shape[0]
    if (auto_implementation(dtype) == "cudnn" and batch * T <= SPLIT_KV_MAX_ROWS
        and split_kv_attention.supported(step_mask, max_len)):
      return "split_kv"
    return "cudnn" if auto_implementation(dtype) == "cudnn" else "dense"  # TPU: the XLA einsum
  return "cudnn" if setting == "cudnn" and jax.default_backend() == "gpu" else "dense"


def _attend(q: jax.Array, k_buf: jax.Array, v_buf: jax.Array, lengths: jax.Array, step_mask: np.ndarray,
            mask: jax.Array | None, kernel: str) -> jax.Array:
  """q [batch, T, heads, head_dim] over the cache [batch, max_len, kv_heads, head_dim] (GQA) ->
  [batch, T, heads, head_dim]. mask [batch, T, max_len] (`step_attention_mask`) for cuDNN and
  dense; the split-KV kernel derives it from lengths and step_mask itself (mask None)."""
  if kernel == "split_kv":
    return split_kv_attention.step_attention(q, k_buf, v_buf, lengths, step_mask)
  if kernel == "cudnn":
    return jax.nn.dot_product_attention(q, k_buf, v_buf, mask=mask[:, None], implementation="cudnn")
  B, T, H, D = q.shape
  Hkv = k_buf.shape[2]
  q_BTKGD = q.reshape(B, T, Hkv, H // Hkv, D)
  s_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_buf, preferred_element_type=jnp.float32) * D**-0.5
  s_BKGTS = jnp.where(mask[:, None, None], s_BKGTS, MASKED)
  p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_buf.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", p_BKGTS, v_buf).reshape(B, T, H, D)


def _matmul(x: jax.Array, w: Matrix, transposed: bool = False) -> jax.Array:
  """x [..., d_in] @ W -> [..., d_out] in x's dtype (fp32 accumulation); w is W [d_in, d_out], or
  W^T [d_out, d_in] when `transposed`.

  One row against W^T (the batch-1 AR step) is a multiply + row reduction: XLA's row-reduction
  kernel streams the weight near the copy rate, faster than its one-row GEMV fusion, a padded GEMM
  or a reduction over W [d_in, d_out]. More rows go to a GEMM, which reads either layout. One row
  against an int8 matrix goes to `gemv.gemv` on a GPU (XLA's int8 row reduction streams at about
  half its bf16 byte rate).
  """
  rows = int(np.prod(x.shape[:-1]))
  spec = "...k,nk->...n" if transposed else "...k,kn->...n"
  int8 = isinstance(w, Int8Matrix)  # the int8 -> compute-dtype convert and the scale fuse into the kernel
  m = w.q if int8 else w
  if int8 and rows == 1 and gemv.use():
    return gemv.gemv(x.reshape(-1), w.q, w.scale, transposed=transposed).astype(x.dtype).reshape(*x.shape[:-1], -1)
  if transposed and rows == 1:
    y = jnp.sum(x.reshape(1, -1).astype(jnp.float32) * m.astype(jnp.float32), axis=1)  # [d_out]
  elif int8:
    y = jnp.einsum(spec, x, m.astype(x.dtype), preferred_element_type=jnp.float32)
  else:  # output in x's dtype: an fp32 GEMM output converted afterwards is an extra pass (measured slower)
    y = jnp.einsum(spec, x, m)
  if int8:
    y = y * w.scale.reshape((1,) * (y.ndim - 1) + (-1,))
  return y.astype(x.dtype).reshape(*x.shape[:-1], -1)


def _normed_matmul(x: jax.Array, gain: jax.Array, cfg: ModelConfig, w: Matrix, transposed: bool
                   ) -> tuple[jax.Array, jax.Array | None]:
  """rms_norm(x, gain) @ W as (y, inv_rms): at one row y = (x * gain) @ W and inv_rms = 1 / rms(x)
  [..., 1] (fp32) is the caller's to apply -- the same product, but the normalised vector is never
  written out: XLA fuses x * gain into the matmul and the scale into its consumer (two kernels
  fewer per layer). More rows: y is normalised, inv_rms None."""
  if int(np.prod(x.shape[:-1])) != 1:
    with jax.named_scope("norm"):
      h = rms_norm(x, gain, cfg.norm_eps, cfg.compute_dtype)
    return _matmul(h, w, transposed), None
  with jax.named_scope("norm"):
    x32 = x.astype(jnp.float32)
    inv_rms = inverse_rms(x32, cfg.norm_eps)  # [..., 1]
    xg = x32 * gain.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
  return _matmul(xg if transposed else xg.astype(cfg.compute_dtype), w, transposed), inv_rms


def _normed(y: jax.Array, inv_rms: jax.Array | None, cfg: ModelConfig) -> jax.Array:
  """`_normed_matmul`'s product with its norm scale applied, in the compute dtype."""
  if inv_rms is None:
    return y
  return (y.astype(jnp.float32) * inv_rms).astype(cfg.compute_dtype)


def _qkv(lw: LayerWeights, cfg: ModelConfig, x: jax.Array, positions: jax.Array
         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Residual stream [batch, T, d_model] -> q [batch, T, heads, head_dim], k, v [batch, T, kv_heads,
  head_dim], with the attention norm, qk-norm and RoPE applied as in the model."""
  B, T, _ = x.shape
  H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  # One matmul instead of three: [batch, T, (H + 2 Hkv) D]
  qkv = _normed(*_normed_matmul(x, lw.attn_norm, cfg, lw.wqkv_t, transposed=True), cfg)
  if lw.bqkv is not None:
    qkv = qkv + lw.bqkv[None, None, :]
  q, k, v = jnp.split(qkv, [H * D, (H + Hkv) * D], axis=-1)
  q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, Hkv, D), v.reshape(B, T, Hkv, D)
  if lw.q_norm is not None:  # Qwen3: per-head RMSNorm before RoPE
    q = rms_norm(q, lw.q_norm, cfg.norm_eps, cfg.compute_dtype)
    k = rms_norm(k, lw.k_norm, cfg.norm_eps, cfg.compute_dtype)
  inv_freq = rope_inv_freq(cfg)
  return rope(q, positions, inv_freq), rope(k, positions, inv_freq), v


def _fused_attention(lw: LayerWeights, cfg: ModelConfig, x: jax.Array, cos_sin: tuple[jax.Array, jax.Array],
                     k_buf: jax.Array, v_buf: jax.Array, lengths: jax.Array, step_mask: np.ndarray
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`_qkv`, the cache write and the attention of a step, with everything after the q/k/v matmul in
  Pallas kernels: `one_token_attention`'s two at T = 1, `multi_token_attention`'s three at T > 1.
  x [batch, T, d_model] -> ([batch, T, heads * head_dim], k_buf, v_buf)."""
  T = x.shape[1]
  with jax.named_scope("attn/qkv"):
    qkv, inv_rms = _normed_matmul(x, lw.attn_norm, cfg, lw.wqkv_t, transposed=True)  # [batch, T, (H+2Hkv)D]
  with jax.named_scope("attn/core"):
    proj = one_token_attention.Projection(None if inv_rms is None else x[:, 0], lw.bqkv, lw.q_norm, lw.k_norm)
    if T == 1:
      out, k_buf, v_buf = one_token_attention.attend(qkv[:, 0], proj, cfg.compute_dtype, *cos_sin, k_buf, v_buf,
                                                     lengths, heads=cfg.num_heads, eps=cfg.norm_eps)
      return out[:, None], k_buf, v_buf
    return multi_token_attention.attend(qkv, proj, cfg.compute_dtype, *cos_sin, k_buf, v_buf, lengths, step_mask,
                                        heads=cfg.num_heads, eps=cfg.norm_eps)


def fused_attention(cfg: ModelConfig, step_mask: np.ndarray, max_len: int) -> bool:
  """Whether a step on the split-KV path runs its attention block fused (`_fused_attention`)."""
  if step_mask.shape[0] == 1:
    return one_token_attention.supported(cfg.head_dim, cfg.num_heads // cfg.num_kv_heads, max_len)
  return multi_token_attention.supported(cfg.head_dim, step_mask, max_len)


def _layer(lw: LayerWeights, cfg: ModelConfig, x: jax.Array, positions: jax.Array, k_buf: jax.Array,
           v_buf: jax.Array, lengths: jax.Array, step_mask: np.ndarray, mask: jax.Array | None, kernel: str,
           cos_sin: tuple[jax.Array, jax.Array] | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One pre-norm block over x [batch, T, d_model]; returns (x, k_buf, v_buf) with the T new
  keys/values written at slots lengths[b] .. + T - 1. cos_sin: the step's RoPE tables,
  given when it takes `_fused_attention`."""
  B, T, _ = x.shape
  if cos_sin is not None:
    out, k_buf, v_buf = _fused_attention(lw, cfg, x, cos_sin, k_buf, v_buf, lengths, step_mask)
  else:
    with jax.named_scope("attn/qkv"):
      q, k, v = _qkv(lw, cfg, x, positions)
    with jax.named_scope("cache_write"):  # before attending: the new tokens are read from the cache
      k_buf, v_buf = write_rows(k_buf, k, lengths), write_rows(v_buf, v, lengths)
    with jax.named_scope("attn/core"):
      out = _attend(q, k_buf, v_buf, lengths, step_mask, mask, kernel)  # [batch, T, heads, head_dim]
  with jax.named_scope("attn/o"):
    x = x + _matmul(out.reshape(B, T, -1), lw.wo_t, transposed=True)
  with jax.named_scope("mlp"):  # gate/up: one matmul instead of two, [batch, T, mlp_dim] each
    gate, up = jnp.split(_normed(*_normed_matmul(x, lw.mlp_norm, cfg, lw.wgu, transposed=False), cfg), 2, axis=-1)
    x = x + _matmul(jax.nn.silu(gate) * up, lw.wd_t, transposed=True)
  return x, k_buf, v_buf


def forward(w: DecodeWeights, cfg: ModelConfig, cache: KVCache, tokens: jax.Array, positions: jax.Array,
            step_mask: np.ndarray, attention: str | None = None) -> tuple[jax.Array, KVCache]:
  """One decode step over T new tokens per row.

  tokens, positions: [batch, T]. step_mask: [T, T] static numpy, which new tokens each new token
  sees (AR: [[True]]; TiDAR: `masks.decode_step_mask(k)`). Every new token also sees its row's
  committed slots. Returns (final-normed hidden [batch, T, d_model], the cache with every layer's
  T new keys/values written at slots lengths[b] .. lengths[b] + T - 1 and `lengths` unchanged).
  The caller guarantees lengths + T <= max_len (the host check of `loop.check_request`).
  `attention`: one of KERNELS, overriding cfg.attention's choice (tests run the split-KV kernel
  interpreted on CPU this way).
  """
  kernel = attention or attention_kernel(cfg.attention, cfg.compute_dtype, step_mask, cache.max_len,
                                         tokens.shape[0])
  if kernel not in KERNELS:
    raise ValueError(f"attention={kernel!r}: use one of {list(KERNELS)}")
  mask = None if kernel == "split_kv" else step_attention_mask(cache, step_mask)  # [batch, T, max_len]
  cos_sin = None  # the fused attention block's RoPE tables, shared by every layer
  if kernel == "split_kv" and fused_attention(cfg, step_mask, cache.max_len):
    # [batch, head_dim / 2] each at one token, [batch, T, head_dim / 2] at more
    cos_sin = rope_cos_sin(positions[:, 0] if tokens.shape[1] == 1 else positions, rope_inv_freq(cfg))
  x = jnp.take(w.embed, tokens, axis=0)  # [batch, T, d_model]
  new_k, new_v = [], []
  for lw, k_buf, v_buf in zip(w.layers, cache.k, cache.v):  # unrolled: each layer reads its own arrays
    x, k_buf, v_buf = _layer(lw, cfg, x, positions, k_buf, v_buf, cache.lengths, step_mask, mask, kernel, cos_sin)
    new_k.append(k_buf)
    new_v.append(v_buf)
  with jax.named_scope("final_norm"):
    h = rms_norm(x, w.final_norm, cfg.norm_eps, cfg.compute_dtype)
  return h, KVCache(tuple(new_k), tuple(new_v), cache.lengths)


def logits(w: DecodeWeights, hidden: jax.Array) -> jax.Array:
  """LM head: [..., d_model] final-normed hidden -> [..., vocab] fp32 logits (run it only on the
  rows you need)."""
  with jax.named_scope("logits"):
    if w.lm_head is None:
      return fp32_logits(hidden, w.embed, True)
    return fp32_logits(hidden, w.lm_head, False)
