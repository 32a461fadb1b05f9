"""The decode step's weights: the model's params laid out once for a decode loop.

`Transformer` (model.py) keeps layer-stacked params for training. Inside a decode loop that layout
copies every layer's weights out of the stacked arrays on every step; `prepare_weights` re-lays them
out once, before the loop: one array per layer (the engine's layer loop is unrolled and reads them in
place), q/k/v fused into one matmul, gate/up into one, q/k/v, o and down stored transposed
([d_out, d_in]) for the one-row step (`engine.matmul`), and optionally int8 (`cfg.decode_quant`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tidar_jax.config import ModelConfig


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
  (see `engine.matmul`). gate/up is not: its 72- and 272-row TiDAR matmuls were slower that way."""

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
