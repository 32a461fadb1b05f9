"""Device mesh from config, logical-axis rules, and shardings for params, optimizer state and batches.

Mesh axes are `("data", "fsdp", "tensor")`. Parameters carry logical axis names
(`nn.with_logical_partitioning`: vocab, embed, heads, kv_heads, head_dim, mlp, layers) and
activations are constrained by logical names (batch, length, embed, heads, mlp); the single table
`config.mesh.rules` maps logical names to mesh axes.

How the trainer wires it up (the rules context must be active while tracing anything that calls
`constrain`/`nn.with_logical_constraint`, else those constraints are silently skipped):

    mesh = make_mesh(config.mesh)
    rules = logical_rules(config.mesh)
    check_divisibility(model_cfg, mesh, config.train.batch_size, rules)   # before compiling
    abstract_state = jax.eval_shape(init_fn, key)       # boxed leaves keep their logical names
    state_shardings = param_shardings(abstract_state, mesh, rules)
    state = jax.jit(init_fn, out_shardings=state_shardings)(key)   # no full replica anywhere
    with activate(mesh, rules):          # == jax.set_mesh(mesh) + nn.logical_axis_rules(rules)
      batch = jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch)
      state, metrics = train_step(state, batch)   # jitted with in/out_shardings from above

Use `jax.set_mesh`, not the legacy `with mesh:`: flax finds the mesh through
`jax.sharding.get_abstract_mesh()`, which `with mesh:` no longer sets, so constraints would be
dropped without a word.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes

Rule = tuple[str, str | tuple[str, ...] | None]
Rules = tuple[Rule, ...]


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
  """Resolves `mesh.data/fsdp/tensor` (one of them may be -1: the rest of the devices)."""
  sizes = {axis: getattr(mesh_cfg, axis) for axis in MESH_AXES}
  described = ", ".join(f"mesh.{axis}={size!r}" for axis, size in sizes.items())
  bad = [axis for axis, size in sizes.items()
         if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1)]
  if bad:
    raise ValueError(f"{described}: each mesh size must be a positive integer or -1 "
                     f"(the rest of the devices); bad: {['mesh.' + a for a in bad]}")
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"{described}: at most one mesh axis may be -1; set the others to explicit sizes")
  known = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % known:
      raise ValueError(f"{described}: the explicit sizes multiply to {known}, which does not divide "
                       f"the {num_devices} devices; pick sizes whose product divides {num_devices}")
    sizes[free[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(f"{described} multiply to {known} but there are {num_devices} devices: the sizes "
                     "must multiply to the device count (set one of them to -1 to use the rest)")
  return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `("data", "fsdp", "tensor")` mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  # On TPU this orders devices along the physical torus (tensor = fastest axis = nearest chips);
  # elsewhere it is a plain reshape. Splitting physical axes lets shapes like (1, 8, 1) map onto
  # a 2x4 slice instead of failing.
  device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return Mesh(device_array, MESH_AXES)


def _axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry."""
  return entry if isinstance(entry, tuple) else (() if entry is None else (entry,))


