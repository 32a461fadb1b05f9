"""Model behaviour in fp32: hybrid-mask causality/independence, cached == full forward, GQA, scan."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax import masks
from tidar_jax.attention import dot_product_attention
from tidar_jax.config import ModelConfig
from tidar_jax.decode import cache as cache_lib
from tidar_jax.model import Transformer, default_inv_freq, init_params, rope, rope_inv_freq

pytestmark = pytest.mark.usefixtures("fast_compile")  # compile-bound module (conftest.py)

CFG = ModelConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  mlp_dim=48, qkv_bias=True, qk_norm=True, tie_embeddings=False)
L, K, MASK_ID = 16, 4, 49


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def hybrid_forward(params):
  model = Transformer(CFG)
  mask = jnp.asarray(masks.training_mask(L, K))
  pos = jnp.concatenate([jnp.arange(L), jnp.arange(L)])[None]

  @jax.jit
  def f(tokens):  # [1, 2L] -> [2L, V]
    return model.apply(params, tokens, pos, mask)[0][0]

  return f


def _doubled(key):
  clean = jax.random.randint(key, (1, L), 0, MASK_ID)
  return jnp.concatenate([clean, jnp.full((1, L), MASK_ID)], axis=1)


def _changed(a, b):  # [n, V] -> [n] bool: which rows differ
  return np.asarray(jnp.max(jnp.abs(a - b), axis=-1) > 1e-6)


def test_mask_half_never_changes_clean_half(hybrid_forward):
  tokens = _doubled(jax.random.key(1))
  base = hybrid_forward(tokens)
  for i in range(L, 2 * L, 3):
    out = hybrid_forward(tokens.at[0, i].set(7))
    assert not _changed(base[:L], out[:L]).any()


@pytest.mark.parametrize("j", [0, 3, 4, 9, 15])
def test_clean_token_reaches_later_clean_and_later_blocks_only(hybrid_forward, j):
  tokens = _doubled(jax.random.key(2))
  base = hybrid_forward(tokens)
  out = hybrid_forward(tokens.at[0, j].set((tokens[0, j] + 1) % MASK_ID))
  changed = _changed(base, out)
  expect_clean = np.arange(L) >= j
  block_start = (np.arange(L) // K) * K
  expect_mask = block_start > j
  np.testing.assert_array_equal(changed[:L], expect_clean)
  np.testing.assert_array_equal(changed[L:], expect_mask)


@pytest.mark.parametrize("b", [0, 1, 3])
def test_mask_token_in_block_changes_only_its_block(hybrid_forward, b):
  tokens = _doubled(jax.random.key(3))
  base = hybrid_forward(tokens)
  out = hybrid_forward(tokens.at[0, L + b * K + 1].set(5))
  changed = _changed(base, out)
  expect = np.zeros(2 * L, bool)
  expect[L + b * K: L + (b + 1) * K] = True
  np.testing.assert_array_equal(changed, expect)


def test_cached_incremental_equals_full_forward(params):
  model = Transformer(CFG)
  B, n, total = 2, 5, 12
  tokens = jax.random.randint(jax.random.key(4), (B, total), 0, CFG.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(total)[None], (B, total))
  apply = jax.jit(model.apply)
  full, _ = apply(params, tokens, pos, jnp.asarray(masks.causal_mask(total)))
  cache = cache_lib.init_cache(CFG, B, max_len=16)
  logits, kv = apply(params, tokens[:, :n], pos[:, :n], jnp.asarray(masks.causal_mask(n)), cache_lib.stacked(cache))
  np.testing.assert_allclose(logits, full[:, :n], atol=1e-5)
  cache = cache_lib.with_lengths(cache_lib.write(cache, kv, n), jnp.full((B,), n))
  step = jax.jit(lambda c, t, p: model.apply(params, t, p, jnp.ones((1, 1, 1), bool), cache_lib.stacked(c)))
  for i in range(n, total):
    logits, kv = step(cache, tokens[:, i:i + 1], pos[:, i:i + 1])
    np.testing.assert_allclose(logits[:, 0], full[:, i], atol=1e-5)
    cache = cache_lib.with_lengths(cache_lib.write(cache, kv, 1), cache.lengths + 1)


def test_cache_with_ragged_lengths_ignores_stale_slots(params):
  """Rows at different lengths, with garbage past each length, match their own full forward."""
  model = Transformer(CFG)
  total = 10
  tokens = jax.random.randint(jax.random.key(5), (2, total), 0, CFG.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(total)[None], (2, total))
  apply = jax.jit(model.apply)
  full, kv = apply(params, tokens, pos, jnp.asarray(masks.causal_mask(total)))
  cache = cache_lib.write(cache_lib.init_cache(CFG, 2, 16), kv, total)  # every slot filled
  lengths = jnp.array([4, 7])
  cache = cache_lib.with_lengths(cache, lengths)
  nxt = jnp.stack([tokens[0, 4], tokens[1, 7]])[:, None]
  logits, _ = apply(params, nxt, lengths[:, None], jnp.ones((1, 1, 1), bool), cache_lib.stacked(cache))
  np.testing.assert_allclose(logits[0, 0], full[0, 4], atol=1e-5)
  np.testing.assert_allclose(logits[1, 0], full[1, 7], atol=1e-5)


def _mha_reference(q, k, v, mask):
  """Plain multi-head attention in numpy, one head at a time (KV heads repeated for GQA)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  rep = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  out = np.zeros_like(q)
  for b in range(q.shape[0]):
    for h in range(q.shape[2]):
      s = q[b, :, h] @ k[b, :, h].T / np.sqrt(q.shape[-1])
      s = np.where(mask[0], s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h]
  return out


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_gqa_matches_plain_mha(kv_heads):
  keys = jax.random.split(jax.random.key(6), 3)
  q = jax.random.normal(keys[0], (2, 6, 4, 8))
  k = jax.random.normal(keys[1], (2, 6, kv_heads, 8))
  v = jax.random.normal(keys[2], (2, 6, kv_heads, 8))
  mask = masks.training_mask(3, 1)[None]
  out = dot_product_attention(q, k, v, jnp.asarray(mask))
  np.testing.assert_allclose(out, _mha_reference(q, k, v, mask), atol=1e-5)


