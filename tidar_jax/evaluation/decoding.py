"""Decode a prompt set with the jitted AR or TiDAR decoder and measure it: T/NFE (generated tokens
per forward pass, the prefill counted), the accepted-length histogram, tokens/s after a warm-up
compile per prompt bucket, and greedy agreement between the two decoders."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax import predraft as predraft_lib
from tidar_jax.decode.ar import generate_ar
from tidar_jax.decode.loop import bucket_length
from tidar_jax.decode.tidar import generate_tidar
from tidar_jax.evaluation import humaneval


@dataclasses.dataclass
class PromptSet:
  name: str
  tokens: np.ndarray  # [n, width] int32, right-padded with 0
  lengths: np.ndarray  # [n] int32
  sources: list[str]


def _chunks(n: int, size: int) -> list[tuple[np.ndarray, int]]:
  """(row indices, real rows) in chunks of exactly `size`: a short last chunk repeats its first row
  (same shapes: no extra compilation); only the first `real` rows are recorded."""
  out = []
  for start in range(0, n, size):
    idx = np.arange(start, min(start + size, n))
    out.append((np.concatenate([idx, np.full(size - len(idx), idx[0])]), len(idx)))
  return out


def decode_params(params, dtype: str):
  """Weights cast to the decode dtype, on one device (the decoders run unsharded)."""
  dt = jnp.dtype(dtype)
  return jax.device_put(jax.tree.map(lambda x: jnp.asarray(x, dt), params), jax.devices()[0])


def run_decoder(mode: str, params, model_cfg, prompts: PromptSet, *, block_size: int, sampling, max_new_tokens: int,
                batch: int, seed: int, eos_id: int | Sequence[int] | None, mask_id: int,
                predraft: Any = "all") -> dict[str, Any]:
  """Decodes every prompt of the set in batches; per-row tokens and stats plus the timed totals.
  predraft: TiDAR's kept draft blocks (`tidar_jax.predraft.counts`).

  Each compiled shape (prompt bucket) is run once untimed first, so the timings exclude compilation;
  the decoder's default max_len depends only on the bucket, so chunks of one bucket share it."""
  root = jax.random.key(seed)
  compile_s, seconds, warm, outs = 0.0, 0.0, set(), []
  chunks = _chunks(prompts.tokens.shape[0], batch)
  for idx, real in chunks:
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(idx, jnp.uint32))  # per prompt, not per row
    kw = dict(max_new_tokens=max_new_tokens, sampling=sampling, key=keys, eos_id=eos_id)
    if mode == "tidar":
      kw.update(mask_id=mask_id, block_size=block_size, verify_beta=1.0, predraft=predraft)
    decode = functools.partial(generate_tidar if mode == "tidar" else generate_ar, params, model_cfg,
                               prompts.tokens[idx], prompts.lengths[idx], **kw)
    bucket = bucket_length(int(prompts.lengths[idx].max()), 1 << 30)
    if bucket not in warm:
      t = time.perf_counter()
      jax.block_until_ready(decode())
      compile_s += time.perf_counter() - t
      warm.add(bucket)
    t = time.perf_counter()
    out = jax.block_until_ready(decode())
    seconds += time.perf_counter() - t
    outs.append([np.asarray(x)[:real] for x in (out.tokens, out.lengths, out.stats.forward_passes,
                                                 out.stats.accepted_hist)])
  tokens, lengths, forwards, hist = (np.concatenate(x) for x in zip(*outs))  # chunks are in prompt order
  generated = int(lengths.sum())
  res = {
      "mode": mode, "rows": len(lengths), "batch": batch, "max_new_tokens": max_new_tokens,
      "generated_tokens": generated, "forward_passes": int(forwards.sum()),
      "tokens_per_forward": generated / int(forwards.sum()),
      "tokens_per_forward_rows_mean": float(np.mean(lengths / forwards)),
      "seconds": seconds, "compile_and_first_call_s": compile_s, "compiled_buckets": sorted(warm),
      "tokens_per_s": generated / seconds,  # real rows only (padding rows cost time too)
      "padding_rows": len(chunks) * batch - len(lengths),
      "eos_rows": int(np.sum(lengths < max_new_tokens)),
  }
  if mode == "tidar":
    steps = hist.sum(axis=0)  # steps that accepted a = 0 .. k-1 drafts (a + 1 tokens committed)
    res["accepted_hist"] = steps.tolist()
    res["mean_tokens_per_step"] = float(np.dot(np.arange(1, len(steps) + 1), steps) / steps.sum())
    res["predraft"] = list(predraft_lib.counts(predraft, block_size))
  res["_tokens"], res["_lengths"] = tokens, lengths
  return res


def greedy_agreement(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
  """Share of rows where TiDAR's greedy output equals AR's exactly, and the mean agreeing prefix."""
  ta, tb, la, lb = a["_tokens"], b["_tokens"], a["_lengths"], b["_lengths"]
  equal = np.all(ta == tb, axis=1) & (la == lb)
  diff = ta != tb
  first = np.where(diff.any(axis=1), diff.argmax(axis=1), ta.shape[1])
  return {"equal_rows": int(equal.sum()), "rows": int(len(equal)), "equal_fraction": float(equal.mean()),
          "mean_common_prefix": float(first.mean()), "first_divergence": first.tolist()}


def row_text(tokenizer: Any, res: dict[str, Any], row: int) -> str:
  """A `run_decoder` result's row `row` as text (`Tokenizer.generated_text`)."""
  return tokenizer.generated_text(res["_tokens"][row, :res["_lengths"][row]].tolist())


def strip_private(d: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in d.items() if not k.startswith("_")}



def prompt_set(name: str, encoded: list[list[int]], sources: list[str]) -> PromptSet:
  """A PromptSet from token lists (right-padded with 0)."""
  if not encoded or any(not ids for ids in encoded):
    raise ValueError(f"prompt set {name!r}: every prompt needs at least one token")
  tokens = np.zeros((len(encoded), max(len(ids) for ids in encoded)), np.int32)
  for i, ids in enumerate(encoded):
    tokens[i, :len(ids)] = ids
  return PromptSet(name, tokens, np.array([len(ids) for ids in encoded], np.int32), sources)


def humaneval_prompts(tokenizer: Any, problems: Sequence[dict[str, Any]]) -> PromptSet:
  """HumanEval problems' prompts as the model sees them (`humaneval.prompt_text`), named by task id."""
  return prompt_set("humaneval", [tokenizer.encode(humaneval.prompt_text(p)) for p in problems],
                    [p["task_id"] for p in problems])