def logical_rules(mesh_cfg: Any) -> Rules:
  """`mesh.rules` as hashable `(logical_name, mesh_axes)` pairs, checked against the mesh axes."""
  rules = []
  for i, entry in enumerate(mesh_cfg.rules):
    entry = tuple(entry)
    if len(entry) != 2 or not isinstance(entry[0], str):
      raise ValueError(f"mesh.rules[{i}]={entry!r}: each rule is (logical_name, mesh_axes)")
    name, target = entry
    # ConfigDict and CLI overrides may turn tuples into lists; flax wants tuples.
    target = tuple(target) if isinstance(target, (list, tuple)) else target
    unknown = [a for a in _axes(target) if a not in MESH_AXES]
    if unknown:
      raise ValueError(f"mesh.rules[{i}]=({name!r}, {target!r}): unknown mesh axes {unknown}; "
                       f"use names from {MESH_AXES} or None (replicated)")
    rules.append((name, target))
  return tuple(rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Makes `mesh` and `rules` current, so that `constrain` and flax logical constraints apply."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op outside `activate`."""
  return nn.with_logical_constraint(x, logical_axes)


def _split(mesh: Mesh, axes: tuple[str, ...]) -> str:
  """'mesh.tensor=4' or 'mesh.data=2 * mesh.fsdp=2 = 4', for error messages."""
  named = " * ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
  return named if len(axes) == 1 else f"{named} = {math.prod(mesh.shape[a] for a in axes)}"


def _shape(subtree: Any) -> tuple[int, ...] | None:
  """Shape of an array leaf or of the single array inside a metadata box."""
  leaves = jax.tree.leaves(subtree)
  return tuple(leaves[0].shape) if len(leaves) == 1 and hasattr(leaves[0], "shape") else None


def _check_shardable(shardings: Any, abstract_tree: Any) -> None:
  """Names every leaf whose sharded dims don't divide by their mesh axes, before XLA would."""
  errors = []

  def check(path: Any, sharding: NamedSharding | None, subtree: Any) -> None:
    shape = _shape(subtree)
    if sharding is None or shape is None:
      return
    for dim, (size, entry) in enumerate(zip(shape, sharding.spec)):
      axes = _axes(entry)
      if size % math.prod(sharding.mesh.shape[a] for a in axes):
        names = getattr(subtree, "names", None)
        logical = f" (logical {names[dim]!r})" if names else ""
        errors.append(f"{jax.tree_util.keystr(path)}: dim {dim}{logical} of size {size} does not split "
                      f"over {_split(sharding.mesh, axes)}")

  jax.tree_util.tree_map_with_path(check, shardings, abstract_tree, is_leaf=lambda x: x is None)
  if errors:
    shown = errors[:8] + ([f"... and {len(errors) - 8} more"] if len(errors) > 8 else [])
    raise ValueError("parameters do not divide evenly over the mesh; change the mesh sizes or "
                     "mesh.rules:\n  " + "\n  ".join(shown))


def param_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """`NamedSharding`s for a params pytree or a whole train state (optax state included).

  Leaves boxed by `nn.with_logical_partitioning` (also the boxes optax copies into its moments)
  are sharded by their logical names through `rules`; other array leaves are replicated. The
  result has a `NamedSharding` where the input has a box or an array, so it serves as
  `out_shardings` for both the boxed and the `nn.unbox`ed tree.
  """
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_tree), mesh, rules)
  _check_shardable(shardings, abstract_tree)
  return shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch dim 0 split over data * fsdp; every other dim replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _shards(logical_name: str, mesh: Mesh, rules: Rules) -> tuple[int, str]:
  """How many ways `logical_name` is split, and the mesh fields doing it (for messages)."""
  axes = _axes(nn.logical_to_mesh_axes((logical_name,), rules)[0])
  return math.prod(mesh.shape[a] for a in axes), _split(mesh, axes)


def divisibility_errors(model_cfg: Any, mesh: Mesh, global_batch_size: int, rules: Rules) -> list[str]:
  """Every model/batch dimension that does not split evenly over the mesh axes its rule names."""
  errors = []
  batch, batch_axes = _shards("batch", mesh, rules)
  if global_batch_size % batch:
    errors.append(f"train.batch_size={global_batch_size} is not divisible by {batch_axes}: "
                  f"use a multiple of {batch} or fewer data-parallel devices")
  kv, kv_axes = _shards("kv_heads", mesh, rules)
  if model_cfg.num_kv_heads < kv:
    errors.append(f"model.num_kv_heads={model_cfg.num_kv_heads} is smaller than {kv_axes}: every "
                  "tensor shard needs at least one whole KV head; use fewer tensor shards (a divisor "
                  f"of {model_cfg.num_kv_heads}) and put the remaining devices on mesh.data/mesh.fsdp")
  elif model_cfg.num_kv_heads % kv:
    errors.append(f"model.num_kv_heads={model_cfg.num_kv_heads} is not divisible by {kv_axes}: use a "
                  f"divisor of {model_cfg.num_kv_heads} for the tensor shards")
  for field, logical in (("num_heads", "heads"), ("mlp_dim", "mlp"), ("vocab_size", "vocab"),
                         ("d_model", "embed")):
    size = getattr(model_cfg, field)
    count, axes = _shards(logical, mesh, rules)
    if size % count:
      errors.append(f"model.{field}={size} is not divisible by {axes} (logical axis "
                    f"{logical!r}): change the mesh sizes or model.{field}")
  return errors


def check_divisibility(model_cfg: Any, mesh: Mesh, global_batch_size: int,
                       rules: Rules | None = None) -> None:
  """Raises one ValueError listing every dimension that can't be sharded, before anything compiles.

  `rules` defaults to the rules of the current `activate`/`nn.logical_axis_rules` context.
  """
  rules = tuple(nn.get_logical_axis_rules()) if rules is None else rules
  if not rules:
    raise ValueError("check_divisibility: no logical axis rules; pass logical_rules(config.mesh) "
                     "or call it inside activate(mesh, rules)")
  errors = divisibility_errors(model_cfg, mesh, global_batch_size, rules)
  if errors:
    raise ValueError("model and batch do not fit the mesh:\n  " + "\n  ".join(errors))

