"""The decode engine (fused per-layer weights, write-then-attend per-layer cache) computes what the
model computes: `engine.forward` over a cache == `Transformer.apply`'s uncached forward over the
whole sequence, in fp32, for the Qwen2.5 (QKV bias, tied head) and Qwen3 (qk-norm, untied head)
layouts with GQA, ragged per-row cache lengths, stale slots, and the AR and TiDAR step masks, with
the dense step attention and the split-KV Pallas kernel (interpreted here; what "auto" picks on GPU).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax import masks
from tidar_jax.config import ModelConfig
from tidar_jax.decode import cache as cache_lib
from tidar_jax.decode import engine
from tidar_jax.decode.weights import Int8Matrix, prepare_weights
from tidar_jax.model import Transformer, init_params

pytestmark = pytest.mark.usefixtures("fast_compile")  # compile-bound: small programs, interpreted kernels

SHAPE = dict(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=96)
CONFIGS = {
    "qwen2.5": ModelConfig(**SHAPE, qkv_bias=True, tie_embeddings=True),
    # Llama-3.1-style RoPE scaling here: its positions reach the fused kernels through the engine's
    # cos/sin tables, which must carry the scaled frequencies as the model's own RoPE does.
    "qwen3": ModelConfig(**SHAPE, qk_norm=True, tie_embeddings=False, rope_type="llama3", rope_factor=8.0,
                         rope_original_max_position=64),
}
K = 3
STEPS = {  # name -> which of the step's new tokens each new token sees
    "ar": masks.causal_step(1),
    "causal4": masks.causal_step(4),
    "tidar": masks.decode_step_intervals(K),
}
LENGTHS = np.array([5, 9])  # committed cache slots per row (ragged)
MAX_LEN = 32


def random_params(cfg: ModelConfig, seed: int = 0):
  """Peaked random weights; norm gains and biases away from 1 and 0, so a misplaced one shows."""
  shapes = nn.unbox(jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if "scale" in jax.tree_util.keystr(path):
      return jnp.asarray(1.0 + 0.2 * rng.standard_normal(leaf.shape), leaf.dtype)
    return jnp.asarray(0.3 * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def step_offsets(name: str) -> np.ndarray:
  """[T] position offsets of the step's tokens from the row's length p."""
  return masks.decode_step_offsets(K) if name == "tidar" else np.arange(STEPS[name].tokens, dtype=np.int32)


def reference(params, cfg: ModelConfig, prefix: np.ndarray, new: np.ndarray, step_mask: np.ndarray,
              offsets: np.ndarray, lengths: np.ndarray = LENGTHS):
  """Uncached forward over [row's prefix (n_b tokens), the step's T tokens, padding] per row, with
  the full mask the cached step implies: the prefix causal, each new token seeing the whole prefix
  and the new tokens step_mask allows. Returns (final-normed hidden [B, W, d], K/V [L, B, W, h, d])
  and the per-row column of new token 0 (= n_b)."""
  B, T = new.shape
  W = prefix.shape[1] + T
  tokens = np.zeros((B, W), np.int32)
  positions = np.zeros((B, W), np.int32)
  mask = np.zeros((B, W, W), bool)
  for b, n in enumerate(lengths):
    tokens[b, :n], tokens[b, n:n + T] = prefix[b, :n], new[b]
    positions[b, :n], positions[b, n:n + T] = np.arange(n), n + offsets
    mask[b, :n, :n] = masks.causal_mask(n)
    mask[b, n:n + T, :n] = True
    mask[b, n:n + T, n:n + T] = step_mask
    mask[b, n + T:, n + T:] = np.eye(W - n - T, dtype=bool)  # padding sees itself: no empty rows
  hidden, kv = jax.jit(lambda p: Transformer(cfg).apply(p, tokens, positions, mask, return_hidden=True))(params)
  return hidden, kv


# The split-KV kernel's own tests (tests/test_split_kv_attention.py) cover its tilings and edges;
# here it runs inside the engine for one layout per step mask, with the fused attention blocks
# around it (`one_token_attention` at T = 1, `multi_token_attention` for TiDAR and causal4). Batch 1
# AR is the one-row step, whose matmuls are row reductions over the transposed weights
# (`engine.matmul`).
CASES = [(name, step, "dense", 2) for name in CONFIGS for step in STEPS] + [
    ("qwen2.5", "ar", "split_kv", 2), ("qwen3", "tidar", "split_kv", 2), ("qwen2.5", "causal4", "split_kv", 2),
    ("qwen2.5", "ar", "dense", 1), ("qwen3", "ar", "split_kv", 1)]


@pytest.mark.parametrize("name,step,attention,batch", CASES)
def test_forward_over_the_cache_equals_the_uncached_model(name, step, attention, batch):
  cfg = CONFIGS[name]
  params = random_params(cfg)
  intervals, offsets = STEPS[step], step_offsets(step)
  step_mask = intervals.dense()
  lengths = LENGTHS[-batch:]
  B, T = batch, intervals.tokens
  rng = np.random.default_rng(1)
  prefix = rng.integers(0, cfg.vocab_size, (B, lengths.max()))
  new = rng.integers(0, cfg.vocab_size, (B, T))
  ref_h, ref_kv = reference(params, cfg, prefix, new, step_mask, offsets, lengths)

  # The cache: the prefix's exact K/V at slots < n_b, stale garbage in every slot past it.
  shape = (cfg.num_layers, B, MAX_LEN, cfg.num_kv_heads, cfg.head_dim)
  stale_k, stale_v = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
  for b, n in enumerate(lengths):
    stale_k[:, b, :n], stale_v[:, b, :n] = ref_kv.k[:, b, :n], ref_kv.v[:, b, :n]
  cache = cache_lib.KVCache(tuple(stale_k), tuple(stale_v), jnp.asarray(lengths, jnp.int32))
  positions = lengths[:, None] + offsets[None, :]

  @jax.jit
  def step_fn(params, cache):
    w = prepare_weights(params, cfg)
    hidden, written = engine.forward(w, cfg, cache, new, positions, intervals, attention)
    return hidden, engine.logits(w, hidden), written

  hidden, logits, written = step_fn(params, cache)
  model = Transformer(cfg)
  got = cache_lib.stacked(written)
  np.testing.assert_array_equal(got.lengths, lengths)  # the caller commits, not forward
  for b, n in enumerate(lengths):
    ref_logits = model.apply(params, ref_h[b, n:n + T], method=Transformer.logits)
    # rtol: on a GPU fp32 sums reassociate (1.2e-5 seen on one element of 768); a mask or cache slip is O(1)
    np.testing.assert_allclose(hidden[b], ref_h[b, n:n + T], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits[b], ref_logits, atol=1e-5 * float(jnp.abs(ref_logits).max()))
    # Committed slots untouched, the step's K/V at n .. n+T-1, later slots still stale.
    np.testing.assert_allclose(got.k[:, b, :n + T], ref_kv.k[:, b, :n + T], atol=1e-5)
    np.testing.assert_allclose(got.v[:, b, :n + T], ref_kv.v[:, b, :n + T], atol=1e-5)
    np.testing.assert_array_equal(got.k[:, b, n + T:], stale_k[:, b, n + T:])


def test_boxed_and_unboxed_params_prepare_the_same_weights():
  cfg = CONFIGS["qwen3"]
  boxed = init_params(cfg, jax.random.key(0))
  got, want = prepare_weights(boxed, cfg), prepare_weights(nn.unbox(boxed), cfg)
  assert len(got.layers) == cfg.num_layers and got.lm_head is not None and got.layers[0].bqkv is None
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("batch", [1, 3])  # batch 1 takes the in-place slice update, more rows a scatter
def test_write_rows_writes_each_row_at_its_offset(batch):
  rng = np.random.default_rng(batch)
  buf = rng.standard_normal((batch, 12, 2, 4)).astype(np.float32)
  new = rng.standard_normal((batch, 3, 2, 4)).astype(np.float32)
  offsets = np.array([5, 0, 9][:batch], np.int32)
  got = np.asarray(cache_lib.write_rows(jnp.asarray(buf), jnp.asarray(new), jnp.asarray(offsets)))
  want = buf.copy()
  for b, o in enumerate(offsets):
    want[b, o:o + 3] = new[b]
  np.testing.assert_array_equal(got, want)


def test_int8_decode_weights_quantize_per_column_and_stay_close():
  """decode_quant="int8": every layer matrix is int8 with one scale per output column, within half a
  step of the original, and the step's logits stay close to the full-precision engine's."""
  import dataclasses
  cfg = CONFIGS["qwen3"]
  cfg8 = dataclasses.replace(cfg, decode_quant="int8")
  params = random_params(cfg)
  prepare = jax.jit(prepare_weights, static_argnums=1)
  w, w8 = prepare(params, cfg), prepare(params, cfg8)
  for full, quant in zip(w.layers, w8.layers):
    for name in ("wqkv_t", "wo_t", "wgu", "wd_t"):
      m, q = getattr(full, name), getattr(quant, name)
      assert isinstance(q, Int8Matrix) and q.q.dtype == jnp.int8 and q.q.shape == m.shape
      if name.endswith("_t"):  # stored [d_out, d_in]: compare as [d_in, d_out]
        m, q = m.T, q._replace(q=q.q.T)
      assert q.scale.shape == (m.shape[1],)
      scale = np.asarray(q.scale)[None, :]
      err = np.abs(np.asarray(q.q, np.float32) * scale - np.asarray(m))
      assert (err <= scale / 2 + 1e-7).all()
      np.testing.assert_allclose(np.abs(np.asarray(q.q)).max(axis=0), 127)  # the scale is the column max
  np.testing.assert_array_equal(w8.embed, w.embed)
  step_mask = STEPS["tidar"]
  T = step_mask.tokens
  cache = cache_lib.init_cache(cfg, len(LENGTHS), MAX_LEN)._replace(lengths=jnp.asarray(LENGTHS, jnp.int32))
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (len(LENGTHS), T))
  positions = LENGTHS[:, None] + step_offsets("tidar")[None, :]

  @jax.jit
  def step(weights):
    hidden, _ = engine.forward(weights, cfg, cache, tokens, positions, step_mask, "dense")
    return engine.logits(weights, hidden)

  full, quant = step(w), step(w8)
  scale = float(jnp.abs(full).max())
  assert 0 < float(jnp.abs(quant - full).max()) < 0.05 * scale  # rounded, but close
  # One row alone (the batch-1 AR step: row reductions over the int8 rows) == that row in the batch.
  one = cache._replace(k=tuple(k[1:] for k in cache.k), v=tuple(v[1:] for v in cache.v), lengths=cache.lengths[1:])
  hidden, _ = jax.jit(lambda w8: engine.forward(w8, cfg, one, tokens[1:, :1], positions[1:, :1], STEPS["ar"],
                                                "dense"))(w8)
  ref, _ = jax.jit(lambda w8: engine.forward(w8, cfg, cache, tokens[:, :1], positions[:, :1], STEPS["ar"],
                                             "dense"))(w8)
  np.testing.assert_allclose(hidden[0], ref[1], atol=1e-5)


def test_tidar_step_through_the_small_row_gemm_equals_xla(monkeypatch):
  """Where `dispatch.small_row_gemm` says so (a GPU, once measured faster), a step's few rows go
  through `small_row_gemm.gemm` (interpreted here): the same TiDAR step over the ragged cache as
  XLA's products, every layer's new key/value included. Fails if a layout or the norm's input is wrong."""
  from tidar_jax import dispatch
  from tidar_jax.kernels import small_row_gemm as srg
  cfg = CONFIGS["qwen3"]
  w = jax.jit(prepare_weights, static_argnums=1)(random_params(cfg), cfg)
  cache = cache_lib.init_cache(cfg, 1, MAX_LEN)._replace(lengths=jnp.asarray(LENGTHS[1:], jnp.int32))
  cache = cache._replace(k=tuple(jax.random.normal(jax.random.key(i), k.shape) for i, k in enumerate(cache.k)),
                         v=tuple(jax.random.normal(jax.random.key(9 + i), v.shape) for i, v in enumerate(cache.v)))
  T = STEPS["tidar"].tokens
  tokens = np.arange(1, T + 1)[None]
  positions = LENGTHS[1:, None] + step_offsets("tidar")[None]
  real = srg.gemm

  def step(use: bool):
    monkeypatch.setattr(dispatch, "small_row_gemm", lambda rows: use and 1 < rows <= srg.MAX_ROWS)
    calls = []
    monkeypatch.setattr(srg, "gemm",
                        lambda x, m, **kw: calls.append((x.shape[0], kw["transposed"])) or real(x, m, **kw))
    hidden, out = jax.jit(lambda w: engine.forward(w, cfg, cache, tokens, positions, STEPS["tidar"], "dense"))(w)
    return engine.logits(w, hidden), out, calls

  want, want_cache, none = step(False)
  got, got_cache, calls = step(True)
  # q/k/v, o, down stored [d_out, d_in]; gate/up [d_in, d_out]
  assert none == [] and calls == [(T, True), (T, True), (T, False), (T, True)] * cfg.num_layers
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  for a, b in zip(got_cache.k + got_cache.v, want_cache.k + want_cache.v):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("layout", ["qwen2.5", "qwen3"])
def test_int8_one_row_step_through_the_gemv_kernel_equals_xla(layout, monkeypatch):
  """On a GPU the batch-1 int8 step's matmuls run `int8_gemv.gemv` (q/k/v, o and down stored [d_out,
  d_in], gate/up [d_in, d_out]); here it is interpreted: the same step as XLA's products, every
  layer's new key/value included. Fails if a layout, the scale or the folded norm's input is wrong."""
  import dataclasses

  from tidar_jax import dispatch
  from tidar_jax.kernels import int8_gemv as gemv
  cfg = dataclasses.replace(CONFIGS[layout], decode_quant="int8")
  w8 = jax.jit(prepare_weights, static_argnums=1)(random_params(cfg), cfg)
  cache = cache_lib.init_cache(cfg, 1, MAX_LEN)._replace(lengths=jnp.asarray(LENGTHS[1:], jnp.int32))
  cache = cache._replace(k=tuple(jax.random.normal(jax.random.key(i), k.shape) for i, k in enumerate(cache.k)),
                         v=tuple(jax.random.normal(jax.random.key(9 + i), v.shape) for i, v in enumerate(cache.v)))
  tokens, positions = np.array([[7]]), LENGTHS[1:, None]
  real = gemv.gemv

  def step(use: bool):
    monkeypatch.setattr(dispatch, "int8_gemv", lambda rows: use and rows == 1)
    calls = []
    monkeypatch.setattr(gemv, "gemv", lambda *a, **kw: calls.append(kw["transposed"]) or real(*a, **kw))
    hidden, out = jax.jit(lambda w: engine.forward(w, cfg, cache, tokens, positions, STEPS["ar"], "dense"))(w8)
    return engine.logits(w8, hidden), out, calls

  want, want_cache, none = step(False)
  got, got_cache, calls = step(True)
  assert none == [] and calls == [True, True, False, True] * cfg.num_layers  # q/k/v, o, gate/up, down
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  for a, b in zip(got_cache.k + got_cache.v, want_cache.k + want_cache.v):
    np.testing.assert_allclose(a, b, atol=1e-5)
