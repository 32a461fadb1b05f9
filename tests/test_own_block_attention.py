"""The own-block kernels (Pallas, interpreted on CPU) inside the mask half's custom VJP equal attention
under the dense training mask, values and gradients: GQA with a group of 3 (SmolLM2's), MHA, block
sizes 1 to 16, one and several tiles per row, tiles of one and of several blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import tiny
from tidar_jax import attention, mask_half_attention, masks, sharding
from tidar_jax.kernels import own_block_attention

pytestmark = pytest.mark.usefixtures("fast_compile")  # compile-bound: small programs, interpreted kernels


def test_tile_holds_whole_blocks_divides_the_sequence_and_fits_triton():
  assert [own_block_attention.tile_for(L, k, 64) for L, k in ((1024, 8), (96, 16), (48, 1), (256, 128))] \
      == [64, 32, 16, None]
  assert own_block_attention.tile_for(40, 8, 64) is None  # no power-of-two tile divides 40
  assert own_block_attention.tile_for(1024, 12, 64) is None  # no such tile holds whole blocks of 12
  assert own_block_attention.tile_for(1024, 8, 96) is None  # Triton's dot: power-of-two head_dim
  with pytest.raises(ValueError, match="own_tile=12 must be a multiple of block_size=8"):
    masks.training_blocks(48, 8, 12)


@pytest.mark.parametrize("L,block_size,heads,kv_heads", [
    (128, 8, 6, 2),  # tile 64: two tiles a row, eight blocks a tile
    (48, 1, 9, 3),  # tile 16 of one-token blocks; group of 3
    (96, 16, 4, 4),  # tile 32: two blocks a tile, three tiles a row; MHA
    (32, 16, 2, 1),  # tile 32 = the whole mask half
])
def test_kernel_path_equals_dense_training_mask(L, block_size, heads, kv_heads, monkeypatch):
  """The cuDNN path with its prefix core run by einsums (cuDNN has no CPU kernel), so the own part
  and the merge are the kernels: a kernel that lets a block see its tile's other blocks, merges with
  the wrong weights, or runs its backward with its own log-sum-exp fails here."""
  monkeypatch.setattr(mask_half_attention, "_core", lambda implementation: mask_half_attention.DENSE)
  B, D = 2, 16
  assert own_block_attention.tile_for(L, block_size, D) is not None
  keys = jax.random.split(jax.random.key(0), 6)
  q = jax.random.normal(keys[0], (B, L, heads, D))
  kc, vc, km, vm = (jax.random.normal(keys[i], (B, L, kv_heads, D)) for i in range(1, 5))
  dout = jax.random.normal(keys[5], (B, L, heads, D))
  mask = jnp.asarray(masks.training_mask(L, block_size)[L:])  # [L, 2L]: the mask half's rows

  def kernel_path(q, kc, vc, km, vm):
    return mask_half_attention.attention(q, kc, vc, km, vm, block_size, "cudnn")

  def dense(q, kc, vc, km, vm):  # softmax over [clean; mask] keys under the training mask's rows
    k, v = jnp.concatenate([kc, km], axis=1), jnp.concatenate([vc, vm], axis=1)
    return attention.dot_product_attention(q, k, v, mask[None])

  out_k, vjp_k = jax.vjp(jax.jit(kernel_path), q, kc, vc, km, vm)
  out_d, vjp_d = jax.vjp(jax.jit(dense), q, kc, vc, km, vm)
  for name, a, b in zip(("out", "dq", "dkc", "dvc", "dkm", "dvm"), (out_k, *vjp_k(dout)), (out_d, *vjp_d(dout))):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5, err_msg=name)


def test_cudnn_training_attention_runs_the_kernels_per_shard_under_a_mesh(monkeypatch):
  """Under a mesh (8 devices, batch over data) the cuDNN path's mask half is one call per shard, as
  the compiler would not split the Pallas calls (it would gather the global batch onto every device):
  the kernels see a shard's rows, and values and gradients equal the call without a mesh. cuDNN's
  parts run as einsums / XLA here (no CPU kernel)."""
  monkeypatch.setattr(mask_half_attention, "_core", lambda implementation: mask_half_attention.DENSE)
  xla_causal = attention.causal_attention
  monkeypatch.setattr(attention, "causal_attention", lambda q, k, v, implementation: xla_causal(q, k, v, "xla"))
  rows_seen = []
  forward = own_block_attention.forward

  def recording(q, *args, **kwargs):
    rows_seen.append(q.shape[0])
    return forward(q, *args, **kwargs)

  monkeypatch.setattr(own_block_attention, "forward", recording)
  B, L, H, Hkv, D, k = 8, 32, 4, 2, 16, 8
  keys = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(keys[0], (B, 2 * L, H, D))
  kk, v = (jax.random.normal(keys[i], (B, 2 * L, Hkv, D)) for i in (1, 2))
  cotangent = jax.random.normal(keys[3], (B, 2 * L, H, D))

  def loss(q, kk, v):
    return jnp.sum(attention.tidar_training_attention(q, kk, v, k, "cudnn") * cotangent)

  step = jax.value_and_grad(loss, argnums=(0, 1, 2))
  want = jax.jit(step)(q, kk, v)
  assert rows_seen == [B]
  config = tiny.get_config()
  mesh = sharding.make_mesh(config.mesh)
  assert mesh.shape["data"] == 8
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    got = jax.jit(step, in_shardings=(rows, rows, rows))(q, kk, v)
  assert rows_seen == [B, B // 8]
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)
