"""Convert a llama.cpp GGUF file (Llama architecture) into a tidar_jax checkpoint.

    python -m tidar_jax.convert.from_gguf --gguf=FILE.gguf --out=CKPT_DIR [--config=configs/x.py]
    python -m tidar_jax.train --config=CKPT_DIR/config.py --workdir=runs/NAME   # continual pretraining

CKPT_DIR has `from_hf`'s layout (params/, config.json, config.py, tokenizer.json with `<|mask|>`
added per the family table), written by the same `from_hf.write_checkpoint`: this module only
turns the GGUF into what a Hugging Face directory would hold.

* config.json: from the `llama.*` metadata (block count, embedding length, heads, RoPE base, ...);
  tied embeddings when the file has no `output.weight`.
* tensors: GGUF names mapped to HF names (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`),
  each one read from the memory-mapped file and dequantized to float32 alone (numpy, `gguf.quants`),
  so peak memory is one tensor. llama.cpp stores Llama's q/k rows permuted (its RoPE rotates
  adjacent pairs, HF's and ours rotate halves); the permutation is undone here.
* tokenizer: the byte-level BPE the metadata describes (`tokenizer.ggml.tokens`, `.merges`,
  `.token_type`, `.pre`), as a `tokenizers` BPE; control tokens become special tokens.

Needs the `gguf` package (`pip install -e '.[pretrained]'`). Refused with one line each: a missing
or non-GGUF file, an architecture other than llama, a tensor type outside `SUPPORTED_TYPES`, a
tokenizer other than byte-level BPE, RoPE scalings other than linear.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np
import tokenizers
from absl import app, flags
from tokenizers import decoders, pre_tokenizers, processors

from tidar_jax.convert import from_hf

ARCHITECTURES = ("llama",)
# Types a GGUF of a Llama model usually holds; `gguf.quants.dequantize` reads each of them.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4
# `tokenizer.ggml.pre` -> the pre-tokenizer of the vocabulary's original tokenizer.json.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's split, then bytes
PRE_TOKENIZERS = {
    "default": _BYTE_LEVEL,
    "gpt2": _BYTE_LEVEL,
    "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _BYTE_LEVEL]),
    "llama-bpe": pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}


def _gguf():
  try:
    import gguf
  except ImportError as e:
    raise ImportError("reading GGUF files needs the `gguf` package: pip install -e '.[pretrained]' "
                      "(or pip install gguf)") from e
  return gguf


def open_gguf(path: str) -> Any:
  """A `gguf.GGUFReader` over `path` (memory-mapped: nothing is read until a tensor is used)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--gguf={path}: no such file; pass a llama.cpp .gguf model file")
  try:
    return _gguf().GGUFReader(path)
  except (ValueError, OSError, IndexError) as e:  # the reader's own check of the magic and version
    raise ValueError(f"--gguf={path} is not a readable GGUF file ({' '.join(str(e).split())[:200]})") from e


def metadata(reader: Any, key: str, default: Any = None) -> Any:
  """A metadata value (str, int, float, bool or list), or `default` when the file lacks `key`."""
  field = reader.get_field(key)
  return default if field is None else field.contents()


def _required(reader: Any, key: str) -> Any:
  value = metadata(reader, key)
  if value is None:
    raise ValueError(f"the GGUF file lacks the metadata key {key!r}, which a "
                     f"{metadata(reader, 'general.architecture')} model needs")
  return value


def architecture(reader: Any) -> str:
  arch = metadata(reader, "general.architecture", "<missing>")
  if arch not in ARCHITECTURES:
    raise ValueError(f"GGUF general.architecture={arch!r} is not supported: tidar_jax converts "
                     f"{list(ARCHITECTURES)} from GGUF (Qwen2/Qwen3 convert from their Hugging Face checkpoints "
                     "with tidar_jax.convert.from_hf)")
  return arch


def hf_config(reader: Any) -> dict[str, Any]:
  """The config.json a Hugging Face LlamaForCausalLM of this file would have."""
  arch = architecture(reader)
  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise ValueError("the GGUF file holds rope_freqs.weight (Llama 3.1-style RoPE scaling stored as per-frequency "
                     "factors, without the llama3 parameters tidar_jax's RoPE needs); convert the Hugging Face "
                     "checkpoint with tidar_jax.convert.from_hf instead")
  heads = _required(reader, f"{arch}.attention.head_count")
  d_model = _required(reader, f"{arch}.embedding_length")
  head_dim = metadata(reader, f"{arch}.attention.key_length") or d_model // heads
  rotary = metadata(reader, f"{arch}.rope.dimension_count", head_dim)
  if rotary != head_dim:
    raise ValueError(f"GGUF {arch}.rope.dimension_count={rotary} but head_dim is {head_dim}: partial rotary "
                     "embeddings are not supported (tidar_jax rotates the whole head)")
  embed = [t for t in reader.tensors if t.name == "token_embd.weight"]
  if not embed:
    raise ValueError("the GGUF file has no token_embd.weight tensor: not a complete llama model")
  cfg: dict[str, Any] = {
      "model_type": arch,
      "architectures": ["LlamaForCausalLM"],
      "vocab_size": int(embed[0].shape[-1]),  # GGUF shapes list the fastest axis first: [embed, vocab]
      "hidden_size": d_model,
      "intermediate_size": _required(reader, f"{arch}.feed_forward_length"),
      "num_hidden_layers": _required(reader, f"{arch}.block_count"),
      "num_attention_heads": heads,
      "num_key_value_heads": metadata(reader, f"{arch}.attention.head_count_kv", heads),
      "head_dim": head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": float(metadata(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
      "rope_theta": float(metadata(reader, f"{arch}.rope.freq_base", 10000.0)),
      "max_position_embeddings": metadata(reader, f"{arch}.context_length", 2048),
      "tie_word_embeddings": "output.weight" not in names,
  }
  scaling = metadata(reader, f"{arch}.rope.scaling.type", "none")
  if scaling == "linear":
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(_required(reader, f"{arch}.rope.scaling.factor"))}
  elif scaling != "none":
    raise ValueError(f"GGUF {arch}.rope.scaling.type={scaling!r} is not supported (tidar_jax reads 'none' and "
                     "'linear' from GGUF)")
  for key in ("bos_token_id", "eos_token_id"):
    token = metadata(reader, f"tokenizer.ggml.{key}")
    if token is not None:
      cfg[key] = token
  return cfg


