"""The command-line tools as a user runs them (`python -m ...` in a subprocess): a mistake is one
`error:` line naming the flag and the fix, exit code 2; `convert.to_hf` works without torch.

Each subprocess imports JAX (~3 s of CPU), so the error cases all start at once, in one fixture."""

import os
import subprocess
import sys

import pytest
from tiny_checkpoint import save_tiny

from tidar_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": ROOT}

# case -> (module and flags; what the one error line says). NOPE is replaced by a missing directory.
USER_ERRORS = {
    "train: misspelt config field": (
        ["tidar_jax.train", "--config.model.num_layerz=2"],
        "error: --config.model.num_layerz=2: config.model has no field 'num_layerz'; did you mean num_layers?"),
    "generate: missing checkpoint": (
        ["tidar_jax.generate", "--checkpoint=NOPE", "--prompt=x"],
        "error: checkpoint directory not found at NOPE: check the --checkpoint path"),
    "generate: empty prompt": (
        ["tidar_jax.generate", "--checkpoint=NOPE", "--prompt="], "error: --prompt is empty (prompt 0)"),
    "generate: max_new_tokens=0": (
        ["tidar_jax.generate", "--checkpoint=NOPE", "--prompt=x", "--max_new_tokens=0"],
        "error: --max_new_tokens=0: must be at least 1, e.g. --max_new_tokens=64"),
    "generate: batch_size=0": (
        ["tidar_jax.generate", "--checkpoint=NOPE", "--prompt=x", "--batch_size=0"],
        "error: --batch_size=0: must be at least 1, e.g. --batch_size=8"),
    "export: missing workdir": (
        ["tidar_jax.export", "--workdir=NOPE", "--out=NOPE/export"],
        "error: checkpoint directory not found at NOPE: check the --workdir path"),
    "from_hf: misspelt section of its --config": (
        ["tidar_jax.convert.from_hf", "--hf_dir=NOPE", "--out=NOPE/ckpt", "--config=configs/tiny.py",
         "--config.trian.steps=3"],
        "error: --config.trian.steps=3: config has no field 'trian'; did you mean train?"),
}


@pytest.fixture(scope="module")
def user_error_runs(tmp_path_factory):
  nope = str(tmp_path_factory.mktemp("cli") / "nope")
  procs = {case: subprocess.Popen([sys.executable, "-m", *(a.replace("NOPE", nope) for a in args)], cwd=ROOT,
                                  env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for case, (args, _) in USER_ERRORS.items()}
  return nope, {case: (p.wait(timeout=300), *p.communicate()) for case, p in procs.items()}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_a_user_error_is_one_line_and_exit_code_2(user_error_runs, case):
  nope, runs = user_error_runs
  code, stdout, stderr = runs[case]
  assert (code, stdout, stderr.splitlines()) == (2, "", [stderr.strip()]), stderr
  assert stderr.startswith(USER_ERRORS[case][1].replace("NOPE", nope)), stderr


def test_to_hf_needs_no_torch(tmp_path):
  """The base install has no torch: a sitecustomize that makes `import torch` (and transformers) fail
  runs first in the subprocess, as in an environment without them."""
  save_tiny(str(tmp_path / "ckpt"), ["def add(a, b):\n    return a + b\n"], seed=0, std=0.02, block_size=None,
            num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)
  (tmp_path / "site").mkdir()
  (tmp_path / "site" / "sitecustomize.py").write_text(
      "import sys\nsys.modules['torch'] = None\nsys.modules['transformers'] = None\n")
  env = {**ENV, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}"}
  result = subprocess.run([sys.executable, "-m", "tidar_jax.convert.to_hf", f"--ckpt={tmp_path / 'ckpt'}",
                           f"--out={tmp_path / 'hf'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors", "tokenizer.json"]
  blocked = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
  assert blocked.returncode != 0 and "ModuleNotFoundError" in blocked.stderr  # the block itself works


def test_compilation_cache_dir_precedence():
  assert cli.compilation_cache_dir("/c", {"JAX_COMPILATION_CACHE_DIR": "/env"}) == "/c"
  assert cli.compilation_cache_dir("", {"JAX_COMPILATION_CACHE_DIR": "/env"}) == ""  # off
  assert cli.compilation_cache_dir(None, {"JAX_COMPILATION_CACHE_DIR": "/env"}) == "/env"
  assert cli.compilation_cache_dir(None, {}) == os.path.expanduser("~/.cache/tidar_jax/jax_cache")


def test_a_tool_writes_its_compiled_programs_to_the_cache(tmp_path):
  """generate with the default cache (under $HOME) leaves compiled programs there; with
  --compilation_cache_dir='' it leaves none, even with $JAX_COMPILATION_CACHE_DIR set."""
  ckpt = save_tiny(str(tmp_path / "ckpt"), ["def add(a, b):\n    return a + b\n"], num_layers=1)
  base = {**ENV, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # the tiny model compiles in < 1 s
  base.pop("JAX_COMPILATION_CACHE_DIR", None)
  homes = {"default": tmp_path / "home_default", "off": tmp_path / "home_off"}
  extra = {"default": [], "off": ["--compilation_cache_dir="]}
  envs = {"default": {**base, "HOME": str(homes["default"])},
          "off": {**base, "HOME": str(homes["off"]), "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "env_cache")}}
  procs = {case: subprocess.Popen([sys.executable, "-m", "tidar_jax.generate", f"--checkpoint={ckpt}", "--prompt=def",
                                   "--max_new_tokens=3", *extra[case]], cwd=ROOT, env=envs[case],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for case in homes}
  for case, p in procs.items():
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, (case, err[-2000:])
  cached = homes["default"] / ".cache" / "tidar_jax" / "jax_cache"
  assert cached.is_dir() and any(name.endswith("-cache") for name in os.listdir(cached)), list(cached.parent.iterdir())
  assert not (homes["off"] / ".cache" / "tidar_jax").exists() and not (tmp_path / "env_cache").exists()
