"""Llama/Qwen-family decoder-only transformer in flax.linen.

Pure `init`/`apply`; no training, data or decoding logic. The KV cache is an explicit read-only
argument: `apply` returns the new tokens' keys/values and the caller decides which to keep
(a TiDAR step keeps only its k verification tokens), so the cache is never copied by the model.

    logits, new_kv = model.apply(params, tokens, positions, mask, cache)
    hidden, new_kv = model.apply(params, tokens, positions, mask, cache, return_hidden=True)
    logits = model.apply(params, hidden, method=Transformer.logits)   # LM head on chosen rows

Parameters are stored layer-stacked ([layers, ...]) in both scanned and unrolled modes, so one
checkpoint layout serves both (`scan_layers=False` fully unrolls the same scan).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax.attention import dot_product_attention
from tidar_jax.config import ModelConfig


class LayerKV(NamedTuple):
  """Keys/values of the new tokens, stacked over layers."""

  k: jax.Array  # [layers, batch, q_len, kv_heads, head_dim]
  v: jax.Array  # [layers, batch, q_len, kv_heads, head_dim]


def _init(init_fn, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(init_fn, axes)


def default_inv_freq(head_dim: int, theta: float) -> np.ndarray:
  """[head_dim / 2] fp32: 1 / theta^(2i / head_dim), computed in fp32 as transformers does."""
  return (np.float32(1.0) / np.float32(theta) ** (np.arange(0, head_dim, 2).astype(np.float32) / head_dim))


def rope_inv_freq(c: ModelConfig) -> np.ndarray:
  """[head_dim / 2] fp32 RoPE inverse frequencies of `c` (static: numpy, once per trace).

  "default": theta^(-2i / head_dim). "linear": those / rope_factor (positions scaled down).
  "llama3" (Llama 3.1+): wavelengths longer than rope_original_max_position / rope_low_freq_factor
  are scaled by 1 / rope_factor, shorter than rope_original_max_position / rope_high_freq_factor
  kept, and those between interpolated by original_max / wavelength -- transformers'
  `rope_type="llama3"`, so converted Llama 3.1/3.2 checkpoints keep their positions.
  """
  inv_freq = default_inv_freq(c.head_dim, c.rope_theta)
  if c.rope_type == "linear":
    return (inv_freq / np.float32(c.rope_factor)).astype(np.float32)
  if c.rope_type == "llama3":
    wavelen = 2 * np.pi / inv_freq
    low_wavelen = c.rope_original_max_position / c.rope_low_freq_factor  # longer: fully scaled
    high_wavelen = c.rope_original_max_position / c.rope_high_freq_factor  # shorter: kept
    smooth = ((c.rope_original_max_position / wavelen - c.rope_low_freq_factor)
              / (c.rope_high_freq_factor - c.rope_low_freq_factor))  # 0 at low_wavelen, 1 at high_wavelen
    between = (1 - smooth) * inv_freq / c.rope_factor + smooth * inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / c.rope_factor, inv_freq)
    return np.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), between, scaled).astype(np.float32)
  return inv_freq


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """positions [...] int, inv_freq [D/2] (`rope_inv_freq`) -> (cos, sin) [..., D/2] fp32 of RoPE's
  rotation angles."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq).reshape((1,) * positions.ndim + (-1,))
  return jnp.cos(angles), jnp.sin(angles)


def rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotary embedding, half-rotation layout (Llama/Qwen `rotate_half`).

  x: [batch, q_len, heads, head_dim]; positions: [batch, q_len] int; inv_freq [head_dim / 2].
  """
  return apply_rope(x, *rope_cos_sin(positions, inv_freq))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [batch, q_len, heads, head_dim] rotated by the angles' cos, sin [batch, q_len, head_dim / 2]
  (`rope_cos_sin`), half-rotation layout; computed in fp32, returned in x's dtype."""
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def inverse_rms(x32: jax.Array, eps: float) -> jax.Array:
  """1 / rms over the last axis of an fp32 x [..., d] -> [..., 1]."""
  return jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype: Any) -> jax.Array:
  """x / rms(x) * scale over the last axis, computed in fp32, returned in `dtype`."""
  x32 = x.astype(jnp.float32)
  y = x32 * inverse_rms(x32, eps)
  return (y * scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))).astype(dtype)


