"""Config validation: a user-facing ConfigDict in, checked values out, one clear error per bad field.

The ConfigDict (configs/*.py) is the surface users edit and override on the command line; code
that needs a hashable, typed view of the model (a static argument under jit) takes `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from tidar_jax import batch_plan, predraft

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("dense", "cudnn", "splash", "auto")
DECODE_QUANT = ("none", "int8")
ROPE_TYPES = ("default", "linear", "llama3")
OBJECTIVES = ("tidar", "ar")
# What configs written before these train fields existed (older converted checkpoints) get.
DEFAULT_CHECKPOINT_EVERY_S = 600.0
DEFAULT_LOSS_CHUNK = 1024
LOCAL_CODE_ROOTS = ("stdlib", "site-packages")  # data.local_code_roots: what the local_code corpus reads


def parse_local_code_roots(value: Any) -> tuple[str, ...]:
  """`data.local_code_roots` ("stdlib" or "stdlib,site-packages") -> root names in canonical order."""
  names = [n.strip() for n in value.split(",") if n.strip()] if isinstance(value, str) else []
  if not names or len(set(names)) != len(names) or any(n not in LOCAL_CODE_ROOTS for n in names):
    raise ValueError(f"data.local_code_roots={value!r}: use a comma-separated list of distinct roots from "
                     f"{list(LOCAL_CODE_ROOTS)}, e.g. 'stdlib' (the default) or 'stdlib,site-packages'")
  return tuple(n for n in LOCAL_CODE_ROOTS if n in names)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static model shape (hashable: safe as a `jax.jit` static argument)."""

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  qkv_bias: bool = False
  qk_norm: bool = False
  tie_embeddings: bool = True
  rope_theta: float = 10000.0
  # RoPE frequency scaling for long-context checkpoints (`model.rope_inv_freq`): "default" (none),
  # "linear" (frequencies / rope_factor) or "llama3" (Llama 3.1+; the other three fields too).
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  norm_eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat: str = "none"
  attention: str = "dense"
  # Decoding only: "int8" stores the layer matrices as int8 with one scale per output column
  # (half the bytes a decode step reads; the model's numbers change by the rounding, and TiDAR
  # stays exactly its own AR decoding): the batch-1 AR step gets faster, TiDAR's many-row steps
  # slower. Training and the embedding / LM head are unaffected.
  decode_quant: str = "none"

  @property
  def compute_dtype(self) -> Any:
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self) -> Any:
    return DTYPES[self.param_dtype]

  @classmethod
  def from_config(cls, model_cfg: Any) -> "ModelConfig":
    """Builds from `config.model` (a ConfigDict or mapping), validating it first."""
    raw = dict(model_cfg)
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"model: unknown field(s) {unknown}; valid fields are "
                       f"{[f.name for f in dataclasses.fields(cls)]}")
    cfg = cls(**raw)
    errors = model_errors(cfg)
    if errors:
      raise ValueError(_invalid(errors))
    return cfg


