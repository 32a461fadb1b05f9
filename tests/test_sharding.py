"""Mesh resolution, logical rules, param/state shardings, divisibility errors, cluster detection."""

import sys
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import tiny
from tidar_jax import distributed, sharding


def mesh_cfg(data, fsdp, tensor):
  cfg = tiny.get_config().mesh
  cfg.data, cfg.fsdp, cfg.tensor = data, fsdp, tensor
  return cfg


def test_eight_fake_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("sizes, expected", [
    ((8, 1, 1), (8, 1, 1)),
    ((1, 8, 1), (1, 8, 1)),
    ((2, 2, 2), (2, 2, 2)),
    ((2, -1, 2), (2, 2, 2)),
    ((-1, 1, 1), (8, 1, 1)),
    ((1, 1, -1), (1, 1, 8)),
])
def test_make_mesh_resolves_sizes(sizes, expected):
  mesh = sharding.make_mesh(mesh_cfg(*sizes))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape.values()) == expected
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_on_a_device_subset():
  mesh = sharding.make_mesh(mesh_cfg(-1, 1, 2), devices=jax.devices()[:4])
  assert tuple(mesh.shape.values()) == (2, 1, 2)


@pytest.mark.parametrize("sizes, message", [
    ((2, 2, 1), r"mesh.data=2, mesh.fsdp=2, mesh.tensor=1 multiply to 4 but there are 8 devices"),
    ((-1, -1, 1), r"at most one mesh axis may be -1"),
    ((3, -1, 1), r"multiply to 3, which does not divide the 8 devices"),
    ((0, 8, 1), r"mesh.data=0.*positive integer or -1"),
])
def test_bad_mesh_names_fields(sizes, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(mesh_cfg(*sizes))


def test_mesh_sizes_must_be_integers():
  with pytest.raises(ValueError, match=r"bad: \['mesh.tensor'\]"):
    sharding.mesh_shape(SimpleNamespace(data=2, fsdp=2, tensor=2.0), 8)


def test_logical_rules_from_config():
  cfg = tiny.get_config().mesh
  cfg.rules = [["batch", ["data", "fsdp"]], ("mlp", "tensor"), ("layers", None)]  # CLI-style lists
  assert sharding.logical_rules(cfg) == (("batch", ("data", "fsdp")), ("mlp", "tensor"), ("layers", None))
  rules = sharding.logical_rules(tiny.get_config().mesh)
  assert ("embed", "fsdp") in rules and hash(rules)


def test_logical_rules_reject_unknown_mesh_axis():
  cfg = tiny.get_config().mesh
  cfg.rules = (("mlp", "model"),)
  with pytest.raises(ValueError, match=r"mesh.rules\[0\].*unknown mesh axes \['model'\]"):
    sharding.logical_rules(cfg)


class Tiny(nn.Module):
  """One logically partitioned matrix and one plain (replicated) bias."""

  @nn.compact
  def __call__(self, x):  # x: [batch, 16]
    w = self.param("w", nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
                   (16, 32))
    b = self.param("b", nn.initializers.zeros, (32,))
    return x @ w + b[None]  # [batch, 32]


def init_state():
  params = Tiny().init(jax.random.key(0), jnp.ones((2, 16)))
  return {"params": params, "opt": optax.adamw(1e-3).init(params), "step": jnp.int32(0)}


def test_param_shardings_shard_the_named_dims():
  mesh = sharding.make_mesh(mesh_cfg(1, 2, 4))
  rules = sharding.logical_rules(tiny.get_config().mesh)
  abstract = jax.eval_shape(init_state)
  shardings = sharding.param_shardings(abstract, mesh, rules)
  assert shardings["params"]["params"]["w"].spec == P("fsdp", "tensor")
  assert shardings["params"]["params"]["b"].spec == P()
  adam = shardings["opt"][0]  # ScaleByAdamState: the moments inherit the params' boxes
  assert adam.mu["params"]["w"].spec == P("fsdp", "tensor")
  assert adam.count.spec == P() and shardings["step"].spec == P()

  state = jax.jit(init_state, out_shardings=shardings)()
  w = nn.unbox(state["params"])["params"]["w"]
  assert {s.data.shape for s in w.addressable_shards} == {(8, 8)}  # 16/fsdp=2, 32/tensor=4
  b = state["params"]["params"]["b"]
  assert {s.data.shape for s in b.addressable_shards} == {(32,)}
  # device_put with the same shardings on the unboxed tree lands on the same layout
  placed = jax.device_put(nn.unbox(init_state()["params"]), shardings["params"])
  assert {s.data.shape for s in placed["params"]["w"].addressable_shards} == {(8, 8)}


def test_param_shardings_name_the_leaf_that_does_not_divide():
  mesh = sharding.make_mesh(mesh_cfg(1, 1, 8))
  rules = (("embed", None), ("mlp", "tensor"))

  class Odd(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x @ self.param("w", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp")),
                            (16, 12))

  abstract = jax.eval_shape(lambda: Odd().init(jax.random.key(0), jnp.ones((1, 16))))
  with pytest.raises(ValueError, match=r"\['params'\]\['w'\]: dim 1 \(logical 'mlp'\) of size 12 does not "
                                       r"split over mesh.tensor=8$"):
    sharding.param_shardings(abstract, mesh, rules)


def test_batch_sharding_and_replicated():
  mesh = sharding.make_mesh(mesh_cfg(2, 2, 2))
  batch = jax.device_put(np.zeros((8, 6), np.int32), sharding.batch_sharding(mesh))
  assert {s.data.shape for s in batch.addressable_shards} == {(2, 6)}  # 8 / (data*fsdp=4)
  assert sharding.replicated(mesh).spec == P()


def test_constrain_applies_only_inside_activate():
  mesh = sharding.make_mesh(mesh_cfg(2, 2, 2))
  rules = sharding.logical_rules(tiny.get_config().mesh)
  f = jax.jit(lambda x: sharding.constrain(x * 2, ("batch", "mlp")))
  x = jnp.ones((4, 8))
  assert len(f(x).sharding.device_set) == 1  # no rules, no mesh: untouched
  with sharding.activate(mesh, rules):
    y = f(x)
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), "tensor")), y.ndim)
  assert {s.data.shape for s in y.addressable_shards} == {(1, 4)}
  np.testing.assert_array_equal(y, 2 * np.ones((4, 8)))