def fp32_logits(hidden: jax.Array, table: jax.Array, vocab_major: bool) -> jax.Array:
  """[..., d_model] @ the head table ([vocab, d_model] if vocab_major (tied) else [d_model, vocab])
  -> [..., vocab] logits, accumulated and returned in fp32 (the forward of `lm_head_logits`; what
  inference calls, with no VJP rule around it)."""
  spec = "...d,vd->...v" if vocab_major else "...d,dv->...v"
  return jnp.einsum(spec, hidden, table, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def lm_head_logits(hidden: jax.Array, table: jax.Array, vocab_major: bool) -> jax.Array:
  """`fp32_logits` for training: [..., d_model] -> [..., vocab] fp32 logits.

  The backward casts the fp32 logits' cotangent to the compute dtype first. Left to autodiff, both
  backward matmuls of the [tokens, vocab] cotangent would run in fp32 (TF32 GEMMs on a GPU); in
  bf16 they run at the bf16 rate, with fp32 accumulation, as every other matmul of the step does.
  """
  return fp32_logits(hidden, table, vocab_major)


def _lm_head_fwd(hidden, table, vocab_major):
  return fp32_logits(hidden, table, vocab_major), (hidden, table)


def _lm_head_bwd(vocab_major, res, g):  # g [..., vocab] fp32
  hidden, table = res
  g = g.astype(hidden.dtype)
  f32 = jnp.float32
  if vocab_major:
    d_hidden = jnp.einsum("...v,vd->...d", g, table, preferred_element_type=f32)
    d_table = jnp.einsum("...v,...d->vd", g, hidden, preferred_element_type=f32)
  else:
    d_hidden = jnp.einsum("...v,dv->...d", g, table, preferred_element_type=f32)
    d_table = jnp.einsum("...d,...v->dv", hidden, g, preferred_element_type=f32)
  return d_hidden.astype(hidden.dtype), d_table.astype(table.dtype)


lm_head_logits.defvjp(_lm_head_fwd, _lm_head_bwd)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  param_dtype: Any
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", _init(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],),
                       self.param_dtype)
    return rms_norm(x, scale, self.eps, self.dtype)


class Proj(nn.Module):
  """x[..., *in] @ kernel[*in, *out] (+ bias[*out]); params created in their true shape.

  (flax's DenseGeneral initialises a flattened kernel and reshapes it, which breaks logical
  partitioning boxes of rank > 2 under an active mesh.)
  """

  features: tuple[int, ...]
  contract: int  # trailing input dims contracted
  kernel_axes: tuple[str, ...]
  bias_axes: tuple[str, ...] | None
  cfg: ModelConfig
  fp32_out: bool = False  # accumulate and return fp32 (the LM head: logits stay fp32)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.cfg
    in_shape = x.shape[x.ndim - self.contract:]
    kernel = self.param("kernel", _init(nn.initializers.normal(0.02), self.kernel_axes),
                        in_shape + self.features, c.weight_dtype)
    n = self.contract
    if self.fp32_out:  # the untied LM head
      assert n == 1 and len(self.features) == 1, "fp32_out is the LM head's [d_model, vocab] matmul"
      y = lm_head_logits(x.astype(c.compute_dtype), kernel.astype(c.compute_dtype), False)
    else:
      dims = ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ()))
      y = jax.lax.dot_general(x.astype(c.compute_dtype), kernel.astype(c.compute_dtype), dims)
    if self.bias_axes is not None:
      bias = self.param("bias", _init(nn.initializers.zeros, self.bias_axes), self.features, c.weight_dtype)
      y = y + bias.astype(c.compute_dtype).reshape((1,) * (y.ndim - len(self.features)) + self.features)
    return y