def model_errors(m: ModelConfig) -> list[str]:
  """All problems with a model shape, each naming its field, the bad value and the fix."""
  errors = []
  for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
    value = getattr(m, name)
    if not isinstance(value, int) or value <= 0:
      errors.append(f"model.{name}={value!r}: must be a positive integer")
  if not errors and m.num_heads % m.num_kv_heads:
    errors.append(f"model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads={m.num_kv_heads}: "
                  "grouped-query attention shares each KV head among num_heads // num_kv_heads query heads")
  if isinstance(m.head_dim, int) and m.head_dim % 2:
    errors.append(f"model.head_dim={m.head_dim}: must be even (RoPE rotates pairs of dimensions)")
  for name in ("dtype", "param_dtype"):
    if getattr(m, name) not in DTYPES:
      errors.append(f"model.{name}={getattr(m, name)!r}: unknown dtype; use one of {sorted(DTYPES)}")
  if m.remat not in REMAT_POLICIES:
    errors.append(f"model.remat={m.remat!r}: use one of {list(REMAT_POLICIES)}")
  if m.attention not in ATTENTION_IMPLS:
    errors.append(f"model.attention={m.attention!r}: use one of {list(ATTENTION_IMPLS)}")
  if m.decode_quant not in DECODE_QUANT:
    errors.append(f"model.decode_quant={m.decode_quant!r}: use one of {list(DECODE_QUANT)}")
  if not m.rope_theta > 0:
    errors.append(f"model.rope_theta={m.rope_theta!r}: must be > 0")
  if m.rope_type not in ROPE_TYPES:
    errors.append(f"model.rope_type={m.rope_type!r}: use one of {list(ROPE_TYPES)}")
  elif m.rope_type != "default" and not m.rope_factor > 0:
    errors.append(f"model.rope_factor={m.rope_factor!r}: must be > 0 with model.rope_type={m.rope_type!r}")
  if m.rope_type == "llama3":
    if not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
      errors.append(f"model.rope_low_freq_factor={m.rope_low_freq_factor!r} and model.rope_high_freq_factor="
                    f"{m.rope_high_freq_factor!r}: llama3 RoPE needs 0 < low < high (Llama 3.1: 1.0 and 4.0)")
    if not isinstance(m.rope_original_max_position, int) or m.rope_original_max_position <= 0:
      errors.append(f"model.rope_original_max_position={m.rope_original_max_position!r}: must be a positive "
                    "integer (the context length before the extension; Llama 3.1: 8192)")
  if not m.norm_eps > 0:
    errors.append(f"model.norm_eps={m.norm_eps!r}: must be > 0")
  return errors


