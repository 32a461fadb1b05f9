"""Per-family mapping tables between Hugging Face Llama/Qwen checkpoints and tidar_jax params.

Every family shares one layout rule: our kernel is the transpose of the torch `nn.Linear` weight,
with the heads axis split out where attention needs it:

    HF q_proj.weight [heads*head_dim, embed]  ->  attn/q/kernel [embed, heads, head_dim]
    HF o_proj.weight [embed, heads*head_dim]  ->  attn/o/kernel [heads, head_dim, embed]
    HF gate_proj.weight [mlp, embed]          ->  mlp/gate/kernel [embed, mlp]
    HF q_proj.bias [heads*head_dim]           ->  attn/q/bias [heads, head_dim]

so `ours = HF.T.reshape(our_shape)` and `HF = ours.reshape(hf_shape[::-1]).T`. The one exception
is the token embedding, stored [vocab, embed] by both. RoPE needs no permutation: HF Llama/Qwen
rotate halves (`rotate_half`), as `tidar_jax.model.rope` does, so q/k weights map unchanged.

A family is the tensor table plus how to read (and write) its `config.json`; each HF feature the
model lacks (rope scaling, sliding windows, biases outside q/k/v, ...) is refused with its name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tidar_jax.config import ModelConfig

LAYER = "model.layers.{i}."  # prefix of per-layer HF tensor names


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One HF tensor <-> one tidar_jax param (per layer: one slice of the layer-stacked param)."""

  hf: str  # HF name; per-layer names are relative to `LAYER`
  path: tuple[str, ...]  # param path under params/ (per-layer: under params/layers/)
  hf_shape: tuple[str, ...]  # HF shape in symbolic dims (see `dims`)
  transpose: bool = True  # ours = HF.T reshaped (False: same order, only the embedding)


def dims(m: ModelConfig, vocab_size: int) -> dict[str, int]:
  """Sizes of the symbolic dims in `TensorMap.hf_shape`."""
  return {"vocab": vocab_size, "embed": m.d_model, "mlp": m.mlp_dim, "head_dim": m.head_dim,
          "q": m.num_heads * m.head_dim, "kv": m.num_kv_heads * m.head_dim}


def hf_shape(t: TensorMap, m: ModelConfig, vocab_size: int) -> tuple[int, ...]:
  d = dims(m, vocab_size)
  return tuple(d[name] for name in t.hf_shape)


EMBED = TensorMap("model.embed_tokens.weight", ("embed", "embedding"), ("vocab", "embed"), transpose=False)
LM_HEAD = TensorMap("lm_head.weight", ("lm_head", "kernel"), ("vocab", "embed"))
FINAL_NORM = TensorMap("model.norm.weight", ("final_norm", "scale"), ("embed",))

_LLAMA_LAYER = (
    TensorMap("input_layernorm.weight", ("attn_norm", "scale"), ("embed",)),
    TensorMap("self_attn.q_proj.weight", ("attn", "q", "kernel"), ("q", "embed")),
    TensorMap("self_attn.k_proj.weight", ("attn", "k", "kernel"), ("kv", "embed")),
    TensorMap("self_attn.v_proj.weight", ("attn", "v", "kernel"), ("kv", "embed")),
    TensorMap("self_attn.o_proj.weight", ("attn", "o", "kernel"), ("embed", "q")),
    TensorMap("post_attention_layernorm.weight", ("mlp_norm", "scale"), ("embed",)),
    TensorMap("mlp.gate_proj.weight", ("mlp", "gate", "kernel"), ("mlp", "embed")),
    TensorMap("mlp.up_proj.weight", ("mlp", "up", "kernel"), ("mlp", "embed")),
    TensorMap("mlp.down_proj.weight", ("mlp", "down", "kernel"), ("embed", "mlp")),
)
_QKV_BIAS = (
    TensorMap("self_attn.q_proj.bias", ("attn", "q", "bias"), ("q",)),
    TensorMap("self_attn.k_proj.bias", ("attn", "k", "bias"), ("kv",)),
    TensorMap("self_attn.v_proj.bias", ("attn", "v", "bias"), ("kv",)),
)
_QK_NORM = (
    TensorMap("self_attn.q_norm.weight", ("attn", "q_norm", "scale"), ("head_dim",)),
    TensorMap("self_attn.k_norm.weight", ("attn", "k_norm", "scale"), ("head_dim",)),
)