def _dense(features, axis, kernel_axes, name, cfg: ModelConfig, bias_axes=None, fp32_out=False):
  features = features if isinstance(features, tuple) else (features,)
  contract = len(axis) if isinstance(axis, tuple) else 1
  return Proj(features, contract, kernel_axes, bias_axes, cfg, fp32_out, name=name)


class Attention(nn.Module):
  cfg: ModelConfig
  tidar_block: int = 0  # see Transformer.tidar_block

  @nn.compact
  def __call__(self, x, positions, mask, cache_k, cache_v, cache_lengths):
    c = self.cfg
    qkv_bias = ("heads", "head_dim") if c.qkv_bias else None
    kv_bias = ("kv_heads", "head_dim") if c.qkv_bias else None
    q = _dense((c.num_heads, c.head_dim), -1, ("embed", "heads", "head_dim"), "q", c, qkv_bias)(x)
    k = _dense((c.num_kv_heads, c.head_dim), -1, ("embed", "kv_heads", "head_dim"), "k", c, kv_bias)(x)
    v = _dense((c.num_kv_heads, c.head_dim), -1, ("embed", "kv_heads", "head_dim"), "v", c, kv_bias)(x)
    if c.qk_norm:  # Qwen3: per-head RMSNorm before RoPE
      q = RMSNorm(c.norm_eps, c.compute_dtype, c.weight_dtype, "head_dim", name="q_norm")(q)
      k = RMSNorm(c.norm_eps, c.compute_dtype, c.weight_dtype, "head_dim", name="k_norm")(k)
    inv_freq = rope_inv_freq(c)
    q = rope(q, positions, inv_freq)  # [batch, q_len, heads, head_dim]
    k = rope(k, positions, inv_freq)  # [batch, q_len, kv_heads, head_dim]
    out = dot_product_attention(q, k, v, mask, cache_k, cache_v, cache_lengths, c.attention, self.tidar_block)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
    y = _dense(c.d_model, (-2, -1), ("heads", "head_dim", "embed"), "o", c)(out)
    return y, (k, v)


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    gate = _dense(c.mlp_dim, -1, ("embed", "mlp"), "gate", c)(x)
    up = _dense(c.mlp_dim, -1, ("embed", "mlp"), "up", c)(x)
    h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    return _dense(c.d_model, -1, ("mlp", "embed"), "down", c)(h)