def config_errors(config: Any) -> list[str]:
  """All problems with a full training config (model, tidar, train sections)."""
  try:
    errors = model_errors(ModelConfig(**dict(config.model)))
  except TypeError as e:  # unknown or missing model fields
    errors = [f"model: {e}"]
  t, tr = config.tidar, config.train
  if t.objective not in OBJECTIVES:
    errors.append(f"tidar.objective={t.objective!r}: use one of {list(OBJECTIVES)}")
  if not isinstance(t.block_size, int) or t.block_size < 1:
    errors.append(f"tidar.block_size={t.block_size!r}: must be a positive integer (typically 4, 8 or 16)")
  elif isinstance(tr.seq_len, int) and tr.seq_len % t.block_size:
    errors.append(f"train.seq_len={tr.seq_len} is not a multiple of tidar.block_size={t.block_size}: "
                  f"use e.g. train.seq_len={tr.seq_len - tr.seq_len % t.block_size or t.block_size}")
  if not t.loss_alpha >= 0:
    errors.append(f"tidar.loss_alpha={t.loss_alpha!r}: must be >= 0")
  if not 0.0 <= t.verify_beta <= 1.0:
    errors.append(f"tidar.verify_beta={t.verify_beta!r}: must lie in [0, 1] (1 = exact AR verification)")
  setting = t.get("predraft", predraft.ALL)
  if setting != predraft.AUTO and isinstance(t.block_size, int) and t.block_size >= 1:
    try:
      kept = predraft.counts(setting, t.block_size)
      if t.verify_beta < 1 and not predraft.is_full(kept, t.block_size):
        errors.append(f"tidar.predraft={setting!r} needs tidar.verify_beta=1 (mixing diffusion logits into "
                      "verification needs every block); use predraft='all' or verify_beta=1")
    except ValueError as e:
      errors.append(str(e))
  for name in ("seq_len", "batch_size", "steps"):
    value = getattr(tr, name)
    if not isinstance(value, int) or value < 1:
      errors.append(f"train.{name}={value!r}: must be a positive integer")
  eval_batches = tr.get("eval_batches", 1)
  if not isinstance(eval_batches, int) or isinstance(eval_batches, bool) or eval_batches < 0:
    errors.append(f"train.eval_batches={eval_batches!r}: must be an integer >= 0 (0: no validation)")
  accum = tr.get("grad_accum", 0)
  if not isinstance(accum, int) or isinstance(accum, bool) or accum < 0:
    errors.append(f"train.grad_accum={accum!r}: must be an integer >= 0 (0: derived from train.micro_batch_per_device)")
  elif isinstance(tr.batch_size, int) and accum and tr.batch_size % accum:
    errors.append(f"train.batch_size={tr.batch_size} is not a multiple of train.grad_accum={accum}")
  try:
    batch_plan.requested_micro_batch(tr)
  except ValueError as e:
    errors.append(str(e))
  chunk = tr.get("loss_chunk", DEFAULT_LOSS_CHUNK)
  if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
    errors.append(f"train.loss_chunk={chunk!r}: must be a positive integer (sequence positions whose logits "
                  "exist at once; e.g. 1024)")
  if not tr.learning_rate > 0:
    errors.append(f"train.learning_rate={tr.learning_rate!r}: must be > 0")
  steps = tr.steps if isinstance(tr.steps, int) and tr.steps >= 1 else None
  if not _is_step_count(tr.warmup_steps) or (steps and tr.warmup_steps > steps):
    errors.append(f"train.warmup_steps={_shown(tr.warmup_steps)}: use a fraction of train.steps in (0, 1) or a whole "
                  f"number of steps in [0, train.steps={tr.steps}], e.g. --config.train.warmup_steps=0.1 "
                  "(10% of the steps)")
  if not _is_step_count(tr.checkpoint_every) or tr.checkpoint_every == 0:
    errors.append(f"train.checkpoint_every={_shown(tr.checkpoint_every)}: use a whole number of steps >= 1 or a "
                  "fraction of train.steps in (0, 1), e.g. --config.train.checkpoint_every=0.25")
  every_s = tr.get("checkpoint_every_s", DEFAULT_CHECKPOINT_EVERY_S)
  if not (_is_number(every_s) and every_s >= 0):
    errors.append(f"train.checkpoint_every_s={_shown(every_s)}: must be a number of seconds >= 0 "
                  "(0 turns the wall-clock checkpoints off), e.g. --config.train.checkpoint_every_s=600")
  data = config.get("data") if hasattr(config, "get") else None
  shuffle = data.get("window_shuffle", 1) if data is not None else 1
  if not isinstance(shuffle, int) or shuffle < 1:
    errors.append(f"data.window_shuffle={shuffle!r}: must be a positive integer (windows shuffled together; 1 = off)")
  if data is not None and "local_code_roots" in data:
    try:
      parse_local_code_roots(data.local_code_roots)
    except ValueError as e:
      errors.append(str(e))
  return errors


def validate(config: Any) -> ModelConfig:
  """Raises one ValueError listing every bad field; returns the static model config."""
  errors = config_errors(config)
  if errors:
    raise ValueError(_invalid(errors))
  return ModelConfig(**dict(config.model))


def _invalid(errors: list[str]) -> str:
  """One line for one bad field (the common case), one line per field for several."""
  return "invalid config: " + errors[0] if len(errors) == 1 else "invalid config:\n  " + "\n  ".join(errors)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: Any) -> str:
  """A value as the user typed it: these float fields hold --config...=300 as 300.0."""
  return repr(int(value)) if isinstance(value, float) and value.is_integer() else repr(value)


def _is_step_count(value: Any) -> bool:
  """What `steps_of` reads: a fraction in (0, 1), or a whole number of steps >= 0 (30 or 30.0)."""
  return _is_number(value) and value >= 0 and (value < 1 or float(value).is_integer())


def steps_of(value: float, steps: int) -> int:
  """A step count written as steps or as a fraction of the run (`train.warmup_steps`,
  `train.checkpoint_every`): 0.1 is 10% of `steps` (at least 1), 30 or 30.0 is 30 steps. Fractions let
  a config's defaults follow a changed train.steps."""
  return max(1, round(value * steps)) if 0 < value < 1 else int(value)
