"""The chunked LM-head loss == the full-logits reference (values and gradients), and the full
`[batch, seq, vocab]` logits never exist in its forward or backward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax import head_loss, losses
from tidar_jax.config import ModelConfig
from tidar_jax.model import Transformer, init_params

pytestmark = pytest.mark.usefixtures("fast_compile")  # compile-bound module (conftest.py)

B, T, D, V = 2, 13, 16, 37  # T and V prime: no chunk divides them


def _reference_nll(hidden, table, targets, vocab_major):
  logits = jnp.einsum("btd,vd->btv" if vocab_major else "btd,dv->btv", hidden, table)
  return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]


@pytest.mark.parametrize("vocab_major", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("chunk", [1, 4, 8, 64])
def test_chunked_nll_and_gradients_equal_full_logits(chunk, vocab_major):
  ks = jax.random.split(jax.random.key(0), 4)
  hidden = jax.random.normal(ks[0], (B, T, D))
  table = jax.random.normal(ks[1], (V, D) if vocab_major else (D, V)) * 0.5
  targets = jax.random.randint(ks[2], (B, T), 0, V)
  weights = (jax.random.uniform(ks[3], (B, T)) > 0.3).astype(jnp.float32) * 1.5  # masked and weighted

  def chunked(h, w):
    return jnp.sum(head_loss.token_nll(h, w, targets, vocab_major=vocab_major, chunk=chunk) * weights)

  def reference(h, w):
    return jnp.sum(_reference_nll(h, w, targets, vocab_major) * weights)

  np.testing.assert_allclose(head_loss.token_nll(hidden, table, targets, vocab_major=vocab_major, chunk=chunk),
                             _reference_nll(hidden, table, targets, vocab_major), rtol=1e-5, atol=1e-5)
  (v_c, g_c), (v_r, g_r) = (jax.value_and_grad(f, argnums=(0, 1))(hidden, table) for f in (chunked, reference))
  np.testing.assert_allclose(v_c, v_r, rtol=1e-5)
  for a, b in zip(g_c, g_r):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bad_chunk_is_refused():
  with pytest.raises(ValueError, match="chunk=0"):
    head_loss.token_nll(jnp.zeros((1, 2, 4)), jnp.zeros((5, 4)), jnp.zeros((1, 2), jnp.int32),
                        vocab_major=True, chunk=0)


CFG = ModelConfig(vocab_size=41, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48)


def _reference_loss(cfg, params, tokens, weights, objective):
  """The whole TiDAR (or AR) loss from the model's full fp32 logits, written out here."""
  L = tokens.shape[1]
  inputs, positions, mask = losses.model_inputs(tokens, 40, objective, 4)
  logits, _ = Transformer(cfg).apply(params, inputs, positions, jnp.asarray(mask))
  logp = jax.nn.log_softmax(logits, -1)
  ar = -jnp.take_along_axis(logp[:, :L - 1], tokens[:, 1:, None], -1)[..., 0]
  l_ar = jnp.sum(ar * weights[:, 1:]) / jnp.sum(weights[:, 1:])
  if objective == "ar":
    return l_ar
  diff = -jnp.take_along_axis(logp[:, L:], tokens[..., None], -1)[..., 0]
  l_diff = jnp.sum(diff * weights) / jnp.sum(weights)
  return (2.0 * l_ar + l_diff) / 3.0


@pytest.mark.parametrize("objective", ["tidar", "ar"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_model_loss_through_chunks_equals_full_logits(tie, objective):
  cfg = dataclasses.replace(CFG, tie_embeddings=tie)
  params = init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 40)
  weights = jnp.ones((2, 16)).at[0, 11:].set(0.0).at[1, 3].set(0.0)  # padded tail, one dropped target

  def chunked(p):
    return losses.compute_loss(cfg, p, tokens, weights, mask_id=40, objective=objective, block_size=4,
                               alpha=2.0, loss_chunk=5, structured_attention=False)[0]

  (v_c, g_c), (v_r, g_r) = (jax.jit(jax.value_and_grad(f))(params)
                            for f in (chunked, lambda p: _reference_loss(cfg, p, tokens, weights, objective)))
  np.testing.assert_allclose(v_c, v_r, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_r)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _shapes(jaxpr) -> list[tuple[int, ...]]:
  """Every intermediate's shape in a jaxpr, sub-jaxprs (scan, remat, custom_vjp) included."""
  out = []
  for eqn in jaxpr.eqns:
    out += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out += _shapes(inner)
  return out


def test_no_full_logits_in_forward_or_backward():
  """The largest logits-like array in the loss's gradient program is one chunk's, not [batch, 2L, vocab]."""
  cfg = dataclasses.replace(CFG, vocab_size=401)
  params = init_params(cfg, jax.random.key(0))
  tokens = jnp.zeros((2, 32), jnp.int32)

  def loss(p, chunk):
    return losses.compute_loss(cfg, p, tokens, None, mask_id=400, objective="tidar", block_size=4, alpha=1.0,
                               loss_chunk=chunk)[0]

  def largest_vocab_array(chunk):
    shapes = _shapes(jax.make_jaxpr(jax.grad(lambda p: loss(p, chunk)))(params).jaxpr)
    return max(int(np.prod(s)) for s in shapes if s and s[-1] == 401)

  assert largest_vocab_array(8) == 2 * 8 * 401  # one chunk of 8 positions of both rows
  assert largest_vocab_array(64) == 2 * 64 * 401  # the negative control: one chunk = the whole 2L
