"""Pieces shared by the AR and TiDAR decoders: host-side request checks, prompt buckets, the
per-row key table, token emission (EOS and `max_new_tokens` truncation), freezing finished rows.

Emission convention (both decoders): the generated sequence of a row is every token it has
emitted; the newest one is `t_0` (docs/method.md §2), not yet in the cache, so a row's cache length is
always `prompt_length + generated - 1`. Rows stop at `max_new_tokens` or at an EOS (which is
emitted); tokens past the end are `PAD_TOKEN`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax import dispatch
from tidar_jax.config import ModelConfig
from tidar_jax.decode.cache import KVCache
from tidar_jax.decode.sampling import SamplingParams

PAD_TOKEN = -1  # fills `tokens` past each row's length (never a real id)
MIN_BUCKET = 16  # shortest compiled prompt width
class DecodeStats(NamedTuple):
  forward_passes: jax.Array  # [batch] int32: prefill + the steps while the row was active
  accepted_hist: jax.Array  # [batch, k] int32: steps that accepted a = 0..k-1 drafts (AR: k = 1)


class DecodeOutput(NamedTuple):
  tokens: jax.Array  # [batch, max_new_tokens] int32, PAD_TOKEN after each row's length
  lengths: jax.Array  # [batch] int32: generated tokens per row (an EOS counts and ends the row)
  stats: DecodeStats
  cache: KVCache  # final cache; slots < prompt_length + length - 1 hold the committed tokens


@dataclasses.dataclass(frozen=True)
class Request:
  """A checked batch on the host, prompts padded to their compiled width."""

  prompts: np.ndarray  # [batch, bucket] int32, right-padded with 0
  lengths: np.ndarray  # [batch] int32
  keys: jax.Array  # [batch] typed PRNG keys, one per row
  max_len: int  # cache slots: `dispatch.cache_slots` of the requested max_len


def bucket_length(longest: int, limit: int) -> int:
  """Compiled prompt width: the next power of two (at least MIN_BUCKET), so prompts of similar
  lengths share one compilation; never more than `limit`, the longest prompt the cache admits."""
  return min(max(MIN_BUCKET, 1 << max(longest - 1, 0).bit_length()), limit)


def step_tokens(block_size: int) -> int:
  """Tokens one decode step feeds, and writes into the cache past the row's length: T = k + k²
  for TiDAR (the verification tokens and the k mask blocks), 1 for AR (block_size 0)."""
  return 1 if block_size == 0 else block_size + block_size * block_size


def resolve_config(config: Any) -> tuple[ModelConfig, Any]:
  """(static model config, the checkpoint's `tidar` section or None) from a ModelConfig or a full
  ConfigDict (as `tidar_jax.checkpoint.load_for_inference` returns)."""
  if isinstance(config, ModelConfig):
    return config, None
  model = config.model
  cfg = ModelConfig.from_config(model.to_dict() if hasattr(model, "to_dict") else dict(model))
  return cfg, config.get("tidar") if hasattr(config, "get") else None


def check_request(cfg: ModelConfig, prompts: Any, prompt_lengths: Any, *, max_new_tokens: int,
                  sampling: SamplingParams, key: jax.Array, max_len: int | None, lookahead: int,
                  token_ids: dict[str, int | Sequence[int] | None]) -> Request:
  """Validates a decode request before anything is compiled; raises ValueError naming the argument.

  `lookahead` is how many slots past the last generated token a step may write, `step_tokens(k)`
  (TiDAR: all k + k² step tokens, whose slots past the accepted ones are overwritten next step;
  AR: 1), so a row needs prompt_length + max_new_tokens + lookahead <= max_len. `token_ids` are the
  special ids (eos_id, mask_id) to range-check against the vocabulary.
  """
  prompts = np.asarray(prompts)
  lengths = np.asarray(prompt_lengths)
  if prompts.ndim != 2 or prompts.shape[0] < 1:
    raise ValueError(f"prompts must be a [batch, prompt_len] int array with batch >= 1, got shape "
                     f"{prompts.shape}; wrap a single prompt as prompts=[[...]]")
  if not np.issubdtype(prompts.dtype, np.integer):
    raise ValueError(f"prompts must hold integer token ids, got dtype {prompts.dtype}")
  batch = prompts.shape[0]
  if lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer):
    raise ValueError(f"prompt_lengths must be [batch]={batch} ints (tokens per row before the "
                     f"right padding), got {lengths.dtype} {lengths.shape}")
  empty = np.flatnonzero(lengths < 1)
  if empty.size:
    raise ValueError(f"prompt_lengths: prompt(s) {empty.tolist()} are empty; every prompt needs at "
                     f"least one token (e.g. start it with the EOS/BOS id)")
  if np.any(lengths > prompts.shape[1]):
    raise ValueError(f"prompt_lengths {lengths.tolist()} exceed the prompts' width {prompts.shape[1]}")
  real = np.arange(prompts.shape[1])[None, :] < lengths[:, None]  # [batch, width]
  bad = real & ((prompts < 0) | (prompts >= cfg.vocab_size))
  if bad.any():
    row, col = np.argwhere(bad)[0]
    raise ValueError(f"prompts[{row}, {col}]={prompts[row, col]} is not a token id of this model "
                     f"(vocab_size={cfg.vocab_size}); was the prompt encoded with another tokenizer?")
  for name, value in token_ids.items():
    for v in () if value is None else np.atleast_1d(value).tolist():
      if not 0 <= v < cfg.vocab_size:
        raise ValueError(f"{name}={value} lies outside the vocabulary [0, {cfg.vocab_size})")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
  if not isinstance(sampling, SamplingParams):
    raise ValueError(f"sampling must be a tidar_jax.decode.sampling.SamplingParams, got {type(sampling)}")
  sampling.validate()
  longest = int(lengths.max())
  needed = longest + int(max_new_tokens) + lookahead
  if max_len is None:
    max_len = bucket_length(longest, 1 << 62) + int(max_new_tokens) + lookahead
  elif needed > max_len:
    raise ValueError(f"max_len={max_len} is too small: the longest prompt ({longest} tokens) + "
                     f"max_new_tokens ({max_new_tokens}) + {lookahead} slots that one decode step writes "
                     f"(TiDAR: k + k², AR: 1) need {needed}; "
                     f"raise max_len to >= {needed}, or shorten the prompt / max_new_tokens")
  bucket = bucket_length(longest, max_len - int(max_new_tokens) - lookahead)
  width = min(prompts.shape[1], bucket)
  padded = np.zeros((batch, bucket), np.int32)
  padded[:, :width] = np.where(real, prompts, 0)[:, :width]
  return Request(padded, lengths.astype(np.int32), row_keys(key, batch), dispatch.cache_slots(int(max_len)))


def row_keys(key: Any, batch: int) -> jax.Array:
  """[batch] typed keys: a single key is split per row; a [batch] array of keys is used as given
  (row i then decodes exactly as it would alone with key i)."""
  key = jnp.asarray(key)
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key.astype(jnp.uint32))  # raw uint32 keys (jax.random.PRNGKey)
  if key.shape == ():
    return jax.random.split(key, batch)
  if key.shape != (batch,):
    raise ValueError(f"key must be one PRNG key or one per row ([batch]={batch}), got shape {key.shape}")
  return key


def key_table(keys: jax.Array, steps: int, uses: int) -> jax.Array:
  """keys [batch] -> [batch, steps, uses] keys, derived once before the loop: entry (row, step, use) is
  fold_in(key_row, step * uses + use), so it depends on nothing but the row's key (batch
  invariance) and the loop body holds no key-derivation hashing. Step 0 is the prefill."""
  index = jnp.arange(steps * uses, dtype=jnp.uint32)
  table = jax.vmap(lambda key: jax.vmap(lambda i: jax.random.fold_in(key, i))(index))(keys)
  return table.reshape(keys.shape[0], steps, uses)


def keys_at(table: jax.Array, step: jax.Array) -> jax.Array:
  """`key_table`'s [batch, steps, uses] -> [batch, uses]: the keys of one step."""
  return jax.lax.dynamic_index_in_dim(table, step, axis=1, keepdims=False)


