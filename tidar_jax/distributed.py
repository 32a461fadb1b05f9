"""Multi-process start-up: call `jax.distributed.initialize` only where there is more than one process.

A single host (one process driving all its GPUs/TPU chips) needs no initialization, and calling
it there would wait for a coordinator that never comes. `maybe_initialize` must run before
anything touches a JAX backend (`jax.devices()`, the first array), so the trainer calls it first.

Once joined, an uncaught exception ends the process at once (after printing the traceback):
otherwise its atexit `jax.distributed.shutdown` waits in a barrier for peers that are themselves
blocked in a collective waiting for it, and the whole job hangs for the shutdown timeout (5 min).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from types import TracebackType

import jax
from absl import logging


def _int(value: str | None) -> int:
  try:
    return int(value or 0)
  except ValueError:
    return 0


def detect_cluster(env: Mapping[str, str]) -> str | None:
  """Names the multi-process environment described by `env`, or None for a single process.

  "jax_coordinator": JAX_COORDINATOR_ADDRESS is set (JAX fills in the rest from the cluster).
  "tpu_multislice":  MEGASCALE_COORDINATOR_ADDRESS is set (TPU slices joined over DCN).
  "tpu_pod":         TPU_WORKER_HOSTNAMES lists more than one host (GKE multi-host TPU slice).
  "slurm":           SLURM_NTASKS > 1 (a task inside `srun`; a 1-task allocation is single host).
  """
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "jax_coordinator"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu_multislice"
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return "tpu_pod"
  if _int(env.get("SLURM_NTASKS")) > 1:
    return "slurm"
  return None


def _exit_on_uncaught_exception() -> None:
  previous = sys.excepthook

  def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    previous(exc_type, exc, tb)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # skip atexit: see the module docstring

  sys.excepthook = hook


def maybe_initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """Joins the process group when flags are given or a cluster is detected; else does nothing.

  Explicit flags win. With all three given, JAX's own cluster detection is switched off: under
  SLURM it would otherwise pin each process to GPU `SLURM_LOCALID`, which no longer exists once
  the launcher has narrowed `CUDA_VISIBLE_DEVICES` to that one GPU (it becomes device 0). With
  only some flags given (e.g. a TPU VM where the worker id comes from the metadata server), JAX
  fills in the rest from the environment and raises if it cannot.
  """
  if jax.distributed.is_initialized():
    return
  explicit = bool(coordinator_address) or num_processes > 0 or process_id >= 0
  if explicit:
    complete = bool(coordinator_address) and num_processes > 0 and process_id >= 0
    logging.info("jax.distributed.initialize(coordinator=%r, num_processes=%s, process_id=%s)",
                 coordinator_address, num_processes, process_id)
    jax.distributed.initialize(
        coordinator_address=coordinator_address or None,
        num_processes=num_processes if num_processes > 0 else None,
        process_id=process_id if process_id >= 0 else None,
        cluster_detection_method="deactivate" if complete else None,
    )
  else:
    cluster = detect_cluster(os.environ)
    if cluster is None:
      return
    logging.info("detected a %s cluster: jax.distributed.initialize() with auto-detection", cluster)
    jax.distributed.initialize()
  _exit_on_uncaught_exception()
