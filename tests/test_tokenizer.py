"""Byte-level BPE: lossless round trips, special-token ids, save/load, and loading foreign tokenizers."""

import pickle

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from configs import tiny
from tidar_jax import tokenizer as tokenizer_lib
from tidar_jax.data import builders

TRICKY = [
    "def f(x):\n\treturn x  # tab, two spaces\n",
    "unicode: héllo wörld ✓ 日本語 🙂\r\n",
    "   leading and trailing spaces   ",
    "literal specials: <|endoftext|> <|pad|> <|mask|>",
    "",
    "\x00\x7f control bytes",
]


@pytest.fixture(scope="module")
def tok() -> tokenizer_lib.Tokenizer:
  texts = ["the quick brown fox jumps over the lazy dog\n" * 3, "def main():\n    print('hi')\n"] * 5
  return tokenizer_lib.train_bpe(texts, vocab_size=300)


def test_special_ids_are_distinct_and_inside_vocab(tok):
  assert len({tok.eos_id, tok.pad_id, tok.mask_id}) == 3
  assert max(tok.eos_id, tok.pad_id, tok.mask_id) < tok.vocab_size <= 300


def test_special_ids_include_the_backends_own(tok):
  """Ours, plus a chat model's turn markers (SmolLM2-Instruct's <|im_end|>); plain tokens are not."""
  assert tok.special_ids() == tuple(sorted({tok.eos_id, tok.pad_id, tok.mask_id}))
  backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
  backend.add_special_tokens(["<|im_end|>"])
  backend.add_tokens(["not_special"])
  chat = tokenizer_lib.Tokenizer.from_backend(backend)
  vocab = chat.backend.get_vocab(with_added_tokens=True)
  assert chat.special_ids() == tuple(sorted({chat.eos_id, chat.pad_id, chat.mask_id, vocab["<|im_end|>"]}))


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_lossless(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_spelled_out_specials_are_plain_text(tok):
  # A document that quotes "<|mask|>" must not inject the diffusion mask id (or a fake EOS).
  ids = tok.encode("a <|mask|> b <|endoftext|>")
  assert not {tok.mask_id, tok.eos_id, tok.pad_id} & set(ids)
  assert tok.decode([tok.eos_id]) == tokenizer_lib.EOS


def test_encode_batch_matches_encode(tok):
  assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]


def test_save_load_and_pickle_keep_behaviour(tok, tmp_path):
  path = tok.save(tmp_path / "tok")
  for loaded in (tokenizer_lib.Tokenizer.load(path), tokenizer_lib.Tokenizer.load(tmp_path / "tok"),
                 pickle.loads(pickle.dumps(tok))):
    assert (loaded.vocab_size, loaded.eos_id, loaded.pad_id, loaded.mask_id) == (
        tok.vocab_size, tok.eos_id, tok.pad_id, tok.mask_id)
    assert [loaded.encode(t) for t in TRICKY] == [tok.encode(t) for t in TRICKY]


def test_load_adds_missing_special_tokens(tmp_path):
  # A foreign tokenizer without our specials gets them appended after its own vocab.
  vocab = {"<unk>": 0, "a": 1, "b": 2}
  foreign = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  foreign.pre_tokenizer = pre_tokenizers.Whitespace()
  foreign.save(str(tmp_path / "tokenizer.json"))
  tok = tokenizer_lib.Tokenizer.load(tmp_path)
  assert sorted([tok.eos_id, tok.pad_id, tok.mask_id]) == [3, 4, 5]
  assert tok.vocab_size == 6
  assert tok.encode("a b") == [1, 2]


def test_load_missing_path_names_the_field(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"tokenizer not found .*\(data.tokenizer\)"):
    tokenizer_lib.Tokenizer.load(tmp_path / "nope")


def test_vocab_too_small_for_bytes_and_specials():
  with pytest.raises(ValueError, match=r"vocab_size=258 is too small: .* use vocab_size >= 259"):
    tokenizer_lib.train_bpe(["abc"], vocab_size=258)


def test_round_trip_on_local_code_validation_split(tmp_path):
  """Every stdlib file held out for validation survives encode/decode exactly."""
  data_cfg = tiny.get_config().data  # local_code is the default dataset
  data_cfg.data_dir = str(tmp_path / "tfds")
  corpus = builders.prepare(data_cfg)
  subset = (corpus.train[i]["text"] for i in range(0, len(corpus.train), 40))  # a small sample keeps training fast
  tok = tokenizer_lib.train_bpe(subset, vocab_size=1024)
  assert len(corpus.validation) > 10
  for i in range(len(corpus.validation)):
    text = corpus.validation[i]["text"]
    assert tok.decode(tok.encode(text)) == text, corpus.validation.records[i]["path"]

