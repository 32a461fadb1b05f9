"""TiDAR loss against hand computation; AR objective against a plain next-token loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tidar_jax import attention, losses, masks
from tidar_jax.config import ModelConfig
from tidar_jax.model import Transformer, init_params

pytestmark = pytest.mark.usefixtures("fast_compile")  # compile-bound module (conftest.py)


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)


def test_tidar_inputs():
  tokens = jnp.array([[5, 6, 7, 8]])
  inputs, pos = losses.tidar_inputs(tokens, mask_id=9)
  np.testing.assert_array_equal(inputs, [[5, 6, 7, 8, 9, 9, 9, 9]])
  np.testing.assert_array_equal(pos, [[0, 1, 2, 3, 0, 1, 2, 3]])


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_combined_loss_matches_hand_computation(alpha):
  rng = np.random.default_rng(0)
  B, L, V = 2, 4, 5
  tokens = rng.integers(0, V, (B, L))
  logits = rng.normal(size=(B, 2 * L, V))
  weights = np.array([[1, 1, 1, 0], [1, 0, 1, 1]], np.float32)  # padding targets excluded
  lp = _log_softmax(logits)
  ar_terms = [(-lp[b, i, tokens[b, i + 1]]) for b in range(B) for i in range(L - 1) if weights[b, i + 1]]
  diff_terms = [(-lp[b, L + i, tokens[b, i]]) for b in range(B) for i in range(L) if weights[b, i]]
  expected = (alpha * np.mean(ar_terms) + np.mean(diff_terms)) / (1 + alpha)
  targets = np.asarray(losses.targets(jnp.asarray(tokens), "tidar"))  # [B, 2L]
  nll = -np.take_along_axis(lp, targets[..., None], -1)[..., 0]
  loss, m = losses.loss_from_nll(jnp.asarray(nll, jnp.float32), jnp.asarray(tokens), jnp.asarray(weights),
                                 "tidar", alpha)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(m["ar_loss"], np.mean(ar_terms), rtol=1e-5)
  np.testing.assert_allclose(m["diffusion_loss"], np.mean(diff_terms), rtol=1e-5)
  assert int(m["ar_tokens"]) == len(ar_terms) and int(m["diffusion_tokens"]) == len(diff_terms)


CFG = ModelConfig(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48)


def test_ar_objective_is_plain_next_token_loss():
  params = init_params(CFG, jax.random.key(0))
  model = Transformer(CFG)
  tokens = jax.random.randint(jax.random.key(1), (3, 16), 0, 39)
  loss, _ = jax.jit(lambda p, t: losses.compute_loss(CFG, p, t, None, mask_id=39, objective="ar",
                                                     block_size=4, alpha=1.0, loss_chunk=5))(params, tokens)
  pos = jnp.broadcast_to(jnp.arange(16)[None], (3, 16))
  logits, _ = jax.jit(model.apply)(params, tokens, pos, jnp.tril(jnp.ones((16, 16), bool)))
  expected = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


# On a GPU the suite also checks cuDNN's path (bf16, at lengths of whole kernel tiles).
KERNELS = ["dense"] + (["cudnn"] if jax.default_backend() == "gpu" else [])


@pytest.mark.parametrize("implementation", KERNELS)
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_structured_attention_equals_dense_training_mask(kv_heads, block_size, implementation):
  """Training attention by the mask's structure (clean half causal; mask half: its clean prefix
  through a causal-mode kernel and its own block in einsums, with cuDNN in a Pallas kernel, merged by
  log-sum-exp, the backward run with the merged output and log-sum-exp) == attention under the
  dense [2L, 2L] training mask, values and gradients: an off-by-one in the prefix or the own-block
  extent changes the mask half, and a backward run with a part's own log-sum-exp changes every
  gradient of the mask half."""
  gpu = implementation == "cudnn"
  B, L, H, D = (2, 256, 4, 64) if gpu else (2, 16, 4, 8)
  dtype = jnp.bfloat16 if gpu else jnp.float32
  q, k, v = (jax.random.normal(jax.random.key(i), (B, 2 * L, h, D)) for i, h in enumerate((H, kv_heads, kv_heads)))
  mask = jnp.broadcast_to(jnp.asarray(masks.training_mask(L, block_size)), (B, 2 * L, 2 * L))

  def structured(q, k, v):
    return attention.tidar_training_attention(q, k, v, block_size, implementation)

  def dense(q, k, v):  # fp32 reference
    return attention.dot_product_attention(q, k, v, mask)

  cotangent = jax.random.normal(jax.random.key(9), (B, 2 * L, H, D))
  out_s, vjp_s = jax.vjp(jax.jit(structured), *(x.astype(dtype) for x in (q, k, v)))
  out_d, vjp_d = jax.vjp(jax.jit(dense), q, k, v)
  tol = 2e-2 if gpu else 1e-5  # relative to the largest entry: bf16 inputs and kernel
  for a, b in zip((out_s, *vjp_s(cotangent.astype(dtype))), (out_d, *vjp_d(cotangent))):
    a, b = np.asarray(a, np.float32), np.asarray(b)
    assert np.abs(a - b).max() <= tol * np.abs(b).max(), np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("objective", ["tidar", "ar"])
def test_structured_model_loss_and_gradients_equal_the_dense_mask(objective):
  """The whole loss through the model (qk-norm, QKV bias) with structured attention (TiDAR: block by
  block; AR: the kernel's causal mode, no mask array) == with the dense mask; gradients finite and
  nonzero."""
  cfg = dataclasses.replace(CFG, num_kv_heads=4, qk_norm=True, qkv_bias=True)
  params = init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 39)

  def f(p, structured):
    return losses.compute_loss(cfg, p, tokens, None, mask_id=39, objective=objective, block_size=4,
                               alpha=1.0, loss_chunk=1024, structured_attention=structured)

  grad = jax.jit(jax.value_and_grad(f, has_aux=True), static_argnums=1)
  (loss_s, m_s), g_s = grad(params, True)
  (loss_d, m_d), g_d = grad(params, False)
  np.testing.assert_allclose(loss_s, loss_d, rtol=1e-6)
  assert m_s.keys() == m_d.keys()
  for name in m_s:
    np.testing.assert_allclose(m_s[name], m_d[name], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_d)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
  leaves = jax.tree.leaves(g_s)
  assert np.isfinite(float(loss_s)) and all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
  # near-uniform init: every term starts close to log(V)
  assert all(abs(float(m_s[t]) - np.log(40)) < 0.5 for t in m_s if t.endswith("_loss"))


def test_ar_training_attention_takes_the_kernels_causal_mode(monkeypatch):
  """The AR objective's attention on a GPU is cuDNN's causal mode, never a mask array (with one, the
  flash kernel computes every tile: twice the work). cuDNN has no CPU kernel, so its calls are
  recorded and run by XLA's implementation; the loss must equal the dense causal mask's."""
  calls = []
  real = jax.nn.dot_product_attention

  def recording(q, k, v, *args, implementation=None, **kwargs):
    calls.append((implementation, kwargs.get("is_causal", False), kwargs.get("mask")))
    return real(q, k, v, *args, implementation="xla", **kwargs)

  cfg = dataclasses.replace(CFG, attention="cudnn")
  params = init_params(CFG, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 39)
  monkeypatch.setattr(attention.jax.nn, "dot_product_attention", recording)
  loss = losses.compute_loss(cfg, params, tokens, None, mask_id=39, objective="ar", block_size=4, alpha=1.0,
                             loss_chunk=1024)[0]
  assert calls and all(c == ("cudnn", True, None) for c in calls), calls
  dense = losses.compute_loss(CFG, params, tokens, None, mask_id=39, objective="ar", block_size=4, alpha=1.0,
                              loss_chunk=1024, structured_attention=False)[0]
  np.testing.assert_allclose(loss, dense, rtol=1e-6)


def test_causal_forward_rejects_a_cache():
  with pytest.raises(ValueError, match="mask=None"):
    attention.dot_product_attention(*(jnp.zeros((1, 4, 2, 8)),) * 3, None, cache_k=jnp.zeros((1, 8, 2, 8)),
                                    cache_v=jnp.zeros((1, 8, 2, 8)), cache_lengths=jnp.zeros((1,), jnp.int32))


def test_structured_model_rejects_a_mask():
  params = init_params(CFG, jax.random.key(0))
  tokens = jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="mask=None"):
    Transformer(CFG, tidar_block=4).apply(params, tokens, tokens, jnp.ones((1, 8, 8), bool))
