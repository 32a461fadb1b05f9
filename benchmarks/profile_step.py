"""Where the time goes: a per-kernel profile of one TiDAR decode step and one train step.

    XLA_FLAGS="--xla_dump_to=/tmp/xla_dump --xla_dump_hlo_as_text \
      --xla_dump_hlo_module_re=jit__generate_tidar|jit__generate_ar|jit_train_step" \
    python -m benchmarks.profile_step --model 1p5b --batch 1 --kv 2048 --block 16 --train-model 1p5b \
        --out runs/bench/profile.json --markdown BENCHMARKS.md
    python -m benchmarks.profile_step --smoke

A `jax.profiler` trace of one decode call (and one train step) is read back in-process with
`jax.profiler.ProfileData`: every device kernel's duration and its HLO instruction (`hlo_op`).
With the XLA dump above (main() adds it when the backend is not yet up), each instruction is mapped
to its jax `op_name` (e.g. `.../while/body/attn/qkv/dot_general`, the named scopes of
`tidar_jax/decode/engine.py`), and kernels
are grouped into model parts. For decode, only the kernels of the decode while-loop body count
(not the prefill), divided by the number of steps: the per-step kernel time beside the measured
wall time per step shows the share lost between kernels (launch gaps, the loop's host sync).
The profiled decode is compiled op by op (`loop_not_graphed`): inside the decoders' one-CUDA-graph
loop a trace sees no kernels, so the tables describe the kernels, not the graph's launch savings.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable

from benchmarks import common  # imports jax but starts no backend: enable_hlo_dump still works

DUMP_DIR = os.path.join(tempfile.gettempdir(), "tidar_bench_xla_dump")
DUMP_MODULES = "jit__generate_tidar|jit__generate_ar|jit_train_step"


def enable_hlo_dump(dump_dir: str = DUMP_DIR) -> bool:
  """Adds the XLA dump flags if no backend is up yet (XLA reads XLA_FLAGS once, at backend start)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "--xla_dump_to" in flags:
    return True
  try:
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
      return False
  except Exception:  # noqa: BLE001
    return False
  os.environ["XLA_FLAGS"] = (f"{flags} --xla_dump_to={dump_dir} --xla_dump_hlo_as_text "
                             f"--xla_dump_hlo_module_re={DUMP_MODULES}").strip()
  return True


def dump_dir_from_flags() -> str | None:
  m = re.search(r"--xla_dump_to=(\S+)", os.environ.get("XLA_FLAGS", ""))
  return m.group(1) if m else None


# ----------------------------------------------------------------------------------------------
# Trace and HLO reading


