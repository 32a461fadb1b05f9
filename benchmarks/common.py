"""Shared pieces of the benchmarks: model shapes with random bf16 weights, device ceilings (copy
bandwidth, matmul rate) measured in the same process, FLOP/byte counts, timing, JSON and markdown.

Every benchmark is `python -m benchmarks.<name> [--smoke] [--out result.json] [--markdown BENCHMARKS.md]`;
`--render result.json --markdown BENCHMARKS.md` appends the section of a result measured elsewhere
(the device machine returns only files, so results come back as JSON and are rendered here).
"""

from __future__ import annotations

import argparse
import functools
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.config_loader import apply_overrides, load_config, split_override_args
from tidar_jax.config import ModelConfig
from tidar_jax.decode.loop import step_tokens
from tidar_jax.flops import count_params
from tidar_jax.model import init_variables

# Cache slots past the prompt and the new tokens: what a step of the largest block size benchmarked
# writes (k + k²), so every block size (and AR) of one (batch, kv) group runs on the same cache shape.
LOOKAHEAD_PAD = 16


def shared_max_len(prompt_len: int, new_tokens: int, blocks) -> int:
  """The max_len every decoder of one (batch, kv) group is asked for (the decoders allocate
  `dispatch.cache_slots` of it)."""
  return prompt_len + new_tokens + max(step_tokens(k) for k in [LOOKAHEAD_PAD, *blocks])


# ----------------------------------------------------------------------------------------------
# Model shapes and random weights


def model_config(name: str, config_overrides: Mapping[str, Any] | None = None, **fields: Any) -> ModelConfig:
  """The model shape of configs/<name>.py (or a config file) as a ModelConfig: first the command
  line's `--config.<field>=value` overrides (`config_overrides`, any section), then model fields
  (None: keep the config's), both through `config_loader.apply_overrides`."""
  config = apply_overrides(load_config(name), dict(config_overrides or {}))
  apply_overrides(config, {f"model.{k}": v for k, v in fields.items() if v is not None})
  return ModelConfig(**dict(config.model))


def inference_config(name: str, *, dtype: str = "bfloat16", scan_layers: bool | None = None,
                     attention: str | None = None, decode_quant: str | None = None,
                     config_overrides: Mapping[str, Any] | None = None) -> ModelConfig:
  """Serving shape: weights and compute in `dtype`, no remat (attention, decode_quant: override
  model.attention, model.decode_quant), after the command line's `--config.*` overrides."""
  return model_config(name, config_overrides, dtype=dtype, param_dtype=dtype, remat="none",
                      scan_layers=scan_layers, attention=attention, decode_quant=decode_quant)


def random_params(cfg: ModelConfig, seed: int = 0, on_host: bool = False) -> Any:
  """Random weights (the model's own N(0, 0.02) init) created directly on the device in
  cfg.param_dtype by one jitted init: no host copy, no fp32 replica. on_host: drawn with numpy into
  the abstract shapes instead (no compilation: for the CPU smoke runs; norm gains stay 1)."""
  if on_host:
    shapes = nn.unbox(jax.eval_shape(functools.partial(init_variables, cfg), jax.random.key(seed)))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
      if "scale" in jax.tree_util.keystr(path):
        return jnp.ones(leaf.shape, leaf.dtype)
      return jnp.asarray(rng.normal(0.0, 0.02, leaf.shape).astype(np.float32), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)

  return jax.block_until_ready(jax.jit(lambda key: nn.unbox(init_variables(cfg, key)))(jax.random.key(seed)))


_PARAMS: dict[tuple, Any] = {}


def get_params(cfg: ModelConfig, on_host: bool = False) -> Any:
  """random_params, memoised for one shape at a time (benchmarks of one process share weights;
  the previous model's weights are dropped first, so two large models never share the device)."""
  key = (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
         cfg.mlp_dim, cfg.qkv_bias, cfg.qk_norm, cfg.tie_embeddings, cfg.param_dtype, on_host)
  if key not in _PARAMS:
    _PARAMS.clear()
    t = time.perf_counter()
    _PARAMS[key] = random_params(cfg, on_host=on_host)
    print(f"[params] random {cfg.param_dtype} weights, {tree_bytes(_PARAMS[key]) / 1e9:.2f} GB, "
          f"in {time.perf_counter() - t:.1f}s", flush=True)
  return _PARAMS[key]


