"""The sharded train step on the 8 fake CPU devices: the same loss and update as one device on every
mesh, parameters really split, reshard-on-restore, and bad meshes rejected before anything compiles.

Goes through the trainer's own functions (tidar_jax.train_step: abstract_train_state -> param_shardings ->
create_train_state -> make_train_step under jax.jit with in/out shardings and donation), with synthetic token batches.
"""

import math

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import tiny
from tidar_jax import checkpoint, sharding, train, train_step
from tidar_jax.config import validate
from tidar_jax.optimizer import make_optimizer

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 1, 8)]
# LLVM's optimisation level only changes code generation, not the HLO or its SPMD partitioning that
# these tests check (results move by float rounding, ~1e-7); skipping it halves each CPU compile.
# The tests pass with the default level too.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# The same for the compilations these tests do not jit themselves (create_train_state's init,
# checkpointing's slices): conftest.fast_compile.
pytestmark = pytest.mark.usefixtures("fast_compile")


def mesh_config(data=1, fsdp=1, tensor=1):
  """fp32, every sharded dim divisible by 8: 8 query and 8 KV heads, so even tensor=8 divides."""
  c = tiny.get_config()
  m = c.model
  m.vocab_size, m.d_model, m.num_layers, m.mlp_dim = 256, 32, 2, 64
  m.num_heads, m.num_kv_heads, m.head_dim = 8, 8, 8
  m.qkv_bias, m.qk_norm, m.tie_embeddings = True, True, False  # every kind of parameter
  m.dtype = m.param_dtype = "float32"
  c.tidar.block_size = 4
  c.train.seq_len, c.train.batch_size, c.train.warmup_steps = 16, 8, 0  # lr > 0 at step 0
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  return c


def tokens_for(config):
  rng = np.random.default_rng(0)
  return rng.integers(0, config.model.vocab_size - 1, (config.train.batch_size, config.train.seq_len), np.int32)


def setup(config, devices=None):
  """(model_cfg, tx, mesh, rules, abstract state, state shardings) for config.mesh over `devices`."""
  model_cfg = validate(config)
  tx = make_optimizer(config.train)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config.mesh)
  sharding.check_divisibility(model_cfg, mesh, config.train.batch_size, rules)
  abstract = train_step.abstract_train_state(model_cfg, tx, config.seed)
  return model_cfg, tx, mesh, rules, abstract, sharding.param_shardings(abstract, mesh, rules)


def one_step(config, state, devices=None):
  """One jitted train step on config.mesh from `state` (host arrays): (new state, metrics, mesh)."""
  model_cfg, tx, mesh, rules, _, shardings = setup(config, devices)
  state = jax.device_put(state, shardings)  # the params/optimizer layout the rules give on this mesh
  batch_sharding = sharding.batch_sharding(mesh)
  with sharding.activate(mesh, rules):
    step = jax.jit(train_step.make_train_step(model_cfg, config, tx, mask_id=config.model.vocab_size - 1),
                   in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                   donate_argnums=(0,), compiler_options=FAST_COMPILE)
    tokens = jax.make_array_from_process_local_data(batch_sharding, tokens_for(config))
    new_state, metrics = step(state, tokens)
  return new_state, jax.device_get(metrics), mesh


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def single_device():
  """The reference: initial state and one step on a 1x1x1 mesh over the first device."""
  config = mesh_config()
  model_cfg, tx, _, _, _, shardings = setup(config, jax.devices()[:1])
  init = host(train_step.create_train_state(model_cfg, tx, config.seed, shardings))
  state, metrics, _ = one_step(config, init, jax.devices()[:1])
  return init, host(state), metrics


def _grads(state):
  """AdamW's first moment after one step from zero is (1 - b1) * grad: the gradient, recovered."""
  b1 = mesh_config().train.adam_b1
  return jax.tree.map(lambda mu: np.asarray(mu) / (1 - b1), state["opt_state"][1][0].mu)


