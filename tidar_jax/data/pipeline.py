"""grain input pipeline: documents -> shuffled, tokenized, EOS-separated, packed `seq_len` windows -> batches.

Training order is a pure function of (source, seed, process layout): a seeded global shuffle that
reshuffles every epoch, then each process takes every `process_count`-th document of that one
stream, so processes see disjoint documents and together cover each epoch exactly once. Packing
uses grain's concat-then-split transform (no padding: every window is full), and the iterator
state is a few integers that orbax saves next to the model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import logging

from tidar_jax.tokenizer import Tokenizer

TOKENS = "tokens"
_SEGMENT_IDS = f"{TOKENS}_segment_ids"  # written by ConcatThenSplit: 0 marks padding of a final short window
PREFETCH_BATCHES = 2  # batches a single-process pipeline prepares ahead of the trainer


def tokenize_document(record: Mapping[str, str], tokenizer: Tokenizer) -> dict[str, np.ndarray]:
  """`{"text"}` -> `{"tokens": int32[doc_len + 1]}`: the trailing EOS separates documents once packed."""
  ids = tokenizer.encode(record["text"])
  ids.append(tokenizer.eos_id)
  return {TOKENS: np.asarray(ids, dtype=np.int32)}


def _tokens_only(window: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops packing's segment/position features: TiDAR attends across document boundaries (EOS marks them)."""
  return {TOKENS: window[TOKENS]}  # [seq_len]


def _is_full(window: Mapping[str, np.ndarray]) -> bool:
  return bool(window[_SEGMENT_IDS][-1] != 0)


def _packed(documents: grain.MapDataset, tokenizer: Tokenizer, seq_len: int) -> grain.IterDataset:
  """Tokenizes documents in order and concat-then-splits them into `seq_len` windows."""
  tokens = documents.map(functools.partial(tokenize_document, tokenizer=tokenizer))
  return grain.experimental.ConcatThenSplitIterDataset(
      tokens.to_iter_dataset(),  # grain's default read threads prefetch tokenized docs
      length_struct={TOKENS: seq_len},
      split_full_length_features=True,  # keep stream order exactly: windows = concatenation split every seq_len
  )


class _RestorableIterator(grain.DatasetIterator):
  """Passes batches through; `set_state` first turns JSON lists back into the tuples grain compares to.

  grain 0.2.18's ConcatThenSplit marks "no remainder" with the tuple (-1, -1) and tests it with `!=`;
  a state that went through orbax's JSON comes back as [-1, -1], and restoring it would replay a
  phantom remainder so the resumed stream differs from the saved one.
  """

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(_slices_as_tuples(state))


def _slices_as_tuples(state: Any) -> Any:
  """Copy of a (nested, e.g. per-worker) iterator state with every `remainder_slices` value a tuple."""
  if not isinstance(state, Mapping):
    return state
  return {key: ({feature: tuple(s) for feature, s in value.items()} if key == "remainder_slices"
                else _slices_as_tuples(value)) for key, value in state.items()}


def _check_source(source: Sequence[Any], what: str) -> None:
  if len(source) == 0:
    raise ValueError(f"the {what} split is empty: add documents to the corpus (data.source) or lower "
                     "data.validation_fraction")


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """Rows this process feeds: each host loads only its share of the global batch."""
  if global_batch_size % process_count:
    raise ValueError(f"train.batch_size={global_batch_size} is not divisible by the {process_count} processes: "
                     f"use a multiple of {process_count}")
  return global_batch_size // process_count