def drop_params() -> None:
  _PARAMS.clear()


def tree_bytes(tree: Any) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def weight_bytes_read_per_step(cfg: ModelConfig, bytes_per_param: int = 2) -> int:
  """Bytes a decode step must read once: every weight, except that an untied input embedding is
  only gathered (a few rows), not read whole. The LM head is read once. With decode_quant="int8"
  the layer matrices are 1 byte each (plus a 4-byte scale per output column)."""
  c = count_params(cfg)
  skip = 0 if cfg.tie_embeddings else c["embedding_table"]
  total = (c["total"] - skip) * bytes_per_param
  if cfg.decode_quant == "int8":
    d, F, L = cfg.d_model, cfg.mlp_dim, cfg.num_layers
    columns = L * ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + d + 2 * F + d)
    total -= c["layer_matmul"] * (bytes_per_param - 1) - 4 * columns
  return total


def kv_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
  return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * bytes_per_value


def decode_step_flops(cfg: ModelConfig, batch: int, block_size: int, kv_len: float) -> float:
  """Model FLOPs of one decode step: AR (block 0) feeds 1 token and runs the LM head on it;
  a TiDAR step feeds T = k + k^2 tokens and runs the LM head on 2k - 1 rows (k verification,
  k - 1 drafts). Attention counts every (query, cache slot < kv_len) pair and the mask's pairs."""
  c = count_params(cfg)
  if block_size == 0:
    T, head_rows, new_pairs = 1, 1, 1
  else:
    from tidar_jax import masks
    k = block_size
    T, head_rows = k + k * k, 2 * k - 1
    new_pairs = int(masks.decode_step_mask(k).sum())
  pairs = T * kv_len + new_pairs
  attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * pairs
  return float(batch * (2 * c["layer_matmul"] * T + 2 * c["lm_head"] * head_rows + attn))


# ----------------------------------------------------------------------------------------------
# Device ceilings, measured in the same run


def time_calls(fn: Callable[[], Any], reps: int, warmup: int = 1) -> list[float]:
  """Wall seconds of `reps` calls of fn (each blocked until its outputs are ready)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  out = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t)
  return out


def copy_bandwidth(nbytes: int = 4 << 30, reps: int = 10) -> dict[str, float]:
  """Device-to-device streaming bandwidth: an elementwise `x + 1` over `nbytes` of int32 reads
  and writes every byte once; bandwidth = (read + written bytes) / time (the usual "copy" figure)."""
  n = nbytes // 4
  x = jax.block_until_ready(jnp.arange(n, dtype=jnp.int32))  # not zeros: no shortcut for constant data
  f = jax.jit(lambda a: a + 1)
  times = time_calls(lambda: f(x), reps, warmup=2)
  t = statistics.median(times)
  return {"bytes": float(2 * n * 4), "median_s": t, "GBps": 2 * n * 4 / t / 1e9}


def matmul_rate(n: int = 8192, reps: int = 10, dtype=jnp.bfloat16) -> dict[str, float]:
  """Dense matmul rate of an n x n x n product on random data (fp32 accumulation)."""
  ka, kb = jax.random.split(jax.random.key(2))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype))
  times = time_calls(lambda: f(a, b), reps, warmup=2)
  t = statistics.median(times)
  return {"n": n, "median_s": t, "TFLOPs": 2 * n**3 / t / 1e12}


def device_info() -> dict[str, Any]:
  dev = jax.devices()[0]
  info = {
      "device": getattr(dev, "device_kind", str(dev)),
      "platform": dev.platform,
      "num_devices": jax.device_count(),
      "jax": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "host": platform.node(),
  }
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_dump"))
  if flags:
    info["xla_flags"] = flags  # anything that changes what is measured
  try:
    import jaxlib
    info["jaxlib"] = jaxlib.__version__
  except Exception:  # noqa: BLE001
    pass
  return info


def memory_stats() -> dict[str, float]:
  try:
    s = jax.devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001
    return {}
  return {k: float(s[k]) / 2**30 for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit") if k in s}


# ----------------------------------------------------------------------------------------------
# Results: JSON written as it grows, markdown sections


class Recorder:
  """Collects records and rewrites the JSON file after each one, so a run stopped by a time limit
  still leaves what it measured."""

  def __init__(self, path: str | None, meta: dict[str, Any]):
    self.path, self.result = path, {"meta": meta, "records": []}

  def add(self, record: dict[str, Any]) -> None:
    self.result["records"].append(record)
    self.flush()

  def set(self, key: str, value: Any) -> None:
    self.result[key] = value
    self.flush()

  def flush(self) -> None:
    if self.path:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      with open(self.path + ".tmp", "w") as f:
        json.dump(self.result, f, indent=1, default=_json_default)
      os.replace(self.path + ".tmp", self.path)


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  if dataclasses.is_dataclass(x):
    return dataclasses.asdict(x)
  return str(x)


def load_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return "" if v is None else str(v)

  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def meta_line(meta: dict[str, Any]) -> str:
  parts = [f"{meta.get('device', '?')} ({meta.get('platform', '?')})", f"jax {meta.get('jax', '?')}",
           meta.get("date", "?")]
  if "copy_bandwidth" in meta:
    parts.append(f"measured copy bandwidth {meta['copy_bandwidth']['GBps']:,.0f} GB/s (read+write)")
  if "matmul" in meta:
    parts.append(f"bf16 {meta['matmul']['n']}^3 matmul {meta['matmul']['TFLOPs']:.0f} TFLOP/s")
  if meta.get("xla_flags"):
    parts.append(f"XLA_FLAGS={meta['xla_flags']}")
  if meta.get("note"):
    parts.append(meta["note"])
  return "; ".join(parts)


def section(name: str, meta: dict[str, Any], prose: str, table: str) -> str:
  """A benchmark's markdown section: its name and date, the device line, what was measured, the table."""
  return f"### {name} ({meta.get('date', '?')})\n\n{meta_line(meta)}. {prose}\n\n{table}\n"


