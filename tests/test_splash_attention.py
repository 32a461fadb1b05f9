"""TPU splash attention with the static TiDAR training mask, run in Pallas interpret mode on the CPU:
== the dense masked softmax (values and q/k/v gradients) over lengths that are and are not multiples
of the 128-token tile, k = 1 included; a whole TiDAR train step with attention="splash" == dense,
unsharded and one kernel per shard under a (data, tensor) mesh; the block sparsity the dry run quotes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax import losses, masks, sharding
from tidar_jax.config import ModelConfig
from tidar_jax.kernels import splash_attention
from tidar_jax.model import init_params

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.mark.parametrize("L, k, heads, kv_heads", [
    (24, 4, 4, 2),  # 2L = 48: padded to one 128 tile; GQA
    (64, 1, 2, 2),  # k = 1: every mask token sees its prefix and itself; MHA
    (80, 8, 2, 1),  # 2L = 160: two tiles, the second mostly padding; MQA
])
def test_splash_equals_dense_values_and_gradients(L, k, heads, kv_heads):
  ks = jax.random.split(jax.random.key(L + k), 4)
  q = jax.random.normal(ks[0], (2, 2 * L, heads, 16))
  kk = jax.random.normal(ks[1], (2, 2 * L, kv_heads, 16))
  v = jax.random.normal(ks[2], (2, 2 * L, kv_heads, 16))
  cotangent = jax.random.normal(ks[3], (2, 2 * L, heads, 16))
  out, vjp = jax.vjp(lambda *a: splash_attention.tidar_splash_attention(*a, k, interpret=True), q, kk, v)
  ref, vjp_ref = jax.vjp(lambda *a: splash_attention.reference(*a, k), q, kk, v)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  for name, a, b in zip("qkv", vjp(cotangent), vjp_ref(cotangent)):
    np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"d{name}")


def test_reference_is_the_training_mask():
  """The reference itself: a mask token's output is the softmax over exactly its allowed keys (an
  off-by-one in the mask would move it)."""
  L, k = 8, 4
  q = jax.random.normal(jax.random.key(0), (1, 2 * L, 1, 4))
  v = jax.random.normal(jax.random.key(1), (1, 2 * L, 1, 4))
  allowed = np.flatnonzero(masks.training_mask(L, k)[L + 5])  # block 1, offset 1: clean 0..3 + mask 4..7
  assert list(allowed) == [0, 1, 2, 3, L + 4, L + 5, L + 6, L + 7]
  s = jnp.einsum("d,kd->k", q[0, L + 5, 0], q[0, :, 0]) * 0.5
  expected = jax.nn.softmax(s[allowed]) @ v[0, allowed, 0]
  np.testing.assert_allclose(splash_attention.reference(q, q, v, k)[0, L + 5, 0], expected, rtol=1e-5)


def test_block_sparsity():
  s = splash_attention.block_sparsity(8192, 16)  # the 1p5b config: L = 4096, k = 16
  assert s["block"] == 512 and s["blocks_skipped"] == pytest.approx(0.6875)
  # clean half: 8 x 9 / 2 = 36 causal blocks; mask half: row b sees clean blocks 0..b and its own: 36 + 8
  assert s["computed_fraction"] == pytest.approx((36 + 36 + 8) / 256)


CFG = ModelConfig(vocab_size=41, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=48)


def _loss_and_grads(cfg, params, tokens):
  def f(p):
    return losses.compute_loss(cfg, p, tokens, None, mask_id=40, objective="tidar", block_size=4, alpha=1.0,
                               loss_chunk=1024)[0]
  return jax.jit(jax.value_and_grad(f))(params)


def test_train_step_with_splash_equals_dense_and_shards():
  """The TiDAR loss and gradients through the model with attention="splash" == "dense", on one
  device and under a data=2 x tensor=2 mesh (shard_map: one kernel per batch and heads shard)."""
  params = jax.tree.map(np.asarray, init_params(CFG, jax.random.key(0)))
  tokens = jax.random.randint(jax.random.key(1), (4, 24), 0, 40)
  loss_d, g_d = _loss_and_grads(CFG, params, tokens)
  loss_s, g_s = _loss_and_grads(dataclasses.replace(CFG, attention="splash"), params, tokens)
  np.testing.assert_allclose(loss_s, loss_d, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_d)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)

  mesh_cfg = dataclasses.make_dataclass("M", ["data", "fsdp", "tensor", "rules"])(
      2, 1, 2, (("batch", ("data", "fsdp")), ("heads", "tensor"), ("kv_heads", "tensor"), ("length", None),
                ("head_dim", None), ("embed", None), ("mlp", None), ("vocab", None), ("layers", None)))
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:4])
  splash_cfg = dataclasses.replace(CFG, attention="splash")
  with sharding.activate(mesh, sharding.logical_rules(mesh_cfg)):
    loss_m, g_m = _loss_and_grads(splash_cfg, params, tokens)
    jaxpr = str(jax.make_jaxpr(lambda p: losses.compute_loss(splash_cfg, p, tokens, None, mask_id=40, objective="tidar",
                                                             block_size=4, alpha=1.0, loss_chunk=1024)[0])(params))
  assert "shard_map" in jaxpr
  np.testing.assert_allclose(loss_m, loss_d, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_m), jax.tree.leaves(g_d)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
