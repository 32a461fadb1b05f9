"""A decode step's weight matmuls alone, `rows` rows against each of the model's layer matrices
(q/k/v fused, o, gate/up fused, down), every layer's own copy chained so the weights stream from
HBM. One row (the AR step): XLA as is (a GEMV fusion), XLA with the row padded to 16 (a GEMM
kernel: what the decode engine did for small weights before the transposed layout), a multiply +
row reduction over the weight stored transposed [N, K] (what the engine does for q/k/v, o and
down). More rows (a TiDAR step, --rows 16,24,40,72,272): XLA as is, padded to a multiple of 128
rows, the weight stored transposed, and up to 128 rows the Pallas small-row GEMM over either layout.

    python -m benchmarks.step_matmuls --model 1p5b --out matmuls.json [--rows 1,72,272]
    python -m benchmarks.step_matmuls --smoke
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable

import jax
import jax.numpy as jnp

from benchmarks import common
from tidar_jax.decode import engine
from tidar_jax.kernels import small_row_gemm


def shapes(cfg) -> dict[str, tuple[int, int]]:
  d, H, Hkv, D, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  return {"q/k/v": (d, (H + 2 * Hkv) * D), "o": (H * D, d), "gate/up": (d, 2 * F), "down": (F, d)}


def _padded(rows: int, to: int) -> Callable:
  return lambda x, w: (jnp.pad(x, ((0, to - rows), (0, 0))) @ w)[:rows]


def variants(rows: int = 1) -> dict[str, Callable]:
  if rows > 1:  # a TiDAR step's k + k² rows: XLA as is, padded to a multiple of 128, and W^T stored
    out = {f"XLA, {rows} rows": lambda x, w: x @ w}
    to = -(-rows // 128) * 128
    if to != rows:
      out[f"XLA, {rows} rows padded to {to}"] = _padded(rows, to)
    out[f"XLA, {rows} rows, weight stored transposed [N, K]"] = "transposed"
    if rows <= small_row_gemm.MAX_ROWS:  # the pruned steps' rows: the Pallas kernel over either layout
      out[f"Pallas small-row GEMM, {rows} rows"] = lambda x, w: small_row_gemm.gemm(x, w).astype(x.dtype)
      out[f"Pallas small-row GEMM, {rows} rows, weight stored transposed [N, K]"] = "small_row_transposed"
    return out
  return {"XLA, 1 row": lambda x, w: x @ w, "XLA, padded to 16 rows": _padded(1, 16),
          "XLA row reduction, weight stored transposed [N, K]": "transposed_reduce"}


def run(rec: common.Recorder, cfg, layers: int, reps: int, deadline: common.Deadline, rows: int = 1) -> None:
  on_gpu = jax.default_backend() == "gpu"
  for name, (K, N) in shapes(cfg).items():
    if not on_gpu and name not in ("q/k/v", "down"):  # off the GPU (the smoke run): one wide, one tall shape
      continue
    ws = [jax.random.normal(jax.random.key(i), (K, N), jnp.bfloat16) for i in range(layers)]
    x = jax.random.normal(jax.random.key(layers), (rows, K), jnp.bfloat16)
    want = x @ ws[0]
    for vname, fn in variants(rows).items():
      label = {"matrix": name, "K": K, "N": N, "rows": rows, "layers": layers, "variant": vname}
      if deadline.spent():
        rec.add({**label, "skipped": "time budget"})
        continue
      weights = ws
      if fn in ("transposed", "transposed_reduce", "small_row_transposed"):  # the same matrices stored [N, K]
        weights = [w.T.copy() for w in ws]
        if fn == "transposed":  # x @ W as a GEMM contracting over K
          fn = lambda x, wt: jnp.einsum("rk,nk->rn", x, wt)  # noqa: E731
        elif fn == "small_row_transposed":
          fn = lambda x, wt: small_row_gemm.gemm(x, wt, transposed=True).astype(x.dtype)  # noqa: E731
        else:  # one row: the decode engine's own multiply + row reduction
          fn = lambda x, wt: engine.matmul(x, wt, transposed=True)  # noqa: E731

      @jax.jit
      def chain(x, ws, fn=fn):  # layer i's output (cut or padded to K) feeds layer i + 1
        for w in ws:
          y = fn(x, w)
          x = y[:, :K] if N >= K else jnp.pad(y, ((0, 0), (0, K - N)))
        return x

      try:
        err = float(jnp.max(jnp.abs(fn(x, weights[0]).astype(jnp.float32) - want.astype(jnp.float32))))
        t = statistics.median(common.time_calls(lambda: chain(x, weights), reps, warmup=2))
      except Exception as e:  # noqa: BLE001  (one variant's failure is recorded, not fatal)
        rec.add({**label, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        continue
      rec.add({**label, "us_per_matrix": t / layers * 1e6, "GBps": layers * K * N * 2 / t / 1e9,
               "max_abs_err_vs_xla": err})
      print(f"[step_matmuls] {name} {vname}: {t / layers * 1e6:.1f} us, {layers * K * N * 2 / t / 1e9:.0f} GB/s",
            flush=True)
    del ws


def render(result: dict[str, Any]) -> str:
  meta = result["meta"]
  rows = []
  for r in result["records"]:
    val = [round(r["us_per_matrix"], 1), round(r["GBps"])] if "us_per_matrix" in r else \
        [(r.get("error") or r.get("skipped", ""))[:60], ""]
    rows.append([r["matrix"], f"{r.get('rows', 1)} x {r['K']} x {r['N']}", r["variant"], *val])
  return common.section("step_matmuls", meta, f"{meta.get('shape', '')}; median of {meta.get('reps', '?')} calls of "
                        "all layers chained.",
                        common.md_table(["matrix", "rows x K x N", "variant", "µs per matrix", "GB/s of weights"],
                                        rows))


def add_args(p: argparse.ArgumentParser) -> None:
  common.add_chain_args(p, reps=20)
  p.add_argument("--rows", default="1", help="comma list of input rows (a TiDAR step: k + k², e.g. 72, 272)")


def measure_from_args(args: argparse.Namespace) -> dict[str, Any]:
  model = "tiny" if args.smoke else args.model
  cfg = common.model_config(model, args.config_overrides)
  layers = 2 if args.smoke else (args.layers or cfg.num_layers)
  reps = 1 if args.smoke else args.reps
  shape = f"{model}: rows x each layer matrix (bf16), {layers} layers' copies"
  rec = common.Recorder(args.out, {**common.device_info(), "reps": reps, "shape": shape})
  deadline = common.Deadline(args.budget_s)
  for rows in [int(r) for r in args.rows.split(",")] + ([20] if args.smoke else []):
    run(rec, cfg, layers, reps, deadline, rows)
  return rec.result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return common.cli(__doc__, add_args, measure_from_args, render, argv)


if __name__ == "__main__":
  main()