def _expected_spec(path: str) -> P:
  """The specs mesh.rules should give (written out, not derived from the code under test)."""
  t, f = "tensor", "fsdp"
  return {
      "embed/embedding": P(t, f),
      "lm_head/kernel": P(f, t),
      "final_norm/scale": P(f),
      "layers/attn/q/kernel": P(None, f, t, None),
      "layers/attn/k/kernel": P(None, f, t, None),
      "layers/attn/v/kernel": P(None, f, t, None),
      "layers/attn/q/bias": P(None, t, None),
      "layers/attn/k/bias": P(None, t, None),
      "layers/attn/v/bias": P(None, t, None),
      "layers/attn/o/kernel": P(None, t, None, f),
      "layers/attn/q_norm/scale": P(None, None),
      "layers/attn/k_norm/scale": P(None, None),
      "layers/attn_norm/scale": P(None, f),
      "layers/mlp_norm/scale": P(None, f),
      "layers/mlp/gate/kernel": P(None, f, t),
      "layers/mlp/up/kernel": P(None, f, t),
      "layers/mlp/down/kernel": P(None, t, f),
  }[path]


def _flat(tree):
  return {"/".join(str(k.key) for k in path if k.key != "params"): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_step_matches_single_device(single_device, sizes):
  ref_init, ref_state, ref_metrics = single_device
  state, metrics, mesh = one_step(mesh_config(*sizes), ref_init)
  assert tuple(mesh.shape.values()) == sizes

  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
  ref_grads = _flat(_grads(ref_state))
  for path, g in _flat(_grads(state)).items():
    np.testing.assert_allclose(g, ref_grads[path], rtol=0, atol=1e-6, err_msg=f"gradient of {path}")
  params, ref_params, ref_init_params = _flat(state["params"]), _flat(ref_state["params"]), _flat(ref_init["params"])
  assert len(params) == len(ref_params) == 17
  for path, x in params.items():
    x, y = np.asarray(x), ref_params[path]
    assert not np.array_equal(y, ref_init_params[path]), f"{path} was not updated"
    # AdamW's first step moves each weight by ~lr * g / (|g| + 1e-8): where |g| is within float noise
    # of that epsilon the step is ill-conditioned (a 1e-9 change in g moves it by ~lr/10), so those
    # few weights are held to the step size; all others (exact zeros included) to 1e-5.
    g = ref_grads[path]
    tiny = (np.abs(g) < 1e-7) & (g != 0)
    assert tiny.mean() < 0.01, path
    np.testing.assert_allclose(x[~tiny], y[~tiny], rtol=0, atol=1e-5, err_msg=path)
    np.testing.assert_allclose(x[tiny], y[tiny], rtol=0, atol=2 * mesh_config().train.learning_rate)

  # Really sharded: the specs the rules promise, on this mesh, with the right per-device pieces.
  for path, x in params.items():
    expected = _expected_spec(path)
    assert x.sharding.mesh.shape == mesh.shape and x.sharding.spec == expected, (path, x.sharding)
    split = [math.prod(mesh.shape[a] for a in (e if isinstance(e, tuple) else (e,))) if e else 1
             for e in list(expected) + [None] * (x.ndim - len(expected))]
    want = tuple(dim // n for dim, n in zip(x.shape, split))
    assert len(x.addressable_shards) == 8 and {s.data.shape for s in x.addressable_shards} == {want}, path
  mu = state["opt_state"][1][0].mu["params"]  # the optimizer state follows the params
  assert mu["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
  per_device = {s.data.shape for s in mu["layers"]["mlp"]["down"]["kernel"].addressable_shards}
  assert per_device == {(2, 64 // sizes[2], 32 // sizes[1])}  # [layers, mlp / tensor, embed / fsdp]


def test_sharded_init_and_reshard_on_restore(single_device, tmp_path):
  """create_train_state on an 8-way fsdp mesh equals the single-device init; a checkpoint of it restores
  onto data=2 x tensor=4 with equal values and the new shardings."""
  ref_init = single_device[0]
  config = mesh_config(1, 8, 1)
  model_cfg, tx, _, rules, abstract, src_shardings = setup(config)
  state = train_step.create_train_state(model_cfg, tx, config.seed, src_shardings)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(ref_init)):
    np.testing.assert_array_equal(np.asarray(x), y, err_msg=jax.tree_util.keystr(path))
  assert state["params"]["params"]["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")

  # Distinct values in every leaf (zero moments would restore "equal" whatever happened).
  rng = np.random.default_rng(1)
  saved = jax.tree.map(lambda x: (x + rng.normal(size=x.shape)).astype(x.dtype), host(state))
  state = jax.device_put(saved, src_shardings)
  assert state["opt_state"][1][0].mu["params"]["final_norm"]["scale"].sharding.spec == P("fsdp")
  manager = checkpoint.make_manager(str(tmp_path), max_to_keep=1, async_save=False)
  checkpoint.save(manager, 7, state, None, config)
  manager.wait_until_finished()

  dst_mesh = sharding.make_mesh(mesh_config(2, 1, 4).mesh)
  dst_shardings = sharding.param_shardings(abstract, dst_mesh, rules)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.unbox(abstract), dst_shardings)
  step, restored = checkpoint.restore_latest(checkpoint.make_manager(str(tmp_path), max_to_keep=1), target, None)
  assert step == 7
  leaves = jax.tree_util.tree_flatten_with_path(restored)[0]
  assert len(leaves) == len(jax.tree.leaves(saved)) == len(jax.tree.leaves(dst_shardings))
  for (path, x), want, s in zip(leaves, jax.tree.leaves(saved), jax.tree.leaves(dst_shardings)):
    np.testing.assert_array_equal(np.asarray(x), want, err_msg=jax.tree_util.keystr(path))
    assert x.sharding == s, jax.tree_util.keystr(path)
  q = restored["params"]["params"]["layers"]["attn"]["q"]["kernel"]  # [layers, embed, heads, head_dim]
  assert q.sharding.mesh.shape == dst_mesh.shape and q.sharding.spec == P(None, "fsdp", "tensor", None)
  assert {s.data.shape for s in q.addressable_shards} == {(2, 32, 2, 8)}  # heads 8 / tensor 4
  mu = restored["opt_state"][1][0].mu["params"]["layers"]["mlp"]["up"]["kernel"]  # [layers, embed, mlp]
  assert {s.data.shape for s in mu.addressable_shards} == {(2, 32, 16)}  # mlp 64 / tensor 4


@pytest.mark.parametrize("overrides, message", [
    (dict(mesh=(3, -1, 1)), r"mesh.data=3, mesh.fsdp=-1, mesh.tensor=1: the explicit sizes multiply to 3, "
                            r"which does not divide the 8 devices"),
    (dict(mesh=(2, 2, 1)), r"multiply to 4 but there are 8 devices"),
    (dict(mesh=(1, 2, 4), num_heads=6, num_kv_heads=6),
     r"model.num_kv_heads=6 is not divisible by mesh.tensor=4(.|\n)*model.num_heads=6 is not divisible by "
     r"mesh.tensor=4"),
    (dict(mesh=(2, 2, 2), batch_size=6), r"train.batch_size=6 is not divisible by mesh.data=2 \* mesh.fsdp=2 = 4"),
], ids=["mesh-not-dividing-devices", "mesh-not-covering-devices", "heads-vs-tensor", "batch-vs-data-fsdp"])
def test_trainer_rejects_bad_fits_before_compiling(tmp_path, monkeypatch, overrides, message):
  """train_and_evaluate names the bad fields before it reads data, initialises or compiles anything."""
  from tidar_jax import data

  overrides = dict(overrides)
  config = mesh_config(*overrides.pop("mesh"))
  if "batch_size" in overrides:
    config.train.batch_size = overrides.pop("batch_size")
  for k, v in overrides.items():
    setattr(config.model, k, v)

  def forbidden(*args, **kwargs):
    raise AssertionError("reached data loading / compilation before rejecting the mesh")

  monkeypatch.setattr(jax, "jit", forbidden)
  monkeypatch.setattr(data, "get_tokenizer", forbidden)
  monkeypatch.setattr(data, "load_splits", forbidden)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