def test_scanned_and_unrolled_agree(params):
  tokens = jax.random.randint(jax.random.key(7), (2, 2 * L), 0, CFG.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(2 * L)[None], (2, 2 * L))
  mask = jnp.asarray(masks.training_mask(L, K))
  def run(cfg):
    return jax.jit(Transformer(cfg).apply)(params, tokens, pos, mask)[0]

  a, b = run(CFG), run(dataclasses.replace(CFG, scan_layers=False))
  c = run(dataclasses.replace(CFG, remat="full"))
  np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_allclose(a, c, atol=1e-5)


def test_rope_is_relative():
  """Scores after RoPE depend only on position differences."""
  x = jax.random.normal(jax.random.key(8), (1, 1, 1, 16))
  y = jax.random.normal(jax.random.key(9), (1, 1, 1, 16))
  inv_freq = default_inv_freq(16, 1e4)

  def score(pq, pk):
    return jnp.sum(rope(x, jnp.array([[pq]]), inv_freq) * rope(y, jnp.array([[pk]]), inv_freq))
  np.testing.assert_allclose(score(3, 1), score(10, 8), rtol=1e-5)
  assert abs(score(3, 1) - score(3, 2)) > 1e-4


def test_rope_scalings_change_the_frequencies_they_should():
  """linear: every frequency / factor. llama3 (wavelength 2 pi / f against original_max / low and
  original_max / high): long wavelengths / factor, short ones kept, those between strictly between
  (and falling with the wavelength, so no position aliases another)."""
  base = dataclasses.replace(CFG, head_dim=16, rope_theta=1e4)
  f = default_inv_freq(16, 1e4)
  np.testing.assert_array_equal(rope_inv_freq(base), f)
  np.testing.assert_allclose(rope_inv_freq(dataclasses.replace(base, rope_type="linear", rope_factor=4.0)), f / 4,
                             rtol=1e-7)
  llama3 = rope_inv_freq(dataclasses.replace(base, rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                                             rope_high_freq_factor=4.0, rope_original_max_position=64))
  wavelen = 2 * np.pi / f
  long, short = wavelen > 64, wavelen < 16
  mid = ~long & ~short
  assert long.sum() >= 2 and short.sum() >= 1 and mid.sum() >= 2  # all three regions present
  np.testing.assert_allclose(llama3[long], f[long] / 8, rtol=1e-6)
  np.testing.assert_array_equal(llama3[short], f[short])
  assert np.all((llama3[mid] < f[mid]) & (llama3[mid] > f[mid] / 8))
  assert np.all(np.diff(llama3) < 0)


def test_params_carry_logical_axes(params):
  boxed = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in boxed)
  names = {x.names for x in boxed}
  assert ("layers", "embed", "heads", "head_dim") in names and ("vocab", "embed") in names


def test_tied_head_uses_embedding():
  cfg = dataclasses.replace(CFG, tie_embeddings=True)
  p = init_params(cfg, jax.random.key(1))
  assert "lm_head" not in p["params"]
  h = jax.random.normal(jax.random.key(2), (3, cfg.d_model))
  logits = Transformer(cfg).apply(p, h, method=Transformer.logits)
  np.testing.assert_allclose(logits, h @ nn.unbox(p)["params"]["embed"]["embedding"].T, atol=1e-5)


@pytest.mark.parametrize("vocab_major", [True, False], ids=["tied", "untied"])
def test_lm_head_backward_runs_in_the_compute_dtype(vocab_major):
  """The LM head's forward is the fp32-accumulated einsum; its backward casts the fp32 cotangent to
  the compute dtype, so both backward matmuls take bf16 inputs (no fp32/TF32 GEMM over the vocab),
  with gradients equal to fp32 autodiff up to that rounding (exactly equal in fp32)."""
  from tidar_jax.model import lm_head_logits
  spec = "...d,vd->...v" if vocab_major else "...d,dv->...v"
  shape = (96, 32) if vocab_major else (32, 96)
  h32 = jax.random.normal(jax.random.key(0), (2, 5, 32))
  w32 = jax.random.normal(jax.random.key(1), shape) * 0.1
  g = jax.random.normal(jax.random.key(2), (2, 5, 96))

  def reference(h, w):  # plain autodiff of the same forward
    return jnp.einsum(spec, h, w, preferred_element_type=jnp.float32)

  for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)):
    h, w = h32.astype(dtype), w32.astype(dtype)
    out, vjp = jax.vjp(lambda h, w: lm_head_logits(h, w, vocab_major), h, w)
    want, vjp_ref = jax.vjp(lambda h, w: reference(h.astype(jnp.float32), w.astype(jnp.float32)), h, w)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, want, rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6, atol=1e-5)
    for got, ref in zip(vjp(g), vjp_ref(g)):
      assert got.dtype == dtype
      scale = float(jnp.max(jnp.abs(ref)))
      np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=tol * scale)

  h, w = h32.astype(jnp.bfloat16), w32.astype(jnp.bfloat16)
  jaxpr = jax.make_jaxpr(jax.grad(lambda h, w: lm_head_logits(h, w, vocab_major).sum(), argnums=(0, 1)))(h, w)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) >= 2  # the two backward matmuls (the forward's may sit inside the custom_vjp call)
  assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars), [e.invars for e in dots]