def hf_name(gguf_name: str) -> str | None:
  """The HF tensor name of a GGUF tensor of a llama model; None for names the mapping lacks."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  match = _LAYER_RE.match(gguf_name)
  if match and match.group(2) in _LAYER_NAMES:
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
  return None


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k permutation (convert_hf_to_gguf.py's `permute`): within each head, rows
  [x0, x1, y0, y1, ...] (pairs rotated together) go back to [x0, y0, ..., x1, y1, ...] (halves).
  w: [heads * head_dim, ...] -> the same shape."""
  return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_source(reader: Any, path: str, cfg: dict[str, Any]) -> from_hf.TensorSource:
  """The file's tensors under their HF names, dequantized to float32 one at a time."""
  gguf = _gguf()
  unsupported = [f"{t.name} ({t.tensor_type.name})" for t in reader.tensors
                 if t.tensor_type.name not in SUPPORTED_TYPES]
  if unsupported:
    raise ValueError(f"GGUF tensor {unsupported[0]} has an unsupported type"
                     f"{f' ({len(unsupported) - 1} more)' if len(unsupported) > 1 else ''}: tidar_jax dequantizes "
                     f"{', '.join(SUPPORTED_TYPES)}")
  # Unmapped GGUF names keep their own name, so the shared check reports them as unexpected tensors.
  names = {t.name: hf_name(t.name) or t.name for t in reader.tensors}
  heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}

  def read() -> Iterator[tuple[str, np.ndarray]]:
    for t in reader.tensors:
      w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
      w = w.reshape(tuple(int(d) for d in reversed(t.shape)))  # numpy order: [rows, fastest axis]
      match = _LAYER_RE.match(t.name)
      if match and match.group(2) in heads:
        w = unpermute_rows(w, heads[match.group(2)])
      yield names[t.name], w

  shapes = {names[t.name]: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
  return from_hf.TensorSource(shapes, read, path)


def _byte_spelling(token: str, alphabet: set[str], spelling: dict[int, str]) -> str:
  """A token in the byte-level alphabet: GGUF files spell a few (e.g. control tokens) as raw text."""
  return token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))


def gguf_tokenizer(reader: Any) -> tokenizers.Tokenizer:
  """The byte-level BPE tokenizer the metadata describes (as transformers' GGUF converter builds it)."""
  model = metadata(reader, "tokenizer.ggml.model", "<missing>")
  if model != "gpt2":
    raise ValueError(f"GGUF tokenizer.ggml.model={model!r} is not supported: tidar_jax reads byte-level BPE "
                     "('gpt2') vocabularies from GGUF")
  pre = metadata(reader, "tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported (known: {sorted(PRE_TOKENIZERS)}); "
                     "its text splitting would differ from the model's own tokenizer")
  tokens = _required(reader, "tokenizer.ggml.tokens")
  merges = _required(reader, "tokenizer.ggml.merges")
  types = metadata(reader, "tokenizer.ggml.token_type", [])
  spelling = {b: chr(c) for b, c in _bytes_to_unicode().items()}
  alphabet = set(spelling.values())
  vocab = {_byte_spelling(t, alphabet, spelling): i for i, t in enumerate(tokens)}
  backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges]))
  backend.pre_tokenizer = PRE_TOKENIZERS[pre]
  backend.decoder = decoders.ByteLevel()
  backend.post_processor = processors.ByteLevel(trim_offsets=False)
  # Control tokens spelled outside the byte alphabet are llama.cpp mislabels (transformers skips them too).
  backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                              for t, kind in zip(tokens, types) if kind == _CONTROL and set(t) <= alphabet])
  backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                      for t, kind in zip(tokens, types) if kind == _USER_DEFINED and t in vocab])
  return backend


def _bytes_to_unicode() -> dict[int, int]:
  """GPT-2's byte -> printable code point table (the alphabet byte-level BPE tokens are spelled in)."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
  table, extra = {b: b for b in printable}, 0
  for b in range(256):
    if b not in table:
      table[b] = 256 + extra
      extra += 1
  return table


def convert(gguf_path: str, out: str, config: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """GGUF file -> tidar_jax checkpoint directory; returns the written training config."""
  gguf_path = os.path.abspath(os.path.expanduser(gguf_path))
  out = os.path.abspath(os.path.expanduser(out))
  from_hf.check_out(out)
  reader = open_gguf(gguf_path)
  cfg = hf_config(reader)
  tokenizer = gguf_tokenizer(reader)
  return from_hf.write_checkpoint(cfg, tokenizer, tensor_source(reader, gguf_path, cfg), out, config)


def main(argv: list[str]) -> None:
  del argv
  gguf_path, out = flags.FLAGS.gguf, flags.FLAGS.out
  try:
    _gguf()
  except ImportError as e:  # a missing optional dependency: one error line, as for a bad flag
    raise app.UsageError(str(e)) from e
  print(from_hf.report(convert(gguf_path, out, flags.FLAGS.config), gguf_path, out))


if __name__ == "__main__":
  from_hf.run_cli(main, "gguf", "llama.cpp GGUF model file (llama architecture).")
