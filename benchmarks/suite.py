"""Several benchmarks in one process (the device lease is short: compiled decoders, weights and the
last train state are shared between them), in priority order under one soft time budget.

    python -m benchmarks.suite --plan decode_1p5b --out-dir $OUT --budget-s 420
    python -m benchmarks.suite --plan decode_8b_train --out-dir $OUT --budget-s 420
    python -m benchmarks.suite --plan predraft_1p5b --out-dir $OUT --budget-s 420
    python -m benchmarks.suite --plan smoke --out-dir /tmp/bench     # tiny, CPU

Writes decode.json, throughput.json, train.json, profile.json and predraft.json (whichever the plan runs) into
--out-dir, each rewritten as it grows; render them with `python -m benchmarks.<name> --render`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks import profile_step
from tidar_jax import accelerators


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--plan", required=True, choices=["decode_1p5b", "decode_8b_train", "predraft_1p5b", "smoke"])
  p.add_argument("--out-dir", required=True)
  p.add_argument("--budget-s", type=float, default=420)
  p.add_argument("--new-tokens", type=int, default=256)
  args = p.parse_args(argv)
  profile_step.enable_hlo_dump()  # before the backend starts: maps profiled kernels to jax ops

  from benchmarks import common, decode_latency, generate_throughput, predraft_throughput, train_step

  t_start = time.perf_counter()
  deadline = common.Deadline(args.budget_s)
  smoke = args.plan == "smoke"
  os.makedirs(args.out_dir, exist_ok=True)
  out = lambda name: os.path.join(args.out_dir, name)  # noqa: E731
  meta = common.device_info()
  meta.update(decode_latency.ceilings(smoke, False))
  print(f"[suite] {meta}", flush=True)
  M = 9 if smoke else args.new_tokens
  dtype = "float32" if smoke else "bfloat16"  # f32 compiles faster on CPU
  reps = 1 if smoke else 3
  bw, mm = meta["copy_bandwidth"]["GBps"], meta.get("matmul", {}).get("TFLOPs")
  dump = profile_step.dump_dir_from_flags()

  def decode(rec, model, batches, kvs, blocks, unroll=False, beta=None):
    decode_latency.run_grid(rec, models=[model], batches=batches, kvs=kvs, blocks=blocks, max_new_tokens=M,
                            reps=reps, scan_layers=False if unroll else None, dtype=dtype, deadline=deadline,
                            bw_GBps=bw, matmul_TFLOPs=mm, verify_beta=beta, on_host=smoke)

  def profile(prec, model, batch, kv, block):
    """Profiles the step decode_latency just measured (compiled; drafts forced the same way)."""
    if deadline.left() < 30:
      return
    cfg = common.inference_config(model, dtype=dtype)
    ar = decode_latency.LAST_AR_TOKENS.get((model, batch, kv, cfg.scan_layers, cfg.attention, cfg.decode_quant))
    measured = next((r for r in reversed(drec.result["records"]) if r.get("model") == model and r.get("batch") == batch
                     and r.get("kv") == kv and r.get("block_size") == block and "ms_per_step" in r), None)
    if measured is None:
      return
    forced = None if (block == 0 or ar is None) else decode_latency.forced_table(ar, kv, measured["max_len"])
    try:
      res = profile_step.profile_decode(common.get_params(cfg, on_host=smoke), cfg, batch=batch, prompt_len=kv,
                                        new_tokens=M, block_size=block, forced=forced, dump_dir=dump,
                                        measured=measured)
      res["model"] = model
      prec.result.setdefault("profiles", []).append(res)
      prec.flush()
      print(f"[profile] {model} k={block}: {res['per_step']['kernel_us_total'] / 1e3:.3f} ms kernels/step "
            f"({res['per_step']['kernels']:.0f} kernels), parts {list(res['per_step']['by_part_us'].items())[:6]}",
            flush=True)
    except Exception as e:  # noqa: BLE001
      prec.result.setdefault("errors", []).append(f"profile decode {model} k={block}: {type(e).__name__}: {e}"[:500])
      prec.flush()
      print(f"[profile] failed: {type(e).__name__}: {e}", flush=True)

  if args.plan in ("decode_1p5b", "smoke"):
    model = "tiny" if smoke else "1p5b"
    kv = 16 if smoke else 2048
    drec = common.Recorder(out("decode.json"), {**meta, "reps": reps, "max_new_tokens": M})
    prec = common.Recorder(out("profile.json"), {**meta, "model": model})
    decode(drec, model, [1], [kv], [0, 8, 16] if not smoke else [0, 4])
    profile(prec, model, 1, kv, 16 if not smoke else 4)
    profile(prec, model, 1, kv, 0)
    if not smoke:
      decode(drec, model, [1], [kv], [4])
      decode(drec, model, [8], [kv], [0, 8, 16, 4])
      decode(drec, model, [1], [512, 8192], [0, 16, 8])
      decode(drec, model, [1], [kv], [0, 16], unroll=True)
      decode(drec, model, [8], [8192], [0, 16])
    trec = common.Recorder(out("throughput.json"), {**meta, "reps": reps})
    generate_throughput.run(trec, models=[model], batch=1, prompt_len=kv, new_tokens=M,
                            blocks=[0, 8, 16] if not smoke else [0, 4], reps=reps, dtype=dtype, deadline=deadline,
                            on_host=smoke)
    if not smoke:
      generate_throughput.run(trec, models=["tiny"], batch=1, prompt_len=256, new_tokens=M, blocks=[0, 8, 16],
                              reps=reps, dtype="bfloat16", deadline=deadline)

  if args.plan in ("decode_8b_train", "smoke"):
    if not smoke:
      drec = common.Recorder(out("decode.json"), {**meta, "reps": reps, "max_new_tokens": M})
      prec = common.Recorder(out("profile.json"), {**meta, "model": "8b"})
      decode(drec, "8b", [1], [2048], [0, 8, 16])
      profile(prec, "8b", 1, 2048, 16)
      common.drop_params()
      # End-to-end at full acceptance (the decoder's test-only always_accept override).
      thr = common.Recorder(out("throughput.json"), {**meta, "reps": reps})
      generate_throughput.run(thr, models=["1p5b"], batch=1, prompt_len=2048, new_tokens=M, blocks=[0, 8, 16],
                              reps=reps, dtype=dtype, deadline=deadline, accept="always")
      generate_throughput.run(thr, models=["tiny"], batch=1, prompt_len=256, new_tokens=M, blocks=[0, 8, 16],
                              reps=reps, dtype=dtype, deadline=deadline, accept="always")
      common.drop_params()
    tmeta = {**meta, "steps": reps if smoke else 5, "peak_tflops": accelerators.bf16_peak_tflops(meta["device"])}
    trec = common.Recorder(out("train.json"), tmeta)
    points = [("tiny", 32, 2)] if smoke else [("1p5b", 2048, 2)]
    for name, seq_len, batch in points:
      train_step.run(trec, models=[name], seqs=[seq_len], batches=[batch],
                     objectives=["tidar"] if smoke else ["ar", "tidar"], steps=tmeta["steps"], overrides={},
                     deadline=deadline, keep_last=True)
    name, seq_len, batch = points[-1]
    if deadline.left() > 20 or smoke:
      try:
        res = profile_step.profile_train(name, seq_len=seq_len, batch=batch, objective="tidar", dump_dir=dump)
        prec.result.setdefault("profiles", []).append(res)
        prec.flush()
        print(f"[profile] train {name}: {res['step']['kernel_us_total'] / 1e3:.1f} ms kernels, "
              f"parts {list(res['step']['by_part_us'].items())[:6]}", flush=True)
      except Exception as e:  # noqa: BLE001
        prec.result.setdefault("errors", []).append(f"profile train: {type(e).__name__}: {e}"[:500])
        prec.flush()
        print(f"[profile] train failed: {type(e).__name__}: {e}", flush=True)
    train_step.LAST.clear()
    if not smoke:
      train_step.run(trec, models=["tiny"], seqs=[256], batches=[8], objectives=["ar", "tidar"],
                     steps=tmeta["steps"], overrides={}, deadline=deadline)
      decode(drec, "8b", [1], [2048], [16], beta=0.0)
      decode(drec, "8b", [8], [2048], [0, 16])
  if args.plan == "predraft_1p5b":
    # Pruned pre-drafting at k = 8: the mean-3 law first (the 2x-at-batch-8 target), steps of 16, 24
    # and 40 tokens per row beside the full 72 (the <= 1.15x-AR target at T <= 24, batch 1).
    rec = common.Recorder(out("predraft.json"), {**meta, "reps": reps})
    predraft_throughput.run(rec, models=["1p5b"], batches=[1, 8, 32], kv=2048, new_tokens=M, block=8,
                            laws=["mean3", "small"], sets=[(0,), (0, 1), (0, 1, 2, 7)], reps=reps, dtype=dtype,
                            deadline=deadline)
  print(f"[suite] done in {time.perf_counter() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
