"""A decode step's weight matmuls alone, `rows` rows against each of the model's layer matrices
(q/k/v fused, o, gate/up fused, down), every layer's own copy chained so the weights stream from
HBM. One row (the AR step): XLA as is (a GEMV fusion), XLA with the row padded to 16 (a GEMM
kernel: what the decode engine did for small weights until 2026-11-23 16:00), a multiply + row
reduction over the weight stored transposed [N, K] (what the engine does now for q/k/v, o and
down), and a Pallas (Triton) split-K GEMV sweep kept as evidence (not adopted: no better than the
padding overall: BENCHMARKS.md's git history). More rows (a TiDAR step, --rows 72,272): XLA as is, padded to a
multiple of 128 rows, and the weight stored transposed.

    python -m benchmarks.step_matmuls --model 1p5b --out matmuls.json [--pallas] [--rows 1,72,272]
    python -m benchmarks.step_matmuls --smoke
"""

from __future__ import annotations

import argparse
import functools
import statistics
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from benchmarks import common
from tidar_jax.decode import engine
from tidar_jax.kernels import pallas_common


def pallas_gemv(x: jax.Array, w: jax.Array, *, block_n: int, block_k: int, splits: int, num_stages: int = 3,
                interpret: bool = False) -> jax.Array:
  """x [1, K] @ w [K, N]: grid (N / block_n, K splits), each program a [16, block_n] tile (x padded
  to the 16 rows Triton's dot needs) over its K range; the splits are summed in XLA."""
  K, N = w.shape
  per_split = K // splits
  assert K % splits == 0 and per_split % block_k == 0 and N % block_n == 0, (K, N, block_n, block_k, splits)
  xp = jnp.pad(x, ((0, 16 - x.shape[0]), (0, 0)))  # [16, K]

  def kernel(x_ref, w_ref, o_ref):  # x [16, K], w [K, block_n], o [16, block_n]
    first = pl.program_id(1) * per_split

    def body(i, acc):
      s = first + i * block_k
      return acc + jnp.dot(x_ref[:, pl.ds(s, block_k)], w_ref[pl.ds(s, block_k), :],
                           preferred_element_type=jnp.float32)

    o_ref[...] = jax.lax.fori_loop(0, per_split // block_k, body, jnp.zeros((16, block_n), jnp.float32))

  out = pl.pallas_call(kernel, grid=(N // block_n, splits),
                       in_specs=[pl.BlockSpec((16, K), lambda n, j: (0, 0)),
                                 pl.BlockSpec((K, block_n), lambda n, j: (0, n))],
                       out_specs=pl.BlockSpec((None, 16, block_n), lambda n, j: (j, 0, n)),
                       out_shape=jax.ShapeDtypeStruct((splits, 16, N), jnp.float32),
                       compiler_params=pallas_common.triton_params(4, num_stages, interpret),
                       interpret=interpret)(xp, w)
  return out.sum(axis=0)[:x.shape[0]].astype(x.dtype)


def shapes(cfg) -> dict[str, tuple[int, int]]:
  d, H, Hkv, D, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  return {"q/k/v": (d, (H + 2 * Hkv) * D), "o": (H * D, d), "gate/up": (d, 2 * F), "down": (F, d)}


def _padded(rows: int, to: int) -> Callable:
  return lambda x, w: (jnp.pad(x, ((0, to - rows), (0, 0))) @ w)[:rows]


def variants(K: int, N: int, pallas: bool, interpret: bool, rows: int = 1) -> dict[str, Callable]:
  if rows > 1:  # a TiDAR step's k + k² rows: XLA as is, padded to a multiple of 128, and W^T stored
    out = {f"XLA, {rows} rows": lambda x, w: x @ w}
    to = -(-rows // 128) * 128
    if to != rows:
      out[f"XLA, {rows} rows padded to {to}"] = _padded(rows, to)
    out[f"XLA, {rows} rows, weight stored transposed [N, K]"] = "transposed"
    return out
  out = {"XLA, 1 row": lambda x, w: x @ w, "XLA, padded to 16 rows": _padded(1, 16),
         "XLA row reduction, weight stored transposed [N, K]": "transposed_reduce"}
  if pallas:
    for bn in (256, 128, 64) if interpret else (64, 128, 256):  # interpreted: fewest programs first
      for bk in (128, 256):
        if K % bk or N % bn:
          continue
        for target in (132, 528):  # programs: one wave / four waves of an H100's SMs
          splits = max(1, min(K // bk, target // (N // bn)))
          while (K // bk) % splits:
            splits -= 1
          out[f"Pallas GEMV block_n {bn} block_k {bk} splits {splits}"] = functools.partial(
              pallas_gemv, block_n=bn, block_k=bk, splits=splits, interpret=interpret)
          if interpret:  # off the GPU the kernel is interpreted: one variant checks it, timing is moot
            return out
  return out


def run(rec: common.Recorder, cfg, layers: int, reps: int, pallas: bool, deadline: common.Deadline,
        rows: int = 1) -> None:
  interpret = jax.default_backend() != "gpu"
  for name, (K, N) in shapes(cfg).items():
    if interpret and name not in ("q/k/v", "down"):  # off the GPU: one wide and one split-K shape suffice
      continue
    ws = [jax.random.normal(jax.random.key(i), (K, N), jnp.bfloat16) for i in range(layers)]
    x = jax.random.normal(jax.random.key(layers), (rows, K), jnp.bfloat16)
    want = x @ ws[0]
    for vname, fn in variants(K, N, pallas, interpret, rows).items():
      label = {"matrix": name, "K": K, "N": N, "rows": rows, "layers": layers, "variant": vname}
      if deadline.spent():
        rec.add({**label, "skipped": "time budget"})
        continue
      weights = ws
      if fn in ("transposed", "transposed_reduce"):  # the same matrices stored [N, K]
        weights = [w.T.copy() for w in ws]
        if fn == "transposed":  # x @ W as a GEMM contracting over K
          fn = lambda x, wt: jnp.einsum("rk,nk->rn", x, wt)  # noqa: E731
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
      except Exception as e:  # noqa: BLE001  (a tiling Triton refuses is recorded, not fatal)
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
  return (f"### step_matmuls ({meta.get('date', '?')})\n\n{common.meta_line(meta)}. {meta.get('shape', '')}; "
          f"median of {meta.get('reps', '?')} calls of all layers chained.\n\n"
          + common.md_table(["matrix", "rows x K x N", "variant", "µs per matrix", "GB/s of weights"], rows) + "\n")


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", default="1p5b")
  p.add_argument("--layers", type=int, default=0, help="0: the model's")
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--pallas", action="store_true", help="also sweep the Pallas split-K GEMV")
  p.add_argument("--rows", default="1", help="comma list of input rows (a TiDAR step: k + k², e.g. 72, 272)")
  p.add_argument("--budget-s", type=float, default=0)


def measure_from_args(args: argparse.Namespace) -> dict[str, Any]:
  model = "tiny" if args.smoke else args.model
  cfg = common.model_config(model)
  layers = 2 if args.smoke else (args.layers or cfg.num_layers)
  reps = 1 if args.smoke else args.reps
  shape = f"{model}: rows x each layer matrix (bf16), {layers} layers' copies"
  rec = common.Recorder(args.out, {**common.device_info(), "reps": reps, "shape": shape})
  deadline = common.Deadline(args.budget_s)
  for rows in [int(r) for r in args.rows.split(",")] + ([20] if args.smoke else []):
    run(rec, cfg, layers, reps, (args.pallas or args.smoke) and rows == 1, deadline, rows)
  return rec.result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return common.cli(__doc__, add_args, measure_from_args, render, argv)


if __name__ == "__main__":
  main()