def trace_kernels(fn: Callable[[], Any], logdir: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Runs fn under the profiler; returns the device kernels [{name, hlo_op, module, program_id, dur_us}]
  and notes on what the trace held. Falls back to host-side XLA op events on CPU."""
  import jax
  logdir = logdir or tempfile.mkdtemp(prefix="tidar_trace_")
  with jax.profiler.trace(logdir):
    jax.block_until_ready(fn())
  paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
  if not paths:
    return [], {"error": "no xplane.pb written"}
  data = jax.profiler.ProfileData.from_file(paths[-1])
  device, host, lines = [], [], collections.Counter()
  for plane in data.planes:
    on_device = plane.name.startswith("/device:")
    for line in plane.lines:
      for ev in line.events:
        stats = dict(ev.stats)
        if "hlo_op" not in stats and not on_device:
          continue
        k = {"name": ev.name, "hlo_op": stats.get("hlo_op"), "module": stats.get("hlo_module"),
             "program_id": stats.get("program_id"), "dur_us": ev.duration_ns / 1e3, "line": line.name}
        (device if on_device else host).append(k)
        lines[f"{plane.name} | {line.name}"] += 1
  if device:
    # Derived/aggregate lines (module spans, steps) would double count the kernels.
    stream = [k for k in device if not re.search(r"XLA Modules|XLA Ops|Steps|TraceMe|Source|Framework",
                                                 k["line"])]
    return stream, {"source": "device", "lines": dict(lines)}
  # Host thunks nest (a while thunk spans its body's): keep the leaves only.
  host = [k for k in host if not re.match(r"(while|call|conditional)", k["hlo_op"] or "")]
  return host, {"source": "host (no device plane: CPU backend)", "lines": dict(lines)}


def hlo_op_names(module: str, program_id: Any, dump_dir: str | None) -> dict[str, str]:
  """{instruction name: jax op_name} from the XLA dump of one module ({} without a dump).

  A fusion's name maps to its own metadata, else to the ROOT of the computation it calls."""
  if not dump_dir or not os.path.isdir(dump_dir):
    return {}
  files = glob.glob(os.path.join(dump_dir, f"*{module}*after_optimizations.txt"))
  files = [f for f in files if not re.search(r"buffer-assignment|memory-usage|live-range", f)]
  if program_id is not None:
    exact = [f for f in files if os.path.basename(f).startswith(f"module_{int(program_id):04d}.")]
    files = exact or files
  if not files:
    return {}
  path = max(files, key=os.path.getmtime)
  op_of, calls, root_of, operands = {}, {}, {}, {}
  current = None
  inst = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
  for line in open(path):
    if line.rstrip().endswith("{") and "=" not in line.split("(")[0]:
      current = line.strip().lstrip("%").split(" ")[0]
      continue
    m = inst.match(line)
    if not m:
      continue
    name, rest = m.group(2), m.group(3)
    meta = re.search(r'op_name="([^"]*)"', rest)
    if meta:
      op_of[name] = meta.group(1)
      if m.group(1) and current:
        root_of[current] = meta.group(1)
    c = re.search(r"calls=%?([\w.\-]+)", rest)
    if c:
      calls[name] = c.group(1)
    args = re.search(r"\(([^)]*)\)", rest.split("metadata=")[0])
    operands[name] = re.findall(r"%([\w.\-]+)", args.group(1)) if args else []
  for name, comp in calls.items():
    if name not in op_of and comp in root_of:
      op_of[name] = root_of[comp]
  # Instructions XLA inserted (layout copies, converts) carry no metadata: name them after the op
  # that consumes them (else the one they read), marked "<-" so they stay visible as extra work.
  users: dict[str, list[str]] = collections.defaultdict(list)
  for name, ops in operands.items():
    for o in ops:
      users[o].append(name)
  for name in operands:
    if name in op_of:
      continue
    via = next((u for u in users.get(name, []) if u in op_of and "<-" not in op_of[u]), None)
    via = via or next((o for o in operands[name] if o in op_of and "<-" not in op_of[o]), None)
    if via:
      op_of[name] = f"{op_of[via]} <- {name.split('.')[0]}"
  return op_of


# The loop body's ops carry the named scopes of tidar_jax/decode/engine.py (the prefill's, outside
# the loop, those of the model).
_DECODE_PARTS = [
    ("RMSNorms", r"norm/"),
    ("attention: q/k/v/o projections", r"/attn/(qkv|o)/"),
    ("attention over the cache (scores, softmax, PV)", r"/attn/"),
    ("MLP: gate/up/down", r"/mlp/"),
    ("LM head (logits)", r"logits|lm_head|/einsum|embed"),
    ("cache write (dynamic_update_slice)", r"cache_write|dynamic_update_slice|scatter"),
    ("verify / sample / emit", r"argmax|verify|sample|cumprod|cumsum|take_along_axis|reduce_max|top_k|sort"),
]


def categorize(op_name: str | None, kernel: str, parts=_DECODE_PARTS) -> str:
  if op_name:
    for label, pattern in parts:
      if re.search(pattern, op_name):
        return label
    return "other (loop bookkeeping, embedding, concat/select)"
  k = kernel.lower()
  if "memcpy" in k or "memset" in k:
    return "memcpy/memset"
  if "split_kv" in k:  # the Pallas kernel's name (tidar_jax/kernels/split_kv_attention.py)
    return "split-KV attention, Pallas (unmapped)"
  if "one_token_attention" in k:  # its kernels' names (tidar_jax/kernels/one_token_attention.py)
    return "one-token attention block, Pallas (unmapped)"
  if "int8_gemv" in k:  # decode_quant="int8": one row against each layer matrix (tidar_jax/kernels/int8_gemv.py)
    return "int8 one-row matmuls, Pallas (unmapped)"
  if "multi_token_attention" in k:  # prologue + merge (tidar_jax/kernels/multi_token_attention.py)
    return "TiDAR step's RoPE/cache-write prologue + split merge, Pallas (unmapped)"
  if "cudnn" in k or "flash" in k or "fmha" in k or "sdpa" in k:
    return "cuDNN attention (unmapped)"
  if "gemm" in k or "cublas" in k or "nvjet" in k or "cutlass" in k or "xmma" in k:
    return "matmul kernels (unmapped)"
  return "other kernels (unmapped)"


def in_decode_loop(op_name: str | None) -> bool | None:
  """True for ops of the decode while-loop body (`jit(..)/while/...`), False for prefill/setup."""
  if not op_name:
    return None
  parts = op_name.split("/")
  return len(parts) > 1 and parts[1] == "while"


def summarize(kernels: list[dict[str, Any]], op_of: dict[str, str], *, select: Callable[[str | None], bool | None],
              divide: float, parts, top: int = 25) -> dict[str, Any]:
  by_part, by_op, by_kernel = collections.Counter(), collections.Counter(), collections.Counter()
  count = collections.Counter()
  unmapped = 0
  total = 0.0
  for k in kernels:
    op = op_of.get(k["hlo_op"] or "") or op_of.get(re.sub(r"_(\d+)$", r".\1", k["name"])) or op_of.get(k["name"])
    keep = select(op)
    if keep is False:
      continue
    if keep is None:
      unmapped += 1
    part = categorize(op, k["name"], parts)
    by_part[part] += k["dur_us"]
    count[part] += 1
    short = re.sub(r"^jit\([^)]*\)/", "", op) if op else f"[{k['hlo_op']}]"
    by_op[short[-110:]] += k["dur_us"]
    by_kernel[k["name"][:90]] += k["dur_us"]
    total += k["dur_us"]
  d = max(divide, 1e-12)
  return {
      "kernel_us_total": total / d,
      "kernels": sum(count.values()) / d,
      "unmapped_kernels": unmapped,
      "by_part_us": {p: v / d for p, v in by_part.most_common()},
      "by_part_kernels": {p: count[p] / d for p in by_part},
      "top_ops_us": {p: v / d for p, v in by_op.most_common(top)},
      "top_kernels_us": {p: v / d for p, v in by_kernel.most_common(top)},
  }


_TRAIN_PARTS = [
    # the loss's chunk loop (head_loss): a while loop outside the model's scope, scanned layers or not
    ("backward: LM head + loss", r"transpose\(jvp\(\)\)/"),
    ("forward: LM head + loss", r"/jvp\(\)/"),
    ("backward: q/k/v/o projections", r"transpose\(.*/attn/(q|k|v|o)/"),
    ("backward: attention core (scores/softmax/PV)", r"transpose\(.*/attn/"),
    ("backward: MLP matmuls", r"transpose\(.*/mlp/(gate|up|down)/"),
    ("backward: norms, SwiGLU, residual (elementwise)", r"transpose\(.*/layers/"),
    ("backward: layer-scan plumbing (slicing/stacking)", r"transpose\(.*while/body/"),
    ("backward: LM head + loss", r"transpose\("),
    ("forward (+remat): q/k/v/o projections", r"/attn/(q|k|v|o)/"),
    ("forward (+remat): attention core", r"/attn/"),
    ("forward (+remat): MLP matmuls", r"/mlp/(gate|up|down)/"),
    ("forward (+remat): norms, SwiGLU, residual", r"/layers/"),
    ("forward: layer-scan plumbing", r"while/body/"),
    ("forward: LM head + loss", r"jvp\("),
    ("optimizer (AdamW, clipping, grad norm)", r"."),
]


# ----------------------------------------------------------------------------------------------
# The two profiles


@contextlib.contextmanager
def loop_not_graphed():
  """Decodes inside compile without `dispatch.GPU_COMPILER_OPTIONS` (the whole loop as one CUDA graph):
  a trace does not see the kernels inside its conditional WHILE node (2026-11-24: 7 launches and 5%
  of the 1.5B AR step). Naming the option in XLA_FLAGS opts out, as a user's own flags do
  (`dispatch.use_gpu_compiler_options`); XLA itself read its flags when the backend started."""
  flags = os.environ.get("XLA_FLAGS")
  os.environ["XLA_FLAGS"] = f"{flags or ''} --xla_gpu_enable_command_buffer=".strip()
  try:
    yield
  finally:
    if flags is None:
      del os.environ["XLA_FLAGS"]
    else:
      os.environ["XLA_FLAGS"] = flags


def profile_decode(params, cfg, *, batch: int, prompt_len: int, new_tokens: int, block_size: int,
                   forced=None, dump_dir: str | None, measured: dict | None = None) -> dict[str, Any]:
  """Kernel time of one decode step (the loop body), from a trace of a full run."""
  import jax
  import numpy as np

  from benchmarks.decode_latency import GREEDY, make_prompts
  from tidar_jax.decode.ar import generate_ar
  from tidar_jax.decode.tidar import generate_tidar

  prompts, lengths = make_prompts(cfg, batch, prompt_len)
  max_len = (measured or {}).get("max_len", common.shared_max_len(prompt_len, new_tokens, [block_size]))

  def call():
    if block_size == 0:
      return generate_ar(params, cfg, prompts, lengths, max_new_tokens=new_tokens, sampling=GREEDY,
                         key=jax.random.key(0), eos_id=None, max_len=max_len)
    return generate_tidar(params, cfg, prompts, lengths, max_new_tokens=new_tokens, sampling=GREEDY,
                          key=jax.random.key(0), eos_id=None, mask_id=cfg.vocab_size - 1, max_len=max_len,
                          block_size=block_size, forced_drafts=forced)

  with loop_not_graphed():
    out = jax.block_until_ready(call())  # compiled here: the op-by-op program, not decode_latency's
    steps = int(np.asarray(out.stats.forward_passes).max()) - 1
    t = time.perf_counter()
    kernels, notes = trace_kernels(call)
    traced_s = time.perf_counter() - t
  module = "jit__generate_ar" if block_size == 0 else "jit__generate_tidar"
  kernels = [k for k in kernels if (k["module"] or module) == module or k["module"] is None]
  pid = next((k["program_id"] for k in kernels if k["program_id"] is not None), None)
  op_of = hlo_op_names(module, pid, dump_dir)
  loop = summarize(kernels, op_of, select=in_decode_loop, divide=max(steps, 1), parts=_DECODE_PARTS)
  res = {"kind": "decode", "block_size": block_size, "batch": batch, "prompt_len": prompt_len,
         "steps": steps, "trace": notes, "hlo_ops_mapped": len(op_of), "traced_call_s": traced_s,
         "per_step": loop}
  if measured:
    res["measured_ms_per_step"] = measured["ms_per_step"]
    res["kernel_share_of_step"] = loop["kernel_us_total"] / 1e3 / measured["ms_per_step"]
  if not op_of:  # no dump: the whole call, per step, kernel names only
    res["per_step"] = summarize(kernels, {}, select=lambda _: True, divide=max(steps, 1), parts=_DECODE_PARTS)
  return res


def profile_train(name: str, *, seq_len: int, batch: int, objective: str, dump_dir: str | None,
                  overrides: dict | None = None) -> dict[str, Any]:
  """Kernel time of one train step; reuses the step and state train_step.measure(keep=True) left."""
  import jax

  from benchmarks import train_step

  overrides = overrides or {}
  key = train_step.run_key(name, seq_len, batch, objective, overrides)
  if key in train_step.LAST:
    step, state, tokens, model_cfg = train_step.LAST.pop(key)
  else:
    model_cfg, _, step, state, tokens, _ = train_step.setup(name, seq_len=seq_len, batch=batch, objective=objective,
                                                            overrides=overrides)
    for _ in range(2):
      state, metrics = step(state, tokens)
    jax.block_until_ready(metrics)
  t = time.perf_counter()
  state, metrics = step(state, tokens)
  jax.block_until_ready(metrics)
  wall = time.perf_counter() - t
  box = {"state": state}
  del state

  def one():
    box["state"], m = step(box["state"], tokens)
    return m

  kernels, notes = trace_kernels(one)
  box.clear()
  kernels = [k for k in kernels if k["module"] in (None, "jit_train_step")]
  pid = next((k["program_id"] for k in kernels if k["program_id"] is not None), None)
  op_of = hlo_op_names("jit_train_step", pid, dump_dir)
  summary = summarize(kernels, op_of, select=lambda _: True, divide=1, parts=_TRAIN_PARTS)
  return {"kind": "train", "model": name, "objective": objective, "seq_len": seq_len, "batch": batch,
          "remat": model_cfg.remat, "attention": model_cfg.attention, "wall_ms": wall * 1e3, "trace": notes,
          "hlo_ops_mapped": len(op_of), "kernel_share_of_step": summary["kernel_us_total"] / 1e3 / (wall * 1e3),
          "step": summary}


# ----------------------------------------------------------------------------------------------


# Labels of results written by earlier versions of this file -> what they hold.
RELABEL = {
    "layer-scan plumbing (cache slice, stacking new K/V)":
        "layer scan: per-layer dynamic-slice copies of the stacked weights/cache, stacking new K/V",
    "matmul kernels (unmapped)": "GEMM (and, in older results, cuDNN) kernels inside command buffers (unmapped)",
}


def render(result: dict[str, Any]) -> str:
  meta = result["meta"]
  out = [f"### profile_step ({meta.get('date', '?')})\n\n{common.meta_line(meta)}. Device kernels from a "
         f"`jax.profiler` trace, mapped to jax op names through the XLA HLO dump.\n"]
  for p in result.get("profiles", []):
    s = p.get("per_step") or p.get("step")
    if p["kind"] == "decode":
      step_name = "AR" if p["block_size"] == 0 else f"TiDAR k={p['block_size']}"
      quant = ", int8 weights" if meta.get("decode_quant") == "int8" else ""
      head = (f"**Decode step** ({meta.get('model', '?')}{quant}, {step_name}, "
              f"B={p['batch']}, KV {p['prompt_len']}): {s['kernel_us_total'] / 1e3:.3f} ms of kernels in "
              f"{s['kernels']:.0f} launches per step")
      if "measured_ms_per_step" in p:
        head += (f" vs {p['measured_ms_per_step']:.3f} ms measured per step "
                 f"({100 * p['kernel_share_of_step']:.0f}% busy)")
    else:
      head = (f"**Train step** ({p['model']}, {p['objective']}, seq_len {p['seq_len']}, batch {p['batch']}, "
              f"remat {p['remat']}, attention {p['attention']}): {s['kernel_us_total'] / 1e3:.1f} ms of kernels "
              f"in {s['kernels']:.0f} launches vs {p['wall_ms']:.1f} ms wall")
    total = max(s["kernel_us_total"], 1e-9)
    rows = [[RELABEL.get(part, part), round(us / 1e3, 4), f"{100 * us / total:.1f}%",
             round(s["by_part_kernels"].get(part, 0))] for part, us in s["by_part_us"].items()]
    ops = [[op, round(us / 1e3, 4), f"{100 * us / total:.1f}%"] for op, us in list(s["top_ops_us"].items())[:12]]
    kern = [[k, round(us / 1e3, 4), f"{100 * us / total:.1f}%"] for k, us in list(s["top_kernels_us"].items())[:12]]
    out.append(head + ".\n\n" + common.md_table(["part", "ms", "share", "kernels"], rows) + "\n\n"
               + "Top ops:\n\n" + common.md_table(["op (jax op_name or [hlo instruction])", "ms", "share"], ops)
               + "\n\nTop kernels:\n\n" + common.md_table(["kernel", "ms", "share"], kern) + "\n")
  return "\n".join(out)


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", default="1p5b", help="'' skips the decode-step profiles")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--kv", type=int, default=2048)
  p.add_argument("--block", type=int, default=16)
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--decode-quant", default=None, help="override model.decode_quant (none|int8) for the decode steps")
  p.add_argument("--train-model", default="1p5b", help="'' skips the train-step profile")
  p.add_argument("--train-seq-len", type=int, default=2048)
  p.add_argument("--train-batch", type=int, default=2)
  p.add_argument("--train-objective", default="tidar")


