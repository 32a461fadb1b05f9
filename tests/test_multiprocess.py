"""A multi-host run in miniature: `launch/local_multiprocess.sh` starts 2 processes x 4 CPU devices of
the real `python -m tidar_jax.train` on one data x fsdp x tensor = 2x2x2 mesh spanning both processes;
then this (single) process restores the checkpoint onto other meshes of its 8 devices."""

import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from tidar_jax import checkpoint, data, sharding, train, train_step
from tidar_jax.config import validate
from tidar_jax.optimizer import make_optimizer
from tidar_jax.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
TRAIN_ARGS = [
    "--config=configs/tiny.py", "--config.data.dataset=text_files", f"--config.data.source={ROOT}/tidar_jax",
    "--config.data.validation_fraction=0.2", "--config.model.vocab_size=384", "--config.model.d_model=32",
    "--config.model.num_layers=2", "--config.model.num_heads=2", "--config.model.num_kv_heads=2",
    "--config.model.head_dim=16", "--config.model.mlp_dim=64", "--config.tidar.block_size=4",
    "--config.train.seq_len=32", "--config.train.batch_size=8", f"--config.train.steps={STEPS}",
    "--config.train.warmup_steps=1", "--config.train.log_every=1", "--config.train.eval_batches=1",
    "--config.train.eval_every=100", "--config.train.checkpoint_every=100",  # both happen at the last step
    "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
]
# LLVM's optimisation level only changes code generation, not the HLO or its SPMD partitioning that
# these tests check (results move by float rounding, ~1e-7); skipping it halves each CPU compile.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def multiprocess_run(tmp_path_factory):
  base = tmp_path_factory.mktemp("mp")
  workdir = base / "run"
  drop = re.compile(r"^(SLURM_|TPU_|MEGASCALE_|JAX_COORDINATOR|JAX_NUM_CPU_DEVICES$|WORKDIR$)")
  env = {k: v for k, v in os.environ.items() if not drop.match(k)}
  env.update(PYTHON=sys.executable, WORKDIR=str(workdir), PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_backend_optimization_level=0")  # not the test's 8 devices: the script sets 4
  result = subprocess.run(
      ["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2", "4", *TRAIN_ARGS,
       f"--config.data.data_dir={base / 'data'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  logs = [(workdir / f"proc_{i}.log").read_text() if (workdir / f"proc_{i}.log").exists() else ""
          for i in range(2)]
  assert result.returncode == 0, result.stderr + "\n".join(log[-3000:] for log in logs)
  return workdir, logs


def test_processes_agree_and_only_process_0_writes_metrics(multiprocess_run):
  workdir, logs = multiprocess_run
  losses = []
  for i, log in enumerate(logs):
    found = re.findall(rf"^process {i}/2: step {STEPS} train loss (\S+)$", log, re.M)
    assert len(found) == 1, log[-3000:]
    losses.append(float(found[0]))
  assert losses[0] == losses[1]  # one global (replicated) loss, bit for bit
  assert "final validation (step 3)" in logs[0] and "final validation" not in logs[1]

  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in records if "loss" in r]
  assert train_steps == [1, 2, 3]  # written once, by process 0 only
  last = next(r for r in records if r["step"] == STEPS and "loss" in r)
  assert last["loss"] == pytest.approx(losses[0], rel=1e-7) and np.isfinite(last["loss"])
  assert last["ar_tokens"] == 8 * 31  # the global batch: both processes' rows were used
  assert os.listdir(workdir / "checkpoints") == [str(STEPS)]


def _config(workdir):
  """The run's config, as saved in its checkpoint."""
  manager = checkpoint.make_manager(str(workdir), max_to_keep=1)
  saved = manager.restore(STEPS, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
  return checkpoint.config_from_json(saved)


def _restore(workdir, sizes, devices=None):
  """restore_latest onto a (data, fsdp, tensor) mesh of this process's devices: (config, state, mesh, rules,
  shardings)."""
  config = _config(workdir)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = sizes
  model_cfg = validate(config)
  tx = make_optimizer(config.train)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config.mesh)
  abstract = train_step.abstract_train_state(model_cfg, tx, config.seed)
  shardings = sharding.param_shardings(abstract, mesh, rules)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(abstract),
                        shardings)
  step, state = checkpoint.restore_latest(checkpoint.make_manager(str(workdir), max_to_keep=1), target, None)
  assert step == STEPS and int(state["step"]) == STEPS
  return config, state, mesh, rules, shardings


def test_single_process_restores_on_other_meshes(multiprocess_run):
  """The checkpoint of the 2-process run (mesh 2x2x2 across both processes) restores in one process
  onto an 8-way fsdp mesh and onto a single device, equal leaf for leaf, and the restored params
  reproduce the run's logged final validation loss."""
  workdir, _ = multiprocess_run
  config, state, mesh, rules, shardings = _restore(workdir, (1, 8, 1))
  _, single, _, _, _ = _restore(workdir, (1, 1, 1), jax.devices()[:1])

  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  assert len(leaves) == len(jax.tree.leaves(single)) > 0
  for (path, x), y in zip(leaves, jax.tree.leaves(single)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
  emb = state["params"]["params"]["embed"]["embedding"]  # [vocab, d_model]: (tensor, fsdp)
  assert emb.sharding.mesh.shape == mesh.shape and emb.sharding.spec == P("tensor", "fsdp")
  assert {s.data.shape for s in emb.addressable_shards} == {(384, 4)}  # d_model 32 / fsdp 8
  mu = state["opt_state"][1][0].mu["params"]["layers"]["mlp"]["up"]["kernel"]  # [layers, embed, mlp]
  assert {s.data.shape for s in mu.addressable_shards} == {(2, 4, 64)}

  # The restored params are the trained ones: the run's logged final validation loss, recomputed here
  # on the same held-out batch (this one process reads the whole global batch).
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  logged = [r for r in records if r["step"] == STEPS and "eval_ar_loss" in r][-1]
  tokenizer = Tokenizer.load(str(workdir / checkpoint.TOKENIZER_FILE))
  _, eval_source = data.load_splits(config.data)
  batches = [b["tokens"] for b in data.make_eval_batches(
      eval_source, tokenizer, seq_len=config.train.seq_len, batch_size=config.train.batch_size,
      num_batches=config.train.eval_batches, process_index=0, process_count=1)]
  batch_sharding = sharding.batch_sharding(mesh)
  with sharding.activate(mesh, rules):
    eval_step = jax.jit(train_step.make_eval_step(validate(config), config, tokenizer.mask_id),
                        in_shardings=(shardings["params"], batch_sharding), compiler_options=FAST_COMPILE)
    ev = train.evaluate(eval_step, state["params"], batches, lambda b: jax.device_put(b, batch_sharding))
  assert ev["eval_ar_loss"] == pytest.approx(logged["eval_ar_loss"], abs=1e-5)
  assert ev["eval_diffusion_loss"] == pytest.approx(logged["eval_diffusion_loss"], abs=1e-5)


def test_load_for_inference_of_a_multiprocess_checkpoint(multiprocess_run):
  """`generate --checkpoint=WORKDIR` of a multi-process run, in one process: the params land on this
  process's first device (the saving topology had 2 processes, device ids 0-3 and 2048-2051) and
  equal a restore of the full train state onto one device."""
  workdir, _ = multiprocess_run
  params, config, _ = checkpoint.load_for_inference(str(workdir))
  _, single, _, _, _ = _restore(workdir, (1, 1, 1), jax.devices()[:1])
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(single["params"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