def make_train_iterator(source: Sequence[Mapping[str, str]], tokenizer: Tokenizer, *, seq_len: int,
                        global_batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
                        num_workers: int = 0, window_shuffle: int = 1) -> grain.DatasetIterator:
  """Endless iterator of `{"tokens": int32[local_batch, seq_len]}`; checkpoint it with `get_state()` or
  `grain.checkpoint.CheckpointSave`.

  `window_shuffle` > 1 shuffles packed windows within consecutive groups of that many (a fresh
  seeded permutation per group): consecutive windows come from the same few documents, so without
  it a batch holds a handful of files and its gradient is noisy. The group restarts from its first
  window on restore (re-tokenized), so resume stays exact.

  `process_index`/`process_count` default to this process alone; the trainer passes
  `jax.process_index()`/`jax.process_count()`. With `num_workers > 0` each worker packs its own slice
  of the document stream, so the batch order depends on `num_workers` (keep it fixed across resumes).
  """
  _check_source(source, "train")
  batch = local_batch_size(global_batch_size, process_count)
  documents = grain.MapDataset.source(source).shuffle(seed=seed).repeat()  # epoch e: permutation seeded seed+e
  documents = documents[process_index::process_count]  # [documents of this process, endless]
  windows = _packed(documents, tokenizer, seq_len).map(_tokens_only)
  if window_shuffle > 1:
    windows = grain.experimental.WindowShuffleIterDataset(windows, window_size=window_shuffle, seed=seed)
  batches = windows.batch(batch, drop_remainder=True)  # tokens: [local_batch, seq_len]
  if num_workers > 0:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  else:
    # Tokenizing and packing take host time (benchmarks/input_pipeline): in a background thread they
    # overlap the trainer's blocking calls (the metrics fetch every log_every steps, evaluation,
    # checkpointing) as well as the device's step. The iterator reports the state of the batches handed
    # out, not of those waiting in its buffer, so checkpoints resume exactly.
    batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=PREFETCH_BATCHES)
  return _RestorableIterator(iter(batches))


def make_eval_batches(source: Sequence[Mapping[str, str]], tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                      num_batches: int, process_index: int = 0, process_count: int = 1,
                      row_multiple: int = 0) -> list[dict[str, np.ndarray]]:
  """The first `num_batches` full batches of the validation stream in corpus order: identical every call.

  `batch_size` is global; each process gets its rows of every global batch. Fewer batches come back
  (with a warning) when the split is too short; the last, partial window is never used. A split
  shorter than one batch gives one smaller batch instead, of the most windows that are a multiple of
  `row_multiple` (the devices x micro-batch that split a batch; 0: refuse), with a warning.
  """
  _check_source(source, "validation")
  rows = local_batch_size(batch_size, process_count)
  windows = _packed(grain.MapDataset.source(source), tokenizer, seq_len).filter(_is_full).map(_tokens_only)
  batches = []
  multiple = math.lcm(row_multiple, process_count) if row_multiple else 0
  for batch in windows.batch(batch_size, drop_remainder=False):
    tokens = batch[TOKENS]  # [<= batch_size, seq_len]
    if len(tokens) < batch_size:  # the split's end
      if batches or not multiple or len(tokens) < multiple:
        break
      short = len(tokens) // multiple * multiple
      logging.warning("the validation split holds %d windows of %d tokens, fewer than one batch of %d: "
                      "evaluating one batch of %d", len(tokens), seq_len, batch_size, short)
      part = short // process_count
      return [{TOKENS: tokens[process_index * part:(process_index + 1) * part]}]
    batches.append({TOKENS: tokens[process_index * rows:(process_index + 1) * rows]})  # [rows, seq_len]
    if len(batches) == num_batches:
      break
  if not batches:
    raise ValueError(f"the validation split holds fewer than {multiple or batch_size} windows of {seq_len} tokens: "
                     "raise data.validation_fraction, lower train.seq_len, or set train.eval_batches=0 (no validation)")
  if len(batches) < num_batches:
    logging.warning("validation split yields %d of the %d requested eval batches", len(batches), num_batches)
  return batches


def to_global_array(local_batch: np.ndarray, sharding: jax.sharding.NamedSharding) -> jax.Array:
  """Assembles every process's `[local_batch, ...]` rows into one `[global_batch, ...]` sharded array."""
  return jax.make_array_from_process_local_data(sharding, local_batch)