def measure_from_args(args: argparse.Namespace) -> dict[str, Any]:
  if not args.smoke:  # CI: no dump files (the smoke run maps kernel names only)
    enable_hlo_dump()
  if args.smoke:
    args.model, args.kv, args.block, args.new_tokens = "tiny", 16, 4, 9
    args.train_model, args.train_seq_len, args.train_batch = "tiny", 32, 2
  rec = common.Recorder(args.out, {**common.device_info(), "model": args.model, "decode_quant": args.decode_quant})
  profiles = []
  if args.model:
    cfg = common.inference_config(args.model, dtype="float32" if args.smoke else "bfloat16",
                                  decode_quant=args.decode_quant, config_overrides=args.config_overrides)
    params = common.get_params(cfg, on_host=args.smoke)
    # The TiDAR step (drafts forced to the AR continuation, as in decode_latency), then the AR step.
    from benchmarks.decode_latency import forced_table, measure_generate
    max_len = common.shared_max_len(args.kv, args.new_tokens, [args.block])
    ar_measured, ar_tokens = measure_generate(params, cfg, batch=args.batch, prompt_len=args.kv,
                                              max_new_tokens=args.new_tokens, block_size=0, max_len=max_len,
                                              reps=1 if args.smoke else 3)
    for block in ([args.block] if args.block else []) + ([] if args.smoke else [0]):
      forced = forced_table(ar_tokens, args.kv, max_len) if block else None
      measured = ar_measured if block == 0 else measure_generate(
          params, cfg, batch=args.batch, prompt_len=args.kv, max_new_tokens=args.new_tokens, block_size=block,
          max_len=max_len, forced=forced, reps=1 if args.smoke else 3)[0]
      profiles.append(profile_decode(params, cfg, batch=args.batch, prompt_len=args.kv, new_tokens=args.new_tokens,
                                     block_size=block, forced=forced, dump_dir=dump_dir_from_flags(),
                                     measured=measured))
      rec.set("profiles", profiles)
    del params
    common.drop_params()
  if args.train_model:
    profiles.append(profile_train(args.train_model, seq_len=args.train_seq_len, batch=args.train_batch,
                                  objective=args.train_objective, dump_dir=dump_dir_from_flags(),
                                  overrides=dict(args.config_overrides)))
    rec.set("profiles", profiles)
  return rec.result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  return common.cli(__doc__, add_args, measure_from_args, render, argv)


if __name__ == "__main__":
  main(sys.argv[1:])
