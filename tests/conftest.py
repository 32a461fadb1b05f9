"""Test-wide JAX settings: the CPU with 8 fake devices for mesh tests, fp32 matmuls, loud broadcasting bugs."""

import os

# The suite is written for the CPU (8 fake devices for the mesh tests, Pallas kernels interpreted),
# so it runs there on any machine, GPU hosts included, as CI runs it. To run the decoders' tests on a
# GPU (the Triton kernels compiled): the README's JAX_PLATFORMS=cuda command
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="module")
def fast_compile():
  """XLA's expensive backend (LLVM) optimisations off for one module's compilations, for modules
  whose time is mostly CPU compilation of small programs that then run for milliseconds (the
  trainer end to end). Like FAST_COMPILE in test_mesh_training.py, it changes code generation only,
  not the program: results move by float rounding at most, and the modules using it compare runs
  compiled the same way. Subprocesses get the same with JAX_DISABLE_MOST_OPTIMIZATIONS=1.
  Use it as `pytestmark = pytest.mark.usefixtures("fast_compile")`."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def pytest_xdist_auto_num_workers(config) -> int:
  """`-n auto` (pyproject's addopts): one worker per core, at most 4 -- each holds its own JAX,
  torch and compiled programs (a few GB at peak) -- and one when the tests run on an accelerator,
  which every JAX process would otherwise claim most of the memory of."""
  del config
  if os.environ["JAX_PLATFORMS"] != "cpu":
    return 1
  return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
