"""Can this host feed the trainer? Tokens/s of the training input pipeline alone (no model, no device).

    python -m benchmarks.input_pipeline --config configs/smollm2.py --config.data.tokenizer=CKPT/tokenizer.json \
        --workers 0,4 --out runs/bench/input.json
    python -m benchmarks.input_pipeline --smoke

The pipeline is the trainer's own (`data.make_train_iterator`: documents shuffled, tokenized, packed into
`train.seq_len` windows, window-shuffled, batched to `train.batch_size` rows), read on this process as
one host of a single-host run. `--workers 0` is the single-process pipeline (a background thread
prepares the next batches); N > 0 tokenizes in N grain worker processes, which changes the batch order.
Time: each of `--batches` batches after the first (which includes start-up and is reported apart) and
the few the thread had prepared meanwhile.
The trainer's clean tokens/s cannot exceed the figure here for long; where the two are close, the
step waits on the host now and then, so use more workers or a faster host.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

import jax
from absl import flags

from benchmarks import common
from benchmarks.config_loader import apply_overrides, load_config


def measure_one(config: Any, tokenizer: Any, train: Any, num_workers: int, batches: int) -> dict[str, Any]:
  from tidar_jax import data
  from tidar_jax.data import pipeline

  rows, seq_len = config.train.batch_size, config.train.seq_len
  t = time.perf_counter()
  it = data.make_train_iterator(train, tokenizer, seq_len=seq_len, global_batch_size=rows, seed=config.seed,
                                num_workers=num_workers, window_shuffle=config.data.window_shuffle)
  try:
    next(it)
    first_s = time.perf_counter() - t
    for _ in range(pipeline.PREFETCH_BATCHES):  # drain what the thread prepared meanwhile: time the steady rate
      next(it)
    times = []
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(batches):
      t = time.perf_counter()
      next(it)
      times.append(time.perf_counter() - t)
    wall, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
  finally:
    it.close()
  cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
  times.sort()
  return {
      "num_workers": num_workers, "batch": rows, "seq_len": seq_len, "batches": batches, "first_batch_s": first_s,
      "tokens_per_s": rows * seq_len * batches / wall, "median_ms": 1e3 * statistics.median(times),
      "p90_ms": 1e3 * times[int(0.9 * (len(times) - 1))], "max_ms": 1e3 * times[-1],
      # this process only: grain's worker processes are not counted
      "process_cpu_ms_per_batch": 1e3 * cpu / batches,
  }


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or "unknown CPU"


def render(result: dict[str, Any]) -> str:
  meta = result["meta"]
  rows = [[r["num_workers"], f"{r['batch']} x {r['seq_len']}", round(r["tokens_per_s"]), round(r["median_ms"]),
           round(r["p90_ms"]), round(r["max_ms"]), round(r["process_cpu_ms_per_batch"]), round(r["first_batch_s"], 1)]
          for r in result["records"]]
  table = common.md_table(["workers", "batch", "tokens/s", "median ms/batch", "p90 ms", "max ms",
                           "this process's CPU ms/batch", "first batch s"], rows)
  return common.section("input_pipeline", meta, (
      f"The trainer's input pipeline alone for `{meta.get('config', '?')}` ({meta.get('dataset', '?')}) on a host "
      f"with {meta.get('host_cpus', '?')} CPUs: {meta.get('batches', '?')} batches after the first. Workers 0: one "
      "process, a background thread preparing the next batches; N: N grain worker processes."), table)


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", default="tiny", help="a configs/ name or a config file, as the trainer's --config")
  p.add_argument("--workers", default="0", help="comma list of data.num_workers to measure")
  p.add_argument("--batches", type=int, default=40)


def measure(args: argparse.Namespace) -> dict[str, Any]:
  if args.smoke:
    args.config, args.workers, args.batches = "tiny", "0", 3
  config = apply_overrides(load_config(args.config), args.config_overrides)
  meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "platform": "host CPUs", "device": _cpu_model(), "jax": jax.__version__, "host": platform.node(),
          "config": args.config, "dataset": config.data.dataset, "host_cpus": os.cpu_count(), "batches": args.batches}
  rec = common.Recorder(args.out, meta)
  workers_list = [int(w) for w in args.workers.split(",")]
  if any(workers_list) and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain's workers read its absl flags (the trainer parses them in absl.app)
  from tidar_jax import data
  tokenizer, (train, _) = data.get_tokenizer(config), data.load_splits(config.data)  # once for every setting
  for workers in workers_list:
    r = measure_one(config, tokenizer, train, workers, args.batches)
    rec.add(r)
    print(f"[input] workers {workers}: {r['tokens_per_s']:,.0f} tokens/s, median {r['median_ms']:.0f} ms per "
          f"{r['batch']} x {r['seq_len']} batch", flush=True)
  return rec.result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return common.cli(__doc__, add_args, measure, render, argv)


if __name__ == "__main__":
  main(sys.argv[1:])