# Tensors some checkpoints carry that the model recomputes (old Llama saves kept RoPE's inv_freq).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Family:
  model_type: str  # config.json "model_type"
  architecture: str  # config.json "architectures"[0] (the AutoModelForCausalLM class)
  layer_tensors: tuple[TensorMap, ...]
  qkv_bias: bool  # bias on q/k/v only (Qwen2): fixed by the family, not by a config flag
  qk_norm: bool
  has_attention_bias_flag: bool  # config.json "attention_bias" exists and biases q/k/v *and* o
  has_sliding_window: bool  # config.json "use_sliding_window" exists


FAMILIES: dict[str, Family] = {
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", _LLAMA_LAYER + _QKV_BIAS, qkv_bias=True, qk_norm=False,
                    has_attention_bias_flag=False, has_sliding_window=True),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", _LLAMA_LAYER + _QK_NORM, qkv_bias=False, qk_norm=True,
                    has_attention_bias_flag=True, has_sliding_window=True),
    "llama": Family("llama", "LlamaForCausalLM", _LLAMA_LAYER, qkv_bias=False, qk_norm=False,
                    has_attention_bias_flag=True, has_sliding_window=False),
}


def get_family(model_type: str) -> Family:
  if model_type not in FAMILIES:
    raise ValueError(f"unsupported model_type={model_type!r}: tidar_jax converts {sorted(FAMILIES)} "
                     "(Qwen2/Qwen2.5, Qwen3, Llama 3.x); other architectures need their own mapping "
                     "table in tidar_jax/convert/families.py")
  return FAMILIES[model_type]


def family_for(m: ModelConfig) -> Family:
  """The family whose architecture matches a tidar_jax model (for models not converted from HF)."""
  for family in FAMILIES.values():
    if (family.qkv_bias, family.qk_norm) == (m.qkv_bias, m.qk_norm):
      return family
  raise ValueError(f"no Hugging Face family has model.qkv_bias={m.qkv_bias} together with "
                   f"model.qk_norm={m.qk_norm}: Qwen2 has q/k/v bias, Qwen3 has qk-norm, Llama has neither")


def _required(hf: dict[str, Any], key: str) -> Any:
  if hf.get(key) is None:
    raise ValueError(f"config.json lacks {key!r}, which a {hf.get('model_type')} checkpoint needs")
  return hf[key]


# HF rope parameter key -> ModelConfig field (`model.rope_inv_freq`), per supported rope_type.
_ROPE_KEYS = {
    "default": {},
    "linear": {"factor": "rope_factor"},
    "llama3": {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
               "high_freq_factor": "rope_high_freq_factor",
               "original_max_position_embeddings": "rope_original_max_position"},
}


def rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
  """ModelConfig RoPE fields (rope_theta, rope_type and its parameters) from `rope_parameters`
  (transformers >= 5) or the legacy `rope_theta` / `rope_scaling` (Llama 3.1's config.json)."""
  params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
  rope_type = params.get("rope_type") or params.get("type") or "default"
  if rope_type not in _ROPE_KEYS:
    raise ValueError(f"config.json: RoPE scaling type {rope_type!r} is not supported (tidar_jax.model.rope_inv_freq "
                     f"implements {sorted(_ROPE_KEYS)}; yarn, dynamic and longrope also rescale attention or "
                     "change with the sequence length)")
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"config.json: partial_rotary_factor={params['partial_rotary_factor']} is not supported "
                     "(tidar_jax rotates the whole head_dim)")
  fields = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0))), "rope_type": rope_type}
  for key, field in _ROPE_KEYS[rope_type].items():
    if params.get(key) is None:
      raise ValueError(f"config.json: RoPE scaling {rope_type!r} needs {key!r} in rope_scaling / rope_parameters")
    fields[field] = int(params[key]) if field == "rope_original_max_position" else float(params[key])
  return fields


