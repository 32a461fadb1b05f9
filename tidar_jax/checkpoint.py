"""Orbax checkpoints: training state + data iterator state per step, and params-only exports.

Training checkpoints live in `workdir/checkpoints/<step>/` as one orbax Composite: `state`
(step, params, optimizer state), `data` (the grain iterator position, so a resumed run sees the
same batches) and `config` (JSON). `workdir/tokenizer.json` is written once beside them.
Restores take the abstract state with target shardings, so arrays come back laid out for the
current mesh, whatever mesh wrote them.

Exports (`python -m tidar_jax.export`) are params-only: `out/params`, `out/config.json`,
`out/tokenizer.json`; `load_for_inference` reads an export or, equally, a training workdir.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

CHECKPOINT_DIR = "checkpoints"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def config_from_json(data: dict[str, Any]) -> ml_collections.ConfigDict:
  def tuples(x):  # JSON turns the rules table's tuples into lists
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x

  data = json.loads(json.dumps(data))  # a private copy to edit
  if "rules" in data.get("mesh", {}):
    data["mesh"]["rules"] = tuples(data["mesh"]["rules"])
  return ml_collections.ConfigDict(data)


def make_manager(workdir: str, *, max_to_keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINT_DIR)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                         create=True)
  return ocp.CheckpointManager(path, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any,
         config: ml_collections.ConfigDict, *, force: bool = False) -> bool:
  import grain  # local: only the trainer needs grain

  items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_to_json(config)))
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any
                   ) -> tuple[int, Any] | None:
  """Restores the newest readable checkpoint; a corrupt one is skipped with a warning.

  Returns (step, state) or None when there is no checkpoint; `data_iterator` is restored in place.
  """
  import grain

  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    # State first, the iterator only once the state is known good: a half-read corrupt
    # checkpoint must not leave the iterator at its position.
    try:
      state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back to an older one
      logging.warning("checkpoint at step %d in %s is unreadable (%s: %s); falling back to the previous one",
                      step, manager.directory, type(e).__name__, str(e).splitlines()[0][:200])
      print(f"WARNING: checkpoint step {step} is unreadable ({type(e).__name__}); trying the previous one")
      continue
    if data_iterator is not None:
      manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return step, state
  if steps:
    raise ValueError(f"no readable checkpoint in {manager.directory} (tried steps {steps}); "
                     "delete the directory to start afresh")
  return None


def save_inference(path: str, params: Any, config: ml_collections.ConfigDict, tokenizer: Any = None,
                   dtype: Any = None) -> None:
  """Params-only export for serving: `path/params` (orbax), `path/config.json`, `path/tokenizer.json`."""
  path = os.path.abspath(os.path.expanduser(path))
  os.makedirs(path, exist_ok=True)
  if dtype is not None:
    params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), params, force=True)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(config_to_json(config), f, indent=2)
  if tokenizer is not None:
    tokenizer.save(path)


def _require(path: str, what: str, fix: str) -> None:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what} not found at {path}: {fix}")


def load_params(path: str, abstract_params: Any = None) -> Any:
  """Loads `path/params` of an export (sharded as `abstract_params` says, if given)."""
  params_dir = os.path.join(os.path.abspath(os.path.expanduser(path)), "params")
  _require(params_dir, "exported params", "pass a directory written by `python -m tidar_jax.export` "
           "or `tidar_jax.convert.from_hf`")
  with ocp.StandardCheckpointer() as ckptr:
    try:
      return ckptr.restore(params_dir, abstract_params)
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"cannot restore params from {params_dir} ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:300]}); the export is corrupt or was written for "
                       "another model shape") from e


def _params_here(manager: ocp.CheckpointManager, step: int) -> ocp.args.PyTreeRestore:
  """Restore args for the params alone of a training checkpoint (not the optimizer state), onto this
  process's first device whatever mesh and process count saved them: the target's shardings come
  from here, its shapes and dtypes from the checkpoint's metadata."""
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  meta = manager.item_metadata(step).state["params"]
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), meta)
  return ocp.args.PyTreeRestore(item={"params": target},
                                restore_args={"params": ocp.checkpoint_utils.construct_restore_args(target)},
                                partial_restore=True)


def _reading_manager(workdir: str) -> ocp.CheckpointManager:
  """A manager that reads a training workdir's checkpoints and leaves the directory as it is.

  PyTree (not Standard) handling of the state: it reads the metadata and restores a subtree. Every
  item has its handler, `data` too, though it is not read: orbax warns about items it cannot handle.
  Not read_only=True, which warns on every use; create=False and no saves leave the directory as it
  is (a run may be writing it)."""
  import grain

  return ocp.CheckpointManager(os.path.join(workdir, CHECKPOINT_DIR),
                               options=ocp.CheckpointManagerOptions(create=False, save_interval_steps=0),
                               item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                              "config": ocp.JsonCheckpointHandler(),
                                              "data": grain.checkpoint.CheckpointHandler()})


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of a training workdir's kept checkpoints, ascending (empty if it has none)."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
    return []
  return sorted(_reading_manager(workdir).all_steps())


def load_for_inference(path: str, flag: str = "--checkpoint", step: int | None = None
                       ) -> tuple[Any, ml_collections.ConfigDict, Any]:
  """(params, config, tokenizer) from an export directory or a training workdir (its latest step, or
  `step`). `flag`: the command-line flag that gave `path`, named in the errors."""
  from tidar_jax.tokenizer import Tokenizer

  path = os.path.abspath(os.path.expanduser(path))
  _require(path, "checkpoint directory", f"check the {flag} path")
  if os.path.isdir(os.path.join(path, "params")):
    if step is not None:
      raise ValueError(f"{flag}={path} is an export (one set of weights); a step applies to a training workdir")
    with open(os.path.join(path, CONFIG_FILE)) as f:
      config = config_from_json(json.load(f))
    params = load_params(path)
  elif os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
    manager = _reading_manager(path)
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"{flag}={path}: no checkpoint under {CHECKPOINT_DIR}/ yet; train first, or pass "
                              "an export")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise ValueError(f"step {step}: {flag}={path} holds checkpoints of steps {sorted(steps)}; pick one of them")
    restored = manager.restore(step, args=ocp.args.Composite(state=_params_here(manager, step),
                                                             config=ocp.args.JsonRestore()))
    params, config = restored.state["params"], config_from_json(restored.config)
  else:
    raise FileNotFoundError(f"{flag}={path} holds neither an export (params/) nor training checkpoints "
                            f"({CHECKPOINT_DIR}/): pass a --workdir of tidar_jax.train or an export dir")
  tok_path = os.path.join(path, TOKENIZER_FILE)
  _require(tok_path, "tokenizer.json", "the checkpoint directory must hold the tokenizer it was trained with")
  return params, config, Tokenizer.load(tok_path)