class Block(nn.Module):
  """Pre-norm block; the scan body. Carry: x. Per-layer input: this layer's cache slice."""

  cfg: ModelConfig
  tidar_block: int = 0  # see Transformer.tidar_block

  @nn.compact
  def __call__(self, x, positions, mask, cache_lengths, layer_cache):
    c = self.cfg
    cache_k, cache_v = layer_cache if layer_cache is not None else (None, None)
    h = RMSNorm(c.norm_eps, c.compute_dtype, c.weight_dtype, name="attn_norm")(x)
    a, new_kv = Attention(c, self.tidar_block, name="attn")(h, positions, mask, cache_k, cache_v, cache_lengths)
    x = x + a
    h = RMSNorm(c.norm_eps, c.compute_dtype, c.weight_dtype, name="mlp_norm")(x)
    x = x + MLP(c, name="mlp")(h)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, new_kv


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nn.Module):
  """cfg: the architecture. tidar_block > 0: every input is the TiDAR training sequence
  `[x_0..x_{L-1}, M..M]` with draft block size `tidar_block`, attention follows
  `masks.training_mask(L, tidar_block)` computing only the blocks it allows, and `mask` must be
  None. tidar_block = 0: attention follows the given `mask`; mask=None without a cache is causal
  attention in the kernel's causal mode (AR training: no [L, L] mask array, half the tiles)."""

  cfg: ModelConfig
  tidar_block: int = 0

  def setup(self):
    c = self.cfg
    self.embed = nn.Embed(
        c.vocab_size, c.d_model, dtype=c.compute_dtype, param_dtype=c.weight_dtype,
        embedding_init=_init(nn.initializers.normal(0.02), ("vocab", "embed")), name="embed")
    block = Block if c.remat == "none" else nn.remat(Block, policy=_REMAT[c.remat], prevent_cse=False)
    self.layers = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
        length=c.num_layers,
        unroll=1 if c.scan_layers else c.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(c, self.tidar_block, name="layers")
    self.final_norm = RMSNorm(c.norm_eps, c.compute_dtype, c.weight_dtype, name="final_norm")
    if not c.tie_embeddings:
      self.lm_head = _dense(c.vocab_size, -1, ("embed", "vocab"), "lm_head", c, fp32_out=True)

  def __call__(
      self,
      tokens: jax.Array,  # [batch, q_len] int32
      positions: jax.Array,  # [batch, q_len] int32
      mask: jax.Array | None,  # [batch or 1, q_len, q_len] bool among the new tokens; None: the TiDAR
                               # training mask (tidar_block > 0), else causal (no cache)
      cache: Any = None,  # object with .k/.v [layers, batch, max_len, kv_heads, head_dim], .lengths [batch]
      return_hidden: bool = False,
  ) -> tuple[jax.Array, LayerKV]:
    """Returns (logits [batch, q_len, vocab] fp32, or final-normed hidden) and the new tokens' K/V."""
    if self.tidar_block and mask is not None:
      raise ValueError("a model built with tidar_block > 0 attends by the TiDAR training mask (the "
                       "structured training attention): pass mask=None")
    if mask is not None and mask.ndim == 2:
      mask = mask[None]
    # Gather from the master-dtype table, then cast: nn.Embed(dtype=bf16) would cast the whole
    # table first, making the backward a bf16 scatter-add in which the TiDAR mask half piles
    # thousands of updates onto the one <|mask|> row (a large share of a train step).
    x = jnp.take(self.embed.embedding, tokens, axis=0).astype(self.cfg.compute_dtype)  # [batch, q_len, d_model]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    if cache is None:
      layer_cache, lengths = None, None
    else:
      layer_cache, lengths = (cache.k, cache.v), cache.lengths
    x, (k, v) = self.layers(x, positions, mask, lengths, layer_cache)
    h = self.final_norm(x)
    if return_hidden:
      return h, LayerKV(k, v)
    return self.logits(h), LayerKV(k, v)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """LM head: [..., d_model] -> [..., vocab] fp32 (apply it only to the rows you need)."""
    if self.cfg.tie_embeddings:
      table = jnp.asarray(self.embed.embedding, self.cfg.compute_dtype)  # [vocab, d_model]
      return lm_head_logits(hidden, table, True)
    return self.lm_head(hidden)


def head_table(cfg: ModelConfig, params: Any) -> tuple[jax.Array, bool]:
  """The LM head's matrix, as `Transformer.logits` uses it, from (boxed or plain) params: (table in the
  compute dtype, vocab_major) — [vocab, d_model] for a tied embedding, else [d_model, vocab]."""
  p = params["params"]
  if cfg.tie_embeddings:
    return jnp.asarray(nn.unbox(p["embed"]["embedding"]), cfg.compute_dtype), True
  return jnp.asarray(nn.unbox(p["lm_head"]["kernel"]), cfg.compute_dtype), False


def init_variables(cfg: ModelConfig, key: jax.Array) -> Any:
  """Boxed (logically partitioned) params, traced on a 2-token dummy input (their shapes do not
  depend on it). Wrap in `jax.eval_shape` for shapes only, or in `jax.jit` with out_shardings."""
  tokens = jnp.zeros((1, 2), jnp.int32)
  return Transformer(cfg).init(key, tokens, tokens, jnp.ones((1, 2, 2), bool))


def init_params(cfg: ModelConfig, key: jax.Array) -> Any:
  """`init_variables`, compiled."""
  return jax.jit(init_variables, static_argnums=0)(cfg, key)


def count_params(params: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(nn.unbox(params)))