def hf_rope_parameters(m: ModelConfig) -> dict[str, Any]:
  """`rope_parameters` of config.json for `m` (the inverse of `rope_fields`)."""
  return {"rope_type": m.rope_type, "rope_theta": m.rope_theta,
          **{key: getattr(m, field) for key, field in _ROPE_KEYS[m.rope_type].items()}}


def model_fields(family: Family, hf: dict[str, Any]) -> dict[str, Any]:
  """ModelConfig shape fields from an HF config.json, refusing features the model lacks."""
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (tidar_jax uses SwiGLU: silu)")
  if family.has_attention_bias_flag and hf.get("attention_bias"):
    raise ValueError(f"config.json: attention_bias=true ({family.model_type} then biases o_proj too) is not "
                     "supported; tidar_jax has biases on q/k/v only (model.qkv_bias)")
  if hf.get("mlp_bias"):
    raise ValueError("config.json: mlp_bias=true is not supported (tidar_jax's MLP has no biases)")
  if family.has_sliding_window and hf.get("use_sliding_window"):
    raise ValueError("config.json: use_sliding_window=true is not supported (tidar_jax attends over the whole "
                     "context)")
  heads = _required(hf, "num_attention_heads")
  d_model = _required(hf, "hidden_size")
  return dict(
      vocab_size=_required(hf, "vocab_size"),
      d_model=d_model,
      num_layers=_required(hf, "num_hidden_layers"),
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or d_model // heads,
      mlp_dim=_required(hf, "intermediate_size"),
      qkv_bias=family.qkv_bias,
      qk_norm=family.qk_norm,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      **rope_fields(hf),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
  )


def hf_config(family: Family, m: ModelConfig, vocab_size: int, dtype: str,
              source: dict[str, Any] | None) -> dict[str, Any]:
  """config.json for `m` in `family`: the source checkpoint's config (token ids, context length, ...)
  when known, with every shape field taken from the tidar_jax model."""
  if (family.qkv_bias, family.qk_norm) != (m.qkv_bias, m.qk_norm):
    raise ValueError(f"model_type={family.model_type!r} needs qkv_bias={family.qkv_bias}, "
                     f"qk_norm={family.qk_norm}, but the checkpoint has model.qkv_bias={m.qkv_bias}, "
                     f"model.qk_norm={m.qk_norm}")
  hf = {k: v for k, v in (source or {}).items() if k not in ("transformers_version", "rope_scaling")}
  rope = hf_rope_parameters(m)
  hf.update(
      model_type=family.model_type,
      architectures=[family.architecture],
      vocab_size=vocab_size,
      hidden_size=m.d_model,
      intermediate_size=m.mlp_dim,
      num_hidden_layers=m.num_layers,
      num_attention_heads=m.num_heads,
      num_key_value_heads=m.num_kv_heads,
      head_dim=m.head_dim,
      hidden_act="silu",
      rms_norm_eps=m.norm_eps,
      tie_word_embeddings=m.tie_embeddings,
      # Both spellings: transformers >= 5 reads rope_parameters, 4.x rope_theta and rope_scaling.
      rope_theta=m.rope_theta,
      rope_parameters=rope,
      dtype=dtype,
      torch_dtype=dtype,
  )
  if m.rope_type != "default":
    hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
  if family.has_attention_bias_flag:
    hf["attention_bias"] = False
  if family.has_sliding_window:
    hf["use_sliding_window"] = False
  if "layer_types" in hf:  # per-layer attention kinds: all full attention, one per layer
    hf["layer_types"] = ["full_attention"] * m.num_layers
  return hf
