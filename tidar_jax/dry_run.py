"""Check a config before renting chips: parameter count, per-device memory and parameter shardings.

    python -m tidar_jax.train --config=configs/8b.py --dry_run
    python -m tidar_jax.train --config=configs/8b.py --dry_run --dry_run_mesh=1,64,1   # a 64-chip slice

Nothing is allocated: shapes come from `jax.eval_shape`, and the train step is only lowered and
compiled (never run) against abstract arguments.

Where the numbers come from:
  * params / optimizer state / batch per device: analytic, from the abstract shapes and the
    shardings that `config.mesh.rules` gives them on the target mesh. Exact for any mesh size,
    including meshes larger than this machine (an `AbstractMesh` needs no devices).
  * activations + temporaries: XLA's `memory_analysis().temp_size_in_bytes` of the compiled
    train step (gradients, saved activations, all-gathered weights, scratch).
      - "measured": the target mesh fits the current devices; the real sharded step is compiled.
      - "extrapolated": the target mesh needs more devices than there are. The step is compiled
        on a stand-in mesh of the current devices with the SAME per-device batch (and the same
        tensor split where it fits), so per-device activations are the same; the gradient
        buffers, which are sharded like the params, are then swapped for the target's (analytic):
            temp(target) ~= temp(stand-in) - k * (grads(stand-in) - grads(target)),
        k = 1 gradient-sized buffer, 2 with train.grad_accum > 1 (the accumulator and one
        micro-batch's gradient). Fitted on 8 fake CPU devices over fsdp = 1, 2, 8: k = 0.9 and 1.9,
        and the rest of the temporaries stayed within ~10% (it does not depend on the fsdp size).
        Rerun on the real slice for exact numbers.
  * The layer stack is an `nn.scan`, so compiling all layers costs no more than compiling one:
    the full depth is compiled and nothing is scaled over layers (a 1.5B or 8B dry run compiles in
    ~20-30 s on 2 CPU cores). With `model.scan_layers=False` the scanned program is compiled
    instead, since unrolling every layer would take minutes on a CPU.
  * Attention is compiled as the target device's kernel (`--dry_run_device`): cuDNN flash attention
    on a GPU, splash on a TPU; where that kernel cannot be compiled (a CPU), its memory is modelled
    by `attention.flash_footprint` (no [2L, 2L] scores). The report prints one loss chunk's fp32
    logits and, for dense attention, one score tensor, so the big items can be told apart.
  * On a CPU a bf16 model compiles in float16 (`cpu_standin_dtype`): the same widths, without the
    f32 copies XLA's CPU compiler makes of bf16 activations.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding

from tidar_jax import accelerators, batch_plan, dispatch, memory_fit, sharding, train_step
from tidar_jax.config import ModelConfig, validate
from tidar_jax.kernels import splash_attention
from tidar_jax.optimizer import make_optimizer

GiB = 2**30

# Published checkpoints with our model shapes: parameter counts of the Hugging Face safetensors
# (model cards: 1.54B and 8.19B). Our <|mask|> token reuses a padded vocab row, so counts match.
REFERENCES = (
    ("Qwen2.5-1.5B", 1_543_714_304,
     dict(vocab_size=151936, d_model=1536, num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128,
          mlp_dim=8960, qkv_bias=True, qk_norm=False, tie_embeddings=True)),
    ("Qwen3-8B", 8_190_735_360,
     dict(vocab_size=151936, d_model=4096, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
          mlp_dim=12288, qkv_bias=False, qk_norm=True, tie_embeddings=False)),
)


def parse_mesh(text: str) -> tuple[int, int, int] | None:
  """'1,64,1' -> (1, 64, 1) (data, fsdp, tensor); '' -> None."""
  if not text.strip():
    return None
  try:
    sizes = tuple(int(p) for p in text.split(","))
  except ValueError:
    sizes = ()
  if len(sizes) != 3 or min(sizes) < 1:
    raise ValueError(f"--dry_run_mesh={text!r}: give three positive sizes data,fsdp,tensor, e.g. 1,64,1")
  return sizes  # type: ignore[return-value]


def _target_shape(config: Any, mesh_shape: Sequence[int] | None, num_devices: int) -> tuple[int, int, int]:
  if mesh_shape is not None:
    sizes = tuple(mesh_shape)
    if len(sizes) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
      raise ValueError(f"mesh_shape={mesh_shape!r}: give three positive sizes (data, fsdp, tensor)")
    return sizes  # type: ignore[return-value]
  sizes = tuple(getattr(config.mesh, a) for a in sharding.MESH_AXES)
  if -1 not in sizes and all(isinstance(s, int) and s >= 1 for s in sizes) and math.prod(sizes) > num_devices:
    return sizes  # explicit config sizes beyond this machine: a hypothetical mesh
  try:
    return sharding.mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    raise ValueError(f"{e}\n(dry run on {num_devices} device(s): pass --dry_run_mesh=data,fsdp,tensor to "
                     "size a mesh other than the current devices)") from None


def _path(path: Any) -> str:
  keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
  return "/".join(str(k) for k in keys if k != "params")


def _leaves(abstract_tree: Any, shardings: Any) -> list[tuple[str, Any, NamedSharding]]:
  """(path, boxed-or-plain abstract leaf, sharding) for every array leaf."""
  is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
  boxes = jax.tree_util.tree_flatten_with_path(abstract_tree, is_leaf=is_box)[0]
  shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  assert len(boxes) == len(shards), (len(boxes), len(shards))
  return [(_path(p), leaf, s) for (p, leaf), s in zip(boxes, shards)]


def _array(leaf: Any) -> Any:
  return leaf.value if isinstance(leaf, nn.Partitioned) else leaf


def _device_bytes(abstract_tree: Any, shardings: Any) -> int:
  total = 0
  for _, leaf, s in _leaves(abstract_tree, shardings):
    x = _array(leaf)
    total += math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
  return total


def _count(tree: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(nn.unbox(tree)))


def _reference(model_cfg: ModelConfig) -> tuple[str, int] | None:
  for name, count, shape in REFERENCES:
    if all(getattr(model_cfg, k) == v for k, v in shape.items()):
      return name, count
  return None


def _standin_shape(target: tuple[int, int, int], num_devices: int) -> tuple[int, int, int]:
  """A mesh of at most `num_devices` keeping the tensor split where it fits, then fsdp, then data."""
  d, f, t = target
  t2 = t if num_devices % t == 0 else math.gcd(t, num_devices)
  f2 = math.gcd(f, num_devices // t2)
  d2 = math.gcd(d, num_devices // t2 // f2)
  return d2, f2, t2


def _fmt_spec(spec: Any, ndim: int) -> str:
  entries = list(spec) + [None] * (ndim - len(spec))
  return "(" + ", ".join("None" if e is None else (e if isinstance(e, str) else "+".join(e))
                         for e in entries) + ")"


def _gib(n: float | None) -> str:
  return "n/a" if n is None else f"{n / GiB:.3f}"


def _measure(config: Any, model_cfg: ModelConfig, tx: Any, abstract: Any, rules: Any,
             shape: tuple[int, int, int], per_device_batch: int, grad_accum: int,
             attention_impl: str) -> dict[str, Any]:
  """Lowers and compiles the real train step on `shape` (over the first devices); no allocation."""
  n = math.prod(shape)
  mesh = sharding.make_mesh(SimpleNamespace(data=shape[0], fsdp=shape[1], tensor=shape[2]),
                            devices=jax.devices()[:n])
  cfg = model_cfg if model_cfg.scan_layers else dataclasses.replace(model_cfg, scan_layers=True)
  cfg = dataclasses.replace(cfg, attention=attention_impl, dtype=cpu_standin_dtype(cfg.dtype))
  global_batch = per_device_batch * shape[0] * shape[1]
  sharding.check_divisibility(cfg, mesh, global_batch, rules)
  standin = config.copy_and_resolve_references()
  standin.train.batch_size = global_batch
  # Buffer assignment does not depend on LLVM's optimisation level; skipping it saves ~30% on CPU.
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  t0 = time.perf_counter()
  compiled, _ = memory_fit.compile_train_step(standin, cfg, tx, abstract, mesh, rules, grad_accum,
                                              cfg.vocab_size - 1, compiler_options=options)
  seconds = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  analysis = {f: int(getattr(ma, f)) for f in fields if ma is not None and hasattr(ma, f)}
  state_shardings = sharding.param_shardings(abstract, mesh, rules)
  return {"mesh_shape": shape, "global_batch": global_batch, "compile_seconds": seconds,
          "memory_analysis": analysis,
          "analytic_argument_bytes": _device_bytes(abstract, state_shardings)
          + per_device_batch * config.train.seq_len * 4,
          "grad_bytes": _device_bytes(abstract["params"], state_shardings["params"])}


def cpu_standin_dtype(dtype: str) -> str:
  """The compute dtype a CPU compiles in place of `dtype`: float16 for bfloat16 (same width). XLA's CPU
  dots take no bf16, so it upcasts them and keeps f32 copies of layer-stacked bf16 activations that a
  GPU or TPU would not hold; float16 dots it takes as they are."""
  return "float16" if dtype == "bfloat16" and jax.default_backend() == "cpu" else dtype


# Accelerators a dry run can size for: platform and memory per device (GiB, as their allocators see it).
def target_device(name: str | None) -> tuple[str, str, float | None]:
  """(name, platform, GiB) of `--dry_run_device` (default: this accelerator, else "h100";
  `accelerators.ACCELERATORS` names the others)."""
  if name is None:
    backend = jax.default_backend()
    if backend in ("gpu", "tpu"):
      local = memory_fit.device_memory_bytes()
      return jax.devices()[0].device_kind, backend, local / GiB if local else None
    name = "h100"
  if name not in accelerators.BY_NAME:
    raise ValueError(f"--dry_run_device={name!r}: use one of {sorted(accelerators.BY_NAME)} (and "
                     "--dry_run_device_gb for another memory size)")
  a = accelerators.BY_NAME[name]
  return name, a.platform, a.memory_gib


def _compiled_attention(m: ModelConfig, objective: str, platform: str) -> str:
  """The attention to compile for the memory estimate: the target platform's kernel.

  A bf16 model's "auto" is cuDNN flash attention on a GPU; on a TPU the TiDAR training attention is
  splash attention. Where that kernel cannot be compiled (a CPU dry run), its memory is modelled by
  `attention.flash_footprint` (the tensors a flash kernel keeps, no [q, k] scores) rather than by the
  dense reference, whose scores the target never materialises.
  """
  kernel = dispatch.training_attention(m.compute_dtype, platform) if m.attention == "auto" else m.attention
  if kernel == "splash" and objective != "tidar":
    kernel = "dense"  # splash takes the static training mask; the AR objective's attention is dense
  home = {"cudnn": "gpu", "splash": "tpu"}.get(kernel)
  if home is not None and jax.default_backend() != home:
    return "flash_footprint"
  return kernel


def verdict(total: int | None, budget: int, device_gb: float, plan: batch_plan.BatchPlan, model_cfg: ModelConfig
            ) -> tuple[bool | None, str]:
  """(fits?, the one line that says so, with the remedy when it does not)."""
  if total is None:
    return None, "verdict: unknown (the step was not compiled; run without measure=False for a verdict)"
  head = f"{_gib(total)} GiB per device of {device_gb:.1f} GiB (budget {_gib(budget)} GiB)"
  if total <= budget:
    return True, f"verdict: fits: {head}, {plan.describe()}"
  remedies = []
  if plan.micro_batch > 1:
    remedies.append("a smaller train.micro_batch_per_device (or \"auto\")")
  if model_cfg.remat == "none":
    remedies.append("model.remat=dots or full")
  elif model_cfg.remat == "dots":
    remedies.append("model.remat=full")
  remedies.append("more devices on mesh.fsdp (shards params and optimizer state: --dry_run_mesh=1,N,1)")
  remedies.append("a shorter train.seq_len")
  return False, f"verdict: does NOT fit: {head}; try " + "; or ".join(remedies)


def _activations(config: Any, model_cfg: ModelConfig, tx: Any, abstract: Any, rules: Any,
                 target: tuple[int, int, int], hypothetical: bool, per_device_batch: int, grad_accum: int,
                 grad_bytes: int, attention_impl: str, p: Any) -> tuple[int | None, str, str, dict[str, Any] | None]:
  # grad_bytes: the target's gradient buffer per device (sharded like the fp32 params)
  """(temp bytes per device, "measured" | "extrapolated" | "skipped", explanation, compile details)."""
  shape = _standin_shape(target, jax.device_count()) if hypothetical else target
  if jax.process_count() > 1 and math.prod(shape) != jax.device_count():
    return None, "skipped", "with several processes only a mesh over all devices is compiled", None
  d, f, t = shape
  where = "the target mesh" if not hypothetical else f"a stand-in mesh data={d} fsdp={f} tensor={t}"
  p(f"compiling the train step on {where} (micro-batch {per_device_batch // grad_accum} x accum {grad_accum}) ...")
  measured = _measure(config, model_cfg, tx, abstract, rules, shape, per_device_batch, grad_accum, attention_impl)
  temp = measured["memory_analysis"].get("temp_size_in_bytes")
  secs = measured["compile_seconds"]
  if temp is None:
    return None, "skipped", "this backend's compiled program has no memory analysis", measured
  if not hypothetical:
    method, note = "measured", f"XLA memory_analysis of the train step compiled on the target mesh ({secs:.0f} s)"
  else:
    method = "extrapolated"
    k = 1 if grad_accum == 1 else 2  # gradient-sized buffers: see the module docstring
    buffers = "its gradient buffer" if k == 1 else "its 2 gradient-sized buffers (accumulator + micro-batch) of"
    each = " each" if k > 1 else ""
    note = (f"{_gib(temp)} GiB measured on stand-in mesh data={d} fsdp={f} tensor={t} with the same "
            f"{per_device_batch} sequence(s) per device ({secs:.0f} s compile), minus {buffers} "
            f"{_gib(measured['grad_bytes'])} GiB, plus the target's {_gib(grad_bytes)} GiB{each}")
    temp = temp - k * (measured["grad_bytes"] - grad_bytes)
    if t != target[2]:
      note += f"; tensor={target[2]} does not fit here, so activations are those of tensor={t} (too high)"
  if not model_cfg.scan_layers:
    note += "; compiled with scan_layers=True (same params and math; unrolled compiles take minutes)"
  measured["note"] = note
  return temp, method, note, measured


def report(config: Any, mesh_shape: tuple[int, int, int] | None = None, *,
           measure: bool = True, device: str | None = None, device_gb: float | None = None) -> dict[str, Any]:
  """Prints (and returns) parameter count, per-device memory, the batch plan, parameter shardings
  and a verdict: fits / does not fit on the device, with the remedy.

  mesh_shape: (data, fsdp, tensor) of a hypothetical mesh (any size); default: `config.mesh`,
  resolved against the current devices (explicit sizes beyond them count as hypothetical).
  measure: compile the train step for activations/temporaries (False: analytic numbers only).
  device: a name from `accelerators.BY_NAME` (its platform's attention kernel and memory; default: this
  accelerator, else "h100"); device_gb: memory per device in GiB (default: this accelerator's
  allocator limit; for a named GPU, JAX's pool of its memory, `memory_fit.gpu_pool_fraction`, since
  that is what the trainer's allocator will hand out); the plan may use `memory_fit.MARGIN` of it.
  """
  model_cfg = validate(config)
  rules = sharding.logical_rules(config.mesh)
  num_devices = jax.device_count()
  target = _target_shape(config, mesh_shape, num_devices)
  d, f, t = target
  n = math.prod(target)
  hypothetical = n > num_devices
  mesh = AbstractMesh(target, sharding.MESH_AXES)
  batch, seq_len = config.train.batch_size, config.train.seq_len
  sharding.check_divisibility(model_cfg, mesh, batch, rules)

  tx = make_optimizer(config.train)
  abstract = train_step.abstract_train_state(model_cfg, tx, config.seed)  # shapes only, nothing allocated
  state_shardings = sharding.param_shardings(abstract, mesh, rules)
  params, opt = abstract["params"], abstract["opt_state"]
  param_count = _count(params)
  per_device_batch = batch // (d * f)
  bytes_ = {
      "params": _device_bytes(params, state_shardings["params"]),
      "opt_state": _device_bytes(opt, state_shardings["opt_state"]) + _device_bytes(
          abstract["step"], state_shardings["step"]),
      "batch": per_device_batch * seq_len * 4,
  }

  out: dict[str, Any] = {"param_count": param_count, "mesh_shape": target, "num_devices": n,
                         "hypothetical": hypothetical, "local_devices": num_devices,
                         "per_device_batch": per_device_batch}
  p = functools.partial(print, flush=True)
  m = model_cfg
  p("TiDAR dry run (nothing allocated: shapes from jax.eval_shape, the train step is only compiled)")
  p(f"model: {m.num_layers} layers, d_model {m.d_model}, {m.num_heads} heads / {m.num_kv_heads} KV heads x "
    f"{m.head_dim}, MLP {m.mlp_dim}, vocab {m.vocab_size}, {'tied' if m.tie_embeddings else 'untied'} "
    f"embeddings{', QKV bias' if m.qkv_bias else ''}{', qk-norm' if m.qk_norm else ''}; compute {m.dtype}, "
    f"master weights {m.param_dtype}, remat {m.remat}, scan_layers {m.scan_layers}")

  # --- parameter count -------------------------------------------------------------------------
  groups: dict[str, int] = {}
  for path, leaf, _ in _leaves(params, state_shardings["params"]):
    top = path.split("/")[0]
    groups[top] = groups.get(top, 0) + _array(leaf).size
  per_layer = groups.get("layers", 0) // max(m.num_layers, 1)
  parts = [f"{k} {v:,}" if k != "layers" else f"layers {m.num_layers} x {per_layer:,}" for k, v in groups.items()]
  p(f"parameters: {param_count:,} ({param_count / 1e9:.3f}B) = " + " + ".join(parts))
  ref = _reference(model_cfg)
  if ref is not None:
    name, count = ref
    rel = (param_count - count) / count
    out["reference"] = {"name": name, "count": count, "relative_difference": rel}
    p(f"  vs {name} on Hugging Face: {count:,} ({count / 1e9:.2f}B); difference {rel:+.3%} "
      "(<|mask|> takes a padded vocab row)")

  # --- mesh and memory -------------------------------------------------------------------------
  where = (f"hypothetical: this machine has {num_devices} {jax.default_backend()} device(s)" if hypothetical
           else f"on the current {jax.default_backend()} devices")
  p(f"mesh: data={d} fsdp={f} tensor={t} = {n} devices ({where})")
  length = 2 * seq_len if config.tidar.objective == "tidar" else seq_len  # the model's input length
  device_name, platform, known_gb = target_device(device)
  pool = ""
  if device_gb is None and known_gb is not None and platform == "gpu" and not (
      device is None and jax.default_backend() == "gpu"):  # a named GPU: JAX's pool of it, as the trainer sees it
    fraction = memory_fit.gpu_pool_fraction()
    device_gb = known_gb * fraction
    pool = f" (JAX's {fraction:.0%} pool of {known_gb:.1f}: XLA_PYTHON_CLIENT_MEM_FRACTION)"
  device_gb = device_gb or known_gb or 80.0
  budget = int(memory_fit.MARGIN * device_gb * GiB)
  out["device"], out["device_gb"], out["budget_bytes"] = device_name, device_gb, budget
  attn = _compiled_attention(model_cfg, config.tidar.objective, platform)
  out["compiled_attention"] = attn
  modelled = {"gpu": "cuDNN flash", "tpu": "splash"}.get(platform, "flash")
  p(f"batch: {batch} x {seq_len} tokens (the TiDAR input is {length} long) -> {per_device_batch} sequence(s) "
    f"per device; device {device_name} ({platform}) {device_gb:.1f} GiB{pool} (budget {memory_fit.MARGIN:.0%}: "
    f"{_gib(budget)} GiB); attention compiled as {attn!r}"
    + (f" ({modelled} attention's memory, modelled on this machine)" if attn == "flash_footprint" else ""))
  if jax.default_backend() == "cpu" and platform != "cpu":
    standin = cpu_standin_dtype(model_cfg.dtype)
    p(f"compiled on the CPU for a {platform.upper()}" + (f" in {standin} for {model_cfg.dtype} (same width)"
                                                          if standin != model_cfg.dtype else "")
      + ": activations read a little high (the CPU's temporaries are f32), so the plan errs toward smaller "
      "micro-batches; run --dry_run on the target host for its compiler's figure")
  if config.tidar.objective == "tidar":
    sparsity = splash_attention.block_sparsity(length, config.tidar.block_size)
    out["mask_sparsity"] = sparsity
    p(f"training mask: {sparsity['blocks_skipped']:.1%} of its ({sparsity['block']} x {sparsity['block']}) "
      f"(q, kv) blocks are empty; a block-sparse kernel (splash on TPU) computes "
      f"{sparsity['computed_fraction']:.1%} of the dense [{length}, {length}] scores")

  runs: dict[int, tuple] = {}

  def run_at(micro: int) -> tuple:
    if micro not in runs:
      runs[micro] = _activations(config, model_cfg, tx, abstract, rules, target, hypothetical, per_device_batch,
                                 per_device_batch // micro, bytes_["params"], attn, p)
    return runs[micro]

  def total_at(micro: int) -> int:
    temp = run_at(micro)[0]
    if temp is None:
      raise ValueError(f"train.micro_batch_per_device=auto: {run_at(micro)[2]}; give the micro-batch as a number")
    return bytes_["params"] + bytes_["opt_state"] + bytes_["batch"] + temp

  requested = batch_plan.requested_micro_batch(config.train)
  if requested == batch_plan.AUTO and measure:
    try:
      micro, tried = memory_fit.choose_micro_batch(per_device_batch, total_at, budget, lambda b: f"{_gib(b)} GiB")
    except ValueError:  # not even one sequence fits: report micro-batch 1, and the verdict says so
      micro, tried = 1, {1: total_at(1)}
    plan = batch_plan.plan(config.train, d * f, micro, "auto: compiled at " + ", ".join(
        f"micro {m}: {_gib(b)} GiB" for m, b in sorted(tried.items())))
  elif requested == batch_plan.AUTO:
    plan = batch_plan.plan(config.train, d * f, 1, "auto, not compiled (measure=False): micro 1 shown")
  else:
    plan = batch_plan.plan(config.train, d * f)
  out["plan"] = plan
  p(f"batch plan: {plan.describe()}")

  temp, method, note, measured = None, "skipped", "not compiled (measure=False)", None
  if measure:
    temp, method, note, measured = run_at(plan.micro_batch)
  bytes_["activations_and_temporaries"] = temp
  bytes_["total"] = None if temp is None else sum(bytes_.values())
  out["per_device_bytes"] = bytes_
  out["activations"] = {"method": method, "note": note, "measured": measured}

  pdt = m.param_dtype
  p("per-device memory (GiB):")
  for label, value, how in (
      (f"params ({pdt} master weights)", bytes_["params"], "analytic, from mesh.rules"),
      (f"optimizer state (AdamW mu, nu; {pdt})", bytes_["opt_state"], "analytic, sharded like the params"),
      ("batch (int32 tokens)", bytes_["batch"], "analytic"),
      ("activations + temporaries", temp, f"{method}: {note}"),
      ("total", bytes_["total"], "")):
    p(f"  {label:<40} {_gib(value):>10}   {how}".rstrip())
  if measured is not None and "argument_size_in_bytes" in measured["memory_analysis"]:
    arg, ana = measured["memory_analysis"]["argument_size_in_bytes"], measured["analytic_argument_bytes"]
    p(f"  check on the compiled mesh: XLA's argument bytes {_gib(arg)} GiB = analytic {_gib(ana)} GiB "
      "(params + optimizer + batch)" if arg == ana else
      f"  check on the compiled mesh: XLA's argument bytes {_gib(arg)} GiB vs analytic {_gib(ana)} GiB")
  micro, chunk = plan.micro_batch, min(train_step.loss_chunk(config), length)
  logits = micro * chunk * (m.vocab_size // t) * 4
  out["logits_bytes"] = logits
  line = (f"  largest activations (micro-batch of {micro}): one loss chunk's fp32 logits [{micro}, {chunk}, "
          f"{m.vocab_size // t}] {_gib(logits)} GiB/device (train.loss_chunk={chunk}; the full [{micro}, {length}, "
          f"{m.vocab_size // t}] would be {_gib(micro * length * (m.vocab_size // t) * 4)} GiB)")
  if attn == "dense":
    scores = micro * (m.num_heads // t) * length**2 * 4
    out["dense_attention_scores_bytes"] = scores
    line += (f"; dense attention ({m.attention!r} on {jax.default_backend()}) fp32 scores [{micro}, "
             f"{m.num_heads // t}, {length}, {length}] {_gib(scores)} GiB/device per layer in flight")
  p(line)
  if mesh_shape is None:
    p("  (sizes for another mesh: --dry_run_mesh=data,fsdp,tensor, e.g. --dry_run_mesh=1,64,1)")

  # --- shardings -------------------------------------------------------------------------------
  rows = []
  for path, leaf, s in _leaves(params, state_shardings["params"]):
    x = _array(leaf)
    names = tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else (None,) * x.ndim
    rows.append({"path": path, "logical": names, "spec": s.spec, "shape": tuple(x.shape),
                 "per_device_shape": tuple(s.shard_shape(x.shape)), "dtype": str(x.dtype)})
  out["shardings"] = {r["path"]: r for r in rows}
  p("parameter shardings (the optimizer's mu and nu follow them):")
  widths = [max(len(c) for c in col) for col in zip(*[
      (r["path"], "(" + ", ".join(str(nm) for nm in r["logical"]) + ")", _fmt_spec(r["spec"], len(r["shape"])),
       str(r["shape"])) for r in rows] + [("param", "logical axes", "PartitionSpec", "global shape")])]
  header = ("param", "logical axes", "PartitionSpec", "global shape", "per device")
  p("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths + [0])))
  for r in rows:
    cols = (r["path"], "(" + ", ".join(str(nm) for nm in r["logical"]) + ")",
            _fmt_spec(r["spec"], len(r["shape"])), str(r["shape"]), str(r["per_device_shape"]))
    p("  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths + [0])))
  out["fits"], line = verdict(bytes_["total"], budget, device_gb, plan, model_cfg)
  p(line)
  return out
