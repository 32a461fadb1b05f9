"""Byte-level BPE tokenizer (HF `tokenizers`) with the three special tokens TiDAR needs.

`<|endoftext|>` separates packed documents, `<|pad|>` fills nothing in training (packing wastes
no tokens) but lets decoders pad prompts, and `<|mask|>` is the diffusion mask token M that the
train step writes into the doubled half of each sequence. Text is always tokenized as plain bytes,
even where a document happens to contain a special token's spelling, so only the pipeline and the
model ever produce special ids.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
PAD = "<|pad|>"
MASK = "<|mask|>"
SPECIAL_TOKENS = (EOS, PAD, MASK)
NUM_BYTES = 256
MIN_VOCAB_SIZE = NUM_BYTES + len(SPECIAL_TOKENS)  # byte-level BPE needs every byte plus the specials
TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
  """An immutable tokenizer: build with `from_backend`, `load` or `train_bpe`, never mutate.

  `backend` is a private copy configured once (no padding, no truncation, no BOS/EOS post-processing,
  special tokens present and encoded as text when spelled out), so every encode is a lossless,
  unbounded token stream that the packing pipeline can concatenate.
  """

  backend: tokenizers.Tokenizer
  eos_id: int
  pad_id: int
  mask_id: int
  vocab_size: int  # embedding rows needed: largest id + 1, special tokens included

  @classmethod
  def from_backend(cls, backend: tokenizers.Tokenizer) -> Tokenizer:
    """Copies and configures `backend`, adding any missing special token at the end of the vocab."""
    return cls.from_json(backend.to_str())

  @classmethod
  def from_json(cls, serialized: str) -> Tokenizer:
    """Builds from a `tokenizer.json` string (also the pickle format: workers rebuild the same config)."""
    backend = tokenizers.Tokenizer.from_str(serialized)
    missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])
    backend.no_padding()
    backend.no_truncation()
    backend.encode_special_tokens = True  # a document spelling "<|mask|>" must not inject the mask id
    vocab = backend.get_vocab(with_added_tokens=True)
    return cls(backend=backend, eos_id=vocab[EOS], pad_id=vocab[PAD], mask_id=vocab[MASK],
               vocab_size=max(vocab.values()) + 1)

  def __reduce__(self):
    # The HF pickle drops runtime flags such as encode_special_tokens; rebuilding from JSON keeps them.
    return (Tokenizer.from_json, (self.backend.to_str(),))

  def encode(self, text: str) -> list[int]:
    return self.backend.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

  def special_ids(self) -> tuple[int, ...]:
    """Ids of every special token, sorted: ours (EOS, pad, mask) and the backend's own (e.g. a chat
    model's `<|im_start|>`, `<|im_end|>`). `generate` and `evaluate` end a row at the first of them:
    text never holds one, and a chat-tuned model ends its turn with `<|im_end|>`, not EOS."""
    return tuple(sorted(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special))

  def decode(self, ids: Iterable[int]) -> str:
    """Inverse of `encode`; special ids decode to their spelling so nothing is silently dropped."""
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

  def generated_text(self, ids: Sequence[int]) -> str:
    """A generated row's text: `ids` decoded up to the first special token (where the decoders stop
    when asked to stop at `special_ids()`), which is not part of the text."""
    special = set(self.special_ids())
    return self.decode(ids[:next((i for i, t in enumerate(ids) if t in special), len(ids))])

  def save(self, directory: str | os.PathLike[str]) -> pathlib.Path:
    """Writes `<directory>/tokenizer.json` atomically (concurrent processes may save the same file)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TOKENIZER_FILE
    tmp = directory / f".{TOKENIZER_FILE}.{os.getpid()}.tmp"
    tmp.write_text(self.backend.to_str(), encoding="utf-8")
    os.replace(tmp, path)
    return path

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
    """Loads a `tokenizer.json` file or an HF tokenizer directory that contains one."""
    path = pathlib.Path(path).expanduser()
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
      raise FileNotFoundError(f"tokenizer not found at {str(path)!r}: pass a tokenizer.json file or an HF "
                              f"tokenizer directory containing {TOKENIZER_FILE} (data.tokenizer)")
    return cls.from_json(file.read_text(encoding="utf-8"))


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
  """Trains a byte-level BPE (GPT-2 style split) whose vocab, specials included, is <= `vocab_size`.

  Byte-level pre-tokenization maps every byte to a symbol of the initial alphabet, so any text,
  including invalid-looking code or unusual unicode, round-trips exactly through encode/decode.
  """
  if vocab_size < MIN_VOCAB_SIZE:
    raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs {NUM_BYTES} byte tokens "
                     f"+ {len(SPECIAL_TOKENS)} special tokens; use vocab_size >= {MIN_VOCAB_SIZE}")
  backend = tokenizers.Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(SPECIAL_TOKENS),  # ids 0, 1, 2
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  backend.train_from_iterator(texts, trainer)
  return Tokenizer.from_backend(backend)