MODEL = SimpleNamespace(num_heads=8, num_kv_heads=4, mlp_dim=512, vocab_size=8192, d_model=128)


def test_check_divisibility_passes_a_good_fit():
  rules = sharding.logical_rules(tiny.get_config().mesh)
  sharding.check_divisibility(MODEL, sharding.make_mesh(mesh_cfg(2, 2, 2)), 8, rules)
  with sharding.activate(sharding.make_mesh(mesh_cfg(2, 1, 4)), rules):  # rules from the context
    sharding.check_divisibility(MODEL, sharding.make_mesh(mesh_cfg(2, 1, 4)), 8)


@pytest.mark.parametrize("model, sizes, batch, message", [
    ({}, (2, 2, 2), 6, r"train.batch_size=6 is not divisible by mesh.data=2 \* mesh.fsdp=2 = 4"),
    (dict(num_heads=18, num_kv_heads=6), (2, 1, 4), 8,
     r"model.num_kv_heads=6 is not divisible by mesh.tensor=4.*\n"
     r".*model.num_heads=18 is not divisible by mesh.tensor=4"),
    (dict(num_kv_heads=2), (1, 1, 8), 8,
     r"model.num_kv_heads=2 is smaller than mesh.tensor=8.*fewer tensor shards"),
    (dict(mlp_dim=510), (1, 2, 4), 8, r"model.mlp_dim=510 is not divisible by mesh.tensor=4"),
    (dict(vocab_size=8190), (1, 2, 4), 8, r"model.vocab_size=8190 is not divisible by mesh.tensor=4"),
    (dict(d_model=130), (1, 4, 2), 8, r"model.d_model=130 is not divisible by mesh.fsdp=4"),
])
def test_check_divisibility_names_fields(model, sizes, batch, message):
  model = SimpleNamespace(**{**vars(MODEL), **model})
  rules = sharding.logical_rules(tiny.get_config().mesh)
  with pytest.raises(ValueError, match=message):
    sharding.check_divisibility(model, sharding.make_mesh(mesh_cfg(*sizes)), batch, rules)


def test_check_divisibility_needs_rules():
  with pytest.raises(ValueError, match="no logical axis rules"):
    sharding.check_divisibility(MODEL, sharding.make_mesh(mesh_cfg(8, 1, 1)), 8)


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, None),
    ({"SLURM_NTASKS": "16", "SLURM_PROCID": "3"}, "slurm"),
    ({"SLURM_NTASKS": "garbage"}, None),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}, "tpu_pod"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080", "TPU_WORKER_HOSTNAMES": "w-0"}, "tpu_multislice"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "SLURM_NTASKS": "4"}, "jax_coordinator"),
])
def test_detect_cluster(env, expected):
  assert distributed.detect_cluster(env) == expected


CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
                "SLURM_NTASKS")


@pytest.fixture
def init_calls(monkeypatch):
  """Records jax.distributed.initialize calls instead of joining a cluster."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
  for var in CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  return calls


def test_maybe_initialize_single_host_does_nothing(init_calls):
  hook = sys.excepthook
  distributed.maybe_initialize()
  assert init_calls == [] and sys.excepthook is hook


def test_maybe_initialize_explicit_flags_skip_auto_detection(init_calls):
  hook = sys.excepthook
  distributed.maybe_initialize("127.0.0.1:1234", 2, 1)
  assert init_calls == [dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1,
                             cluster_detection_method="deactivate")]
  assert sys.excepthook is not hook  # joined: an uncaught exception ends the process at once


def test_maybe_initialize_partial_flags_let_jax_fill_in(init_calls):
  distributed.maybe_initialize("10.0.0.1:8476", 4)
  assert init_calls == [dict(coordinator_address="10.0.0.1:8476", num_processes=4, process_id=None,
                             cluster_detection_method=None)]


def test_maybe_initialize_detected_cluster(init_calls, monkeypatch):
  monkeypatch.setenv("SLURM_NTASKS", "8")
  distributed.maybe_initialize()
  assert init_calls == [{}]