def append_markdown(path: str, text: str) -> None:
  with open(path, "a") as f:
    f.write("\n" + text.rstrip() + "\n")


def fmt_ms(seconds: float | None) -> float | None:
  return None if seconds is None else seconds * 1e3


class Deadline:
  """A soft time budget: work items are skipped (and recorded as skipped) once it is spent."""

  def __init__(self, seconds: float | None):
    self.end = None if not seconds else time.monotonic() + seconds

  def left(self) -> float:
    return float("inf") if self.end is None else self.end - time.monotonic()

  def spent(self) -> bool:
    return self.left() <= 0


def add_chain_args(p: argparse.ArgumentParser, reps: int) -> None:
  """The flags of the kernel microbenchmarks (step_attention, step_matmuls), which time one piece of
  a step over every layer's own copy, chained: the model shape, the layers (0: the model's), the
  calls timed, a soft time budget."""
  p.add_argument("--model", default="1p5b")
  p.add_argument("--layers", type=int, default=0, help="0: the model's")
  p.add_argument("--reps", type=int, default=reps)
  p.add_argument("--budget-s", type=float, default=0)


def cli(doc: str, add_args: Callable[[argparse.ArgumentParser], None],
        measure: Callable[[argparse.Namespace], dict[str, Any]], render: Callable[[dict[str, Any]], str],
        argv: Sequence[str] | None) -> dict[str, Any]:
  """Every benchmark's command line: its own flags (`add_args`) plus --out JSON, --markdown FILE
  (append the rendered section), --render JSON (render a saved result instead of measuring) and
  --smoke (one tiny CPU iteration, for the test suite). Prints the section; returns the result."""
  config_overrides, argv = split_override_args(list(sys.argv[1:] if argv is None else argv))
  p = argparse.ArgumentParser(description=doc.splitlines()[0], epilog="--config.<field>=value overrides a "
                              "field of the models' configs, as on the trainer's command line")
  add_args(p)
  p.add_argument("--out", default=None, help="write the result JSON here (rewritten as it grows)")
  p.add_argument("--markdown", default=None, help="append the rendered section to this markdown file")
  p.add_argument("--render", default=None, help="render an existing result JSON instead of measuring")
  p.add_argument("--smoke", action="store_true", help="tiny shape, one short iteration (CPU CI)")
  args = p.parse_args(argv)
  args.config_overrides = config_overrides
  result = load_json(args.render) if args.render else measure(args)
  text = render(result)
  print(text)
  if args.markdown:
    append_markdown(args.markdown, text)
  return result