def emit(out: jax.Array,  # [batch, max_new_tokens + C] int32
         generated: jax.Array,  # [batch] tokens the row emitted so far
         cand: jax.Array,  # [batch, C] candidates
         count: jax.Array,  # [batch] how many candidates the row emits
         eos_id: jax.Array, max_new_tokens: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Appends the first `count` candidates of each row, cut at `max_new_tokens` and after an EOS (any
  id of `eos_id` [n]).

  out: [batch, max_new_tokens + C] output buffer (PAD past each row's length; the C spare
  columns let every row write a full window without clamping). Returns the buffer, the number
  of tokens each row emitted now [batch], and whether the row hit EOS [batch].
  """
  C = cand.shape[1]
  j = jnp.arange(C)[None, :]  # [1, C]
  keep = (j < count[:, None]) & (j < (max_new_tokens - generated)[:, None])  # [batch, C]
  eos = keep & jnp.any(cand[..., None] == eos_id.reshape(1, 1, -1), axis=-1)  # [batch, C]
  first_eos = jnp.where(jnp.any(eos, axis=1), jnp.argmax(eos, axis=1), C)  # [batch]
  keep &= j <= first_eos[:, None]
  window = jnp.where(keep, cand, PAD_TOKEN)  # positions >= generated are PAD already

  def write_row(row, start, values):
    return jax.lax.dynamic_update_slice(row, values, (start,))

  out = jax.vmap(write_row)(out, generated, window)
  return out, jnp.sum(keep, axis=1).astype(jnp.int32), jnp.any(eos, axis=1)


def freeze_done(done: jax.Array, new: Any, old: Any) -> Any:
  """Per-row select over a pytree of [batch, ...] arrays: finished rows (done [batch] bool) keep `old`."""
  def pick(n, o):
    return jnp.where(done.reshape(done.shape + (1,) * (n.ndim - 1)), o, n)
  return jax.tree.map(pick, new, old)


def matmul_precision(cfg: ModelConfig) -> contextlib.AbstractContextManager:
  """The context a decode runs in: a float32 model's matmuls in true float32. JAX computes float32
  dots in TF32 on Ampere and later GPUs by default (a 10-bit mantissa, so a T-token step and a
  1-token step round differently), and greedy TiDAR then splits from greedy AR wherever the top two
  logits nearly tie: on an H100, 6 of SmolLM2's 164 HumanEval prompts over 192 tokens. float32 is the
  token-exact check, so it means float32; 16-bit dtypes keep their default. Part of the trace, so a
  decode compiled under one precision is never reused under another."""
  if jnp.dtype(cfg.compute_dtype) == jnp.float32:
    return jax.default_matmul_precision("highest")
  return contextlib.nullcontext()


def decode_jit(fn: Callable, *, static_argnames: tuple[str, ...]) -> Callable:
  """`jax.jit(fn)` for a whole decode (prefill + while loop), with `dispatch.GPU_COMPILER_OPTIONS` where
  `dispatch.use_gpu_compiler_options()` says so (decided per call: the backend is not known at import) and
  the call is not traced inside another jit (there the outer program's options apply)."""
  jits = {False: jax.jit(fn, static_argnames=static_argnames),
          True: jax.jit(fn, static_argnames=static_argnames, compiler_options=dispatch.GPU_COMPILER_OPTIONS)}

  @functools.wraps(fn)
  def call(*args, **kwargs):
    if dispatch.use_gpu_compiler_options():
      try:
        return jits[True](*args, **kwargs)
      except ValueError as e:  # jax takes compiler_options on a top-level jit only, not under an outer
        if "compiler_options" not in str(e):  # trace (jit, make_jaxpr): that raises while staging, before
          raise  # anything ran, and the decode is then staged into the outer program as a plain jit
    return jits[False](*args, **kwargs)

  return call


def eos_array(eos_id: int | Sequence[int] | None) -> jax.Array:
  """The ids that end a row as a traced [n] array (no recompile per id); [-1] (None) never matches."""
  return jnp.asarray([-1] if eos_id is None else np.atleast_1d(eos_id), jnp.int32).reshape(-1)
