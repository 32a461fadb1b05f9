"""Export a tidar_jax checkpoint as a Hugging Face model directory.

    python -m tidar_jax.convert.to_hf --ckpt=CKPT_DIR --out=HF_DIR [--drop_mask_row] [--dtype=bfloat16]

CKPT_DIR is anything `tidar_jax.checkpoint.load_for_inference` reads: a `from_hf` output, an export,
or a training workdir (its latest step). HF_DIR gets config.json, safetensors (sharded with
`model.safetensors.index.json` above --max_shard_gb) and tokenizer.json; transformers'
`AutoModelForCausalLM.from_pretrained(HF_DIR)` loads it.

The family is the one the params were converted from (`config.hf.model_type`), else --model_type,
else inferred from the architecture (qk-norm: qwen3, q/k/v bias: qwen2, neither: llama).
--drop_mask_row restores the source vocabulary: the embedding keeps only the HF rows and the
tokenizer only the HF ids, so an unchanged conversion round-trips to identical tensors; without
it the TiDAR rows (<|mask|>, <|pad|>, ...) stay, for serving the TiDAR model itself.

Memory: the params are loaded whole, then one HF tensor at a time joins the current shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags
from safetensors.numpy import save_file

from tidar_jax import checkpoint
from tidar_jax.config import DTYPES, ModelConfig
from tidar_jax.convert import families
from tidar_jax.convert.families import Family, TensorMap
from tidar_jax.tokenizer import TOKENIZER_FILE

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _leaf(tree: dict[str, Any], path: tuple[str, ...]) -> np.ndarray:
  for key in path:
    tree = tree[key]
  return tree


def _to_hf(ours: np.ndarray, t: TensorMap, shape: tuple[int, ...]) -> np.ndarray:
  """Inverse of from_hf's layout map: our layout -> HF [shape]."""
  return ours.reshape(shape[::-1]).T if t.transpose else ours.reshape(shape)


def hf_tensors(params: dict[str, Any], family: Family, m: ModelConfig, rows: int
               ) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, tensor) one at a time; the embedding (and untied LM head) cut to `rows` rows."""
  p = params["params"]
  yield families.EMBED.hf, _leaf(p, families.EMBED.path)[:rows]  # [rows, embed]
  for i in range(m.num_layers):
    for t in family.layer_tensors:
      yield (families.LAYER.format(i=i) + t.hf,
             _to_hf(_leaf(p["layers"], t.path)[i], t, families.hf_shape(t, m, rows)))
  yield families.FINAL_NORM.hf, _leaf(p, families.FINAL_NORM.path)
  if not m.tie_embeddings:
    yield families.LM_HEAD.hf, _leaf(p, families.LM_HEAD.path)[:, :rows].T  # [rows, embed]


def _write_safetensors(tensors: Iterator[tuple[str, np.ndarray]], out: str, dtype: Any,
                       max_shard_bytes: int) -> None:
  """One file, or shards of at most max_shard_bytes (a bigger tensor gets its own) plus the index."""
  shards: list[list[str]] = []  # tensor names per shard, in order
  current: dict[str, np.ndarray] = {}
  size = total = 0

  def flush() -> None:
    if current:
      save_file(current, os.path.join(out, f".shard-{len(shards)}.tmp"), metadata={"format": "pt"})
      shards.append(list(current))
      current.clear()

  for name, tensor in tensors:
    tensor = np.ascontiguousarray(tensor.astype(dtype, copy=False))
    if current and size + tensor.nbytes > max_shard_bytes:
      flush()
      size = 0
    current[name] = tensor
    size += tensor.nbytes
    total += tensor.nbytes
  flush()
  if len(shards) == 1:
    os.replace(os.path.join(out, ".shard-0.tmp"), os.path.join(out, SINGLE_FILE))
    return
  weight_map = {}
  for k, names in enumerate(shards):
    file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    os.replace(os.path.join(out, f".shard-{k}.tmp"), os.path.join(out, file))
    weight_map.update(dict.fromkeys(names, file))
  with open(os.path.join(out, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _tokenizer_json(tokenizer: Any, keep_ids: int | None) -> str:
  """The checkpoint's tokenizer; with keep_ids, without the added tokens whose id is >= keep_ids."""
  data = json.loads(tokenizer.backend.to_str())
  if keep_ids is not None:
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < keep_ids]
  return json.dumps(data, ensure_ascii=False)


def export(ckpt: str, out: str, *, drop_mask_row: bool = False, model_type: str = "", dtype: str = "",
           max_shard_gb: float = 5.0) -> dict[str, Any]:
  """tidar_jax checkpoint -> HF model directory; returns the written config.json contents."""
  params, config, tokenizer = checkpoint.load_for_inference(ckpt, flag="--ckpt")
  params = jax.tree.map(np.asarray, params)  # {'params': ...}; once: each stacked leaf is sliced per layer below
  m = ModelConfig(**config.model.to_dict())
  origin: ml_collections.ConfigDict | None = config.get("hf")
  if model_type:
    family = families.get_family(model_type)
  elif origin is not None:
    family = families.get_family(origin.model_type)
  else:
    family = families.family_for(m)
  source = json.loads(origin.source_config) if origin is not None else None
  rows, keep_ids = m.vocab_size, None
  if drop_mask_row:
    if origin is None:
      raise ValueError(f"--drop_mask_row restores the vocabulary of the HF checkpoint the params came from, "
                       f"but {ckpt} was not converted from HF (its config has no `hf` section); export "
                       "without --drop_mask_row")
    rows, keep_ids = origin.vocab_size, origin.tokenizer_rows
  dtype = dtype or (source or {}).get("dtype") or (source or {}).get("torch_dtype") or "float32"
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r}: use one of {sorted(DTYPES)}")
  hf_cfg = families.hf_config(family, m, rows, dtype, source)

  out = os.path.abspath(os.path.expanduser(out))
  os.makedirs(out, exist_ok=True)
  _write_safetensors(hf_tensors(params, family, m, rows), out, np.dtype(DTYPES[dtype]),
                     int(max_shard_gb * 2**30))
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2)
  with open(os.path.join(out, TOKENIZER_FILE), "w", encoding="utf-8") as f:
    f.write(_tokenizer_json(tokenizer, keep_ids))
  return hf_cfg


def main(argv: list[str]) -> None:
  del argv
  fl = flags.FLAGS
  hf_cfg = export(fl.ckpt, fl.out, drop_mask_row=fl.drop_mask_row, model_type=fl.model_type, dtype=fl.dtype,
                  max_shard_gb=fl.max_shard_gb)
  print(f"exported {fl.ckpt} -> {fl.out} ({hf_cfg['model_type']}, {hf_cfg['vocab_size']} vocab rows, "
        f"{hf_cfg['dtype']})")


if __name__ == "__main__":
  from tidar_jax import cli

  cli.define_required_strings(ckpt="tidar_jax checkpoint: a from_hf output, an export or a training workdir.",
                              out="Output Hugging Face model directory.")
  flags.DEFINE_bool("drop_mask_row", False, "Drop the rows and tokens conversion added (<|mask|>, ...), "
                    "restoring the source HF vocabulary.")
  flags.DEFINE_string("model_type", "", "HF family (qwen2 | qwen3 | llama); default: the source's, or inferred.")
  flags.DEFINE_string("dtype", "", "Stored weight dtype (float32 | bfloat16 | float16); default: the source's.")
  flags.DEFINE_float("max_shard_gb", 5.0, "Largest safetensors shard, in GiB.")
  cli.run(main)
