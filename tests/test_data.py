"""Corpus builders, tokenizer caching and the grain pipeline, on small corpora written under tmp_path."""

import json
import os
import pathlib

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import tiny
from tidar_jax import tokenizer as tokenizer_lib
from tidar_jax.data import builders, pipeline

SEQ_LEN = 16
NUM_TEXT_FILES = 30
JSONL_LINES = 6


def write_corpus(root: pathlib.Path) -> set[str]:
  """Writes text/md/py/jsonl documents plus files that must be ignored; returns the expected doc keys."""
  rng = np.random.default_rng(0)
  keys = set()
  for i in range(NUM_TEXT_FILES):
    suffix = (".txt", ".md", ".py")[i % 3]
    rel = f"sub{i % 2}/doc{i:02d}{suffix}"
    words = " ".join(f"w{j}" for j in rng.integers(0, 40, rng.integers(3, 40)))
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(f"document {i}: {words}\n")
    keys.add(rel)
  lines = [json.dumps({"text": f"json line {i} <|endoftext|> inside"}) for i in range(JSONL_LINES)]
  (root / "lines.jsonl").write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n")  # a blank line is skipped
  keys |= {f"lines.jsonl#{n}" for n in (1, 2, 3, 5, 6, 7)}
  (root / "empty.txt").write_text("")
  (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not utf-8: skipped
  (root / "table.csv").write_text("not,a,text,suffix\n")
  return keys


def data_cfg(tmp_path: pathlib.Path, source: pathlib.Path, validation_fraction: float = 0.2):
  cfg = tiny.get_config().data
  cfg.dataset, cfg.source, cfg.data_dir = "text_files", str(source), str(tmp_path / "tfds")
  cfg.validation_fraction = validation_fraction
  return cfg


def paths(source: builders.TextSource) -> list[str]:
  return [source.records[i]["path"].decode() for i in range(len(source))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  keys = write_corpus(root)
  cfg = data_cfg(tmp_path_factory.mktemp("cache"), root)
  return keys, cfg, builders.prepare(cfg)


@pytest.fixture(scope="module")
def tok(corpus):
  _, _, prepared = corpus
  return tokenizer_lib.train_bpe((prepared.train[i]["text"] for i in range(len(prepared.train))), vocab_size=400)


# ---------------------------------------------------------------------------------------------- builders


def test_text_files_split_is_disjoint_and_complete(corpus):
  keys, _, prepared = corpus
  train, validation = paths(prepared.train), paths(prepared.validation)
  assert train and validation
  assert not set(train) & set(validation)
  assert set(train) | set(validation) == keys
  assert train == sorted(train)  # prepared in sorted-path order, not tfds' key-hash shuffle
  held_out = [k for k in keys if builders.split_fraction(k) < 0.2]
  assert sorted(validation) == sorted(held_out)


def test_text_is_the_file_content(corpus):
  _, cfg, prepared = corpus
  for i, rel in enumerate(paths(prepared.train)):
    if "#" not in rel:
      assert prepared.train[i]["text"] == (pathlib.Path(cfg.source) / rel).read_text()


def test_adding_files_keeps_existing_documents_in_their_split(tmp_path):
  root = tmp_path / "c"
  root.mkdir()
  write_corpus(root)
  before = builders.prepare(data_cfg(tmp_path, root))
  (root / "new.txt").write_text("a new document")
  after = builders.prepare(data_cfg(tmp_path, root))
  assert after.prepared_dir != before.prepared_dir  # changed files: a fresh cache entry, no stale reuse
  assert set(paths(before.validation)) <= set(paths(after.validation))
  assert set(paths(before.train)) <= set(paths(after.train))


def test_tiny_corpus_still_holds_out_one_document(tmp_path):
  root = tmp_path / "c"
  root.mkdir()
  for i in range(3):
    (root / f"{i}.txt").write_text(f"doc {i}")
  train, validation = builders.load_splits(data_cfg(tmp_path, root, validation_fraction=0.02))
  assert (len(train), len(validation)) == (2, 1)


def test_local_code_is_the_stdlib(tmp_path):
  cfg = tiny.get_config().data
  cfg.data_dir = str(tmp_path / "tfds")
  train, validation = builders.load_splits(cfg)
  train_paths, val_paths = set(paths(train)), set(paths(validation))
  assert not train_paths & val_paths
  assert {"os.py", "json/__init__.py"} <= train_paths | val_paths
  assert all(p.endswith(".py") and "site-packages" not in p for p in train_paths | val_paths)
  assert 0.005 < len(validation) / (len(train) + len(validation)) < 0.05


def test_local_code_roots_key_site_packages_files_by_root_not_machine_path(tmp_path):
  stdlib, site = tmp_path / "lib", tmp_path / "venv" / "site-packages"
  for path in (stdlib / "os.py", stdlib / "json" / "__init__.py", site / "pkg" / "mod.py", site / "pkg" / "data.txt"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x = 1\n")
  files = builders.local_code_files(os.pathsep.join([f"stdlib={stdlib}", f"site-packages={site}"]))
  assert [key for key, _ in files] == ["json/__init__.py", "os.py", "site-packages/pkg/mod.py"]
  assert builders.parse_local_code_roots("site-packages, stdlib") == ("stdlib", "site-packages")


class TidarToyText(tfds.core.GeneratorBasedBuilder):
  """A registered tfds dataset with a non-default text feature and train/test splits."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"content": tfds.features.Text(), "label": tfds.features.Scalar(np.int64)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(8), "test": self._generate_examples(2)}

  def _generate_examples(self, n):
    for i in range(n):
      yield f"{n}-{i}", {"content": f"split of {n}, example {i}", "label": i}


def test_registered_tfds_dataset_with_feature_key(tmp_path):
  cfg = tiny.get_config().data
  cfg.dataset, cfg.feature_key, cfg.data_dir = "tidar_toy_text", "content", str(tmp_path / "tfds")
  train, validation = builders.load_splits(cfg)
  assert (len(train), len(validation)) == (8, 2)
  assert sorted(validation[i]["text"] for i in range(2)) == ["split of 2, example 0", "split of 2, example 1"]


@pytest.mark.parametrize("change,error,match", [
    (dict(source="{tmp}/missing"), FileNotFoundError, r"data.source='.*/missing': no such directory"),
    (dict(source="{tmp}/only_csv"), ValueError, r"data.source='.*/only_csv': the corpus is empty"),
    (dict(source="{tmp}/only_csv/*.txt"), ValueError, r"data.source=.*: the corpus is empty"),
    (dict(source=""), ValueError, r"data.source is empty: data.dataset='text_files' needs"),
    (dict(source="{tmp}/one_doc"), ValueError, r"found 1 non-empty utf-8 document\(s\); need at least 2"),
    (dict(validation_fraction=1.0), ValueError, r"data.validation_fraction=1.0: must lie in \(0, 1\)"),
    (dict(dataset="no_such_dataset"), ValueError, r"data.dataset='no_such_dataset': unknown dataset"),
    (dict(dataset="tidar_toy_text", feature_key="body"), ValueError,
     r"data.feature_key='body' is not a feature of tidar_toy_text: use one of \['content', 'label'\]"),
])
def test_bad_data_config_names_the_field(tmp_path, change, error, match):
  (tmp_path / "only_csv").mkdir()
  (tmp_path / "only_csv" / "a.csv").write_text("x")
  (tmp_path / "one_doc").mkdir()
  (tmp_path / "one_doc" / "a.txt").write_text("just one")
  cfg = data_cfg(tmp_path, tmp_path / "one_doc")
  for key, value in change.items():
    cfg[key] = value.format(tmp=tmp_path) if isinstance(value, str) else value
  with pytest.raises(error, match=match):
    builders.load_splits(cfg)


# --------------------------------------------------------------------------------------------- tokenizer


def test_get_tokenizer_trains_once_then_reuses_the_cache(tmp_path, monkeypatch):
  root = tmp_path / "c"
  root.mkdir()
  write_corpus(root)
  config = tiny.get_config()
  config.data = data_cfg(tmp_path, root)
  config.model.vocab_size = 320
  first = builders.get_tokenizer(config)
  assert first.vocab_size <= 320
  cached = list(builders.prepare(config.data).prepared_dir.glob("tokenizer-bpe320-text/tokenizer.json"))
  assert len(cached) == 1

  def no_training(*args, **kwargs):
    raise AssertionError("the cached tokenizer should have been reused")

  monkeypatch.setattr(tokenizer_lib, "train_bpe", no_training)
  second = builders.get_tokenizer(config)
  assert second.encode("document 3: w1 w2") == first.encode("document 3: w1 w2")


def test_get_tokenizer_loads_a_given_tokenizer(tmp_path, tok):
  config = tiny.get_config()
  config.data.tokenizer = str(tok.save(tmp_path / "given"))
  config.model.vocab_size = tok.vocab_size
  assert builders.get_tokenizer(config).encode("w1 w2") == tok.encode("w1 w2")
  config.model.vocab_size = tok.vocab_size - 1
  with pytest.raises(ValueError, match=rf"model.vocab_size={tok.vocab_size - 1} is smaller than the tokenizer's "
                                       rf"vocab \({tok.vocab_size} ids .*set model.vocab_size={tok.vocab_size}"):
    builders.get_tokenizer(config)


def test_get_tokenizer_vocab_too_small_for_bpe():
  config = tiny.get_config()
  config.model.vocab_size = 100
  with pytest.raises(ValueError, match=r"model.vocab_size=100 is too small .* set model.vocab_size >= 259"):
    builders.get_tokenizer(config)


# ---------------------------------------------------------------------------------------------- pipeline


def take(iterator, n: int) -> np.ndarray:
  return np.stack([next(iterator)["tokens"] for _ in range(n)])  # [n, batch, seq_len]


def documents(stream: np.ndarray, eos_id: int) -> list[tuple[int, ...]]:
  """Complete EOS-terminated documents of a flat token stream (the trailing partial one is dropped)."""
  ends = np.flatnonzero(stream == eos_id)
  starts = np.concatenate([[0], ends[:-1] + 1])
  return [tuple(stream[s:e]) for s, e in zip(starts, ends)]


def train_docs(prepared, tok) -> list[tuple[int, ...]]:
  return [tuple(tok.encode(prepared.train[i]["text"])) for i in range(len(prepared.train))]


def test_packing_fills_every_window_with_whole_shuffled_epochs(corpus, tok):
  _, _, prepared = corpus
  batches = take(pipeline.make_train_iterator(prepared.train, tok, seq_len=SEQ_LEN, global_batch_size=4, seed=7),
                 60)
  assert batches.shape == (60, 4, SEQ_LEN) and batches.dtype == np.int32
  assert not np.isin(batches, [tok.pad_id, tok.mask_id]).any()  # no padding, no mask ids in clean data
  stream = batches.reshape(-1)  # windows back to back = the packed token stream
  docs, expected = documents(stream, tok.eos_id), train_docs(prepared, tok)
  n = len(expected)
  assert len(docs) > 2 * n, "the test should cover two epochs"
  # Windows concatenate to docs+EOS: the first epoch is a permutation of the train split, and so is the second.
  assert sorted(docs[:n]) == sorted(expected) and sorted(docs[n:2 * n]) == sorted(expected)
  assert docs[:n] != expected and docs[:n] != docs[n:2 * n]  # shuffled, and reshuffled each epoch


@pytest.mark.parametrize("other_seed,same", [(7, True), (8, False)])
def test_order_depends_only_on_the_seed(corpus, tok, other_seed, same):
  _, _, prepared = corpus

  def first_batches(seed):
    return take(pipeline.make_train_iterator(prepared.train, tok, seq_len=SEQ_LEN, global_batch_size=2, seed=seed), 5)

  assert np.array_equal(first_batches(7), first_batches(other_seed)) == same


def test_two_processes_split_the_one_process_document_stream(corpus, tok):
  _, _, prepared = corpus
  kwargs = dict(seq_len=SEQ_LEN, global_batch_size=4, seed=3)
  single = documents(take(pipeline.make_train_iterator(prepared.train, tok, **kwargs), 40).reshape(-1), tok.eos_id)
  per_process = []
  for index in range(2):
    it = pipeline.make_train_iterator(prepared.train, tok, process_index=index, process_count=2, **kwargs)
    batches = take(it, 40)
    assert batches.shape == (40, 2, SEQ_LEN)  # each process holds half the global batch
    per_process.append(documents(batches.reshape(-1), tok.eos_id))
  n = len(prepared.train)
  # Process p reads documents p, p+2, ... of the single-process stream: disjoint, and together one epoch.
  for index, docs in enumerate(per_process):
    assert docs[: n // 2] == single[index::2][: n // 2]
  first_epoch = single[:n]
  assert sorted(per_process[0][: (n + 1) // 2] + per_process[1][: n // 2]) == sorted(first_epoch)


def test_batch_must_split_over_processes(corpus, tok):
  _, _, prepared = corpus
  with pytest.raises(ValueError, match=r"train.batch_size=3 is not divisible by the 2 processes"):
    pipeline.make_train_iterator(prepared.train, tok, seq_len=SEQ_LEN, global_batch_size=3, seed=0, process_count=2)


def test_restored_state_continues_identically(corpus, tok):
  _, _, prepared = corpus
  original = pipeline.make_train_iterator(prepared.train, tok, seq_len=SEQ_LEN, global_batch_size=2, seed=3)
  states, batches = [], []
  for _ in range(16):  # every phase of the packer's buffer, states passed through JSON as orbax does
    states.append(json.loads(json.dumps(original.get_state())))
    batches.append(next(original)["tokens"])
  resumed = pipeline.make_train_iterator(prepared.train, tok, seq_len=SEQ_LEN, global_batch_size=2, seed=3)
  for k in range(12):
    resumed.set_state(states[k])
    np.testing.assert_array_equal(take(resumed, 4), np.stack(batches[k:k + 4]), err_msg=f"restored after {k} batches")


def test_window_shuffle_permutes_windows_within_groups_and_resumes_exactly(corpus, tok):
  _, _, prepared = corpus
  group = 6  # windows per shuffled group; batch 2 -> a group spans 3 batches

  def iterator(shuffle: int):
    return pipeline.make_train_iterator(prepared.train, tok, seq_len=SEQ_LEN, global_batch_size=2, seed=5,
                                        window_shuffle=shuffle)

  plain = take(iterator(1), 12).reshape(24, SEQ_LEN)
  shuffled = take(iterator(group), 12).reshape(24, SEQ_LEN)
  for g in range(0, len(plain), group):  # same windows, each group in its own order
    got, want = shuffled[g:g + group], plain[g:g + group]
    assert sorted(map(tuple, got)) == sorted(map(tuple, want)), f"group {g // group}"
  assert not np.array_equal(shuffled, plain)
  # Restore from every phase of a group, states through JSON as orbax stores them.
  it = iterator(group)
  states, batches = [], []
  for _ in range(8):
    states.append(json.loads(json.dumps(it.get_state())))
    batches.append(next(it)["tokens"])
  for k in range(5):
    resumed = iterator(group)
    resumed.set_state(states[k])
    np.testing.assert_array_equal(take(resumed, 3), np.stack(batches[k:k + 3]), err_msg=f"restored after {k}")


def test_orbax_checkpoint_of_the_iterator(corpus, tok, tmp_path):
  _, _, prepared = corpus

  def fresh():
    return pipeline.make_train_iterator(prepared.train, tok, seq_len=SEQ_LEN, global_batch_size=2, seed=11)

  it = fresh()
  take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = take(it, 6)
    resumed = fresh()
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  np.testing.assert_array_equal(take(resumed, 6), expected)


def test_eval_batches_are_deterministic_full_and_in_corpus_order(corpus, tok):
  _, _, prepared = corpus
  kwargs = dict(seq_len=8, batch_size=2, num_batches=3)
  first = pipeline.make_eval_batches(prepared.validation, tok, **kwargs)
  second = pipeline.make_eval_batches(prepared.validation, tok, **kwargs)
  assert len(first) == 3
  for a, b in zip(first, second):
    assert a["tokens"].shape == (2, 8) and a["tokens"].dtype == np.int32
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  stream = np.stack([b["tokens"] for b in first]).reshape(-1)
  expected = np.concatenate([tok.encode(prepared.validation[i]["text"]) + [tok.eos_id]
                             for i in range(len(prepared.validation))])
  np.testing.assert_array_equal(stream, expected[:stream.size])  # unshuffled, packed without gaps


def test_eval_batches_split_rows_over_processes(corpus, tok):
  _, _, prepared = corpus
  kwargs = dict(seq_len=8, batch_size=4, num_batches=2)
  full = pipeline.make_eval_batches(prepared.validation, tok, **kwargs)
  parts = [pipeline.make_eval_batches(prepared.validation, tok, process_index=i, process_count=2, **kwargs)
           for i in range(2)]
  for step, batch in enumerate(full):
    np.testing.assert_array_equal(np.concatenate([p[step]["tokens"] for p in parts]), batch["tokens"])


def test_eval_batches_need_one_full_batch(corpus, tok):
  _, _, prepared = corpus
  with pytest.raises(ValueError, match=r"validation split holds fewer than 64 windows of 256 tokens"):
    pipeline.make_eval_batches(prepared.validation, tok, seq_len=256, batch_size=64, num_batches=1)


def test_a_split_short_of_one_batch_gives_one_batch_of_the_row_multiple(corpus, tok):
  """The trainer passes row_multiple = devices x micro-batch: a split with fewer windows than one
  batch evaluates its first windows, as many as that multiple allows, split over the processes."""
  _, _, prepared = corpus
  stream = np.concatenate([tok.encode(prepared.validation[i]["text"]) + [tok.eos_id]
                           for i in range(len(prepared.validation))])
  windows = len(stream) // 64  # [windows, 64]: fewer than the batch of 512 asked for
  assert 6 <= windows < 512
  kwargs = dict(seq_len=64, batch_size=512, num_batches=4, row_multiple=3)
  (batch,) = pipeline.make_eval_batches(prepared.validation, tok, **kwargs)
  rows = windows // 3 * 3
  np.testing.assert_array_equal(batch["tokens"], stream[:rows * 64].reshape(rows, 64))
  parts = [pipeline.make_eval_batches(prepared.validation, tok, process_index=i, process_count=2, **kwargs)[0]
           for i in range(2)]
  rows2 = windows // 6 * 6  # two processes: a multiple of lcm(3, 2), each process half of it
  assert [len(p["tokens"]) for p in parts] == [rows2 // 2] * 2
  np.testing.assert_array_equal(np.concatenate([p["tokens"] for p in parts]), batch["tokens"][:rows2])
  with pytest.raises(ValueError, match=rf"holds fewer than {windows + 1} windows of 64 tokens"):
    pipeline.make_eval_batches(prepared.validation, tok, **{**kwargs, "row_multiple": windows + 1})


def test_to_global_array_shards_the_batch():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  local = np.arange(len(jax.devices()) * 2 * SEQ_LEN, dtype=np.int32).reshape(-1, SEQ_LEN)  # [batch, seq_len]
  array = pipeline.to_global_array(local, sharding)
  assert array.shape == local.shape and array.sharding == sharding
  assert len({s.device for s in array.addressable_shards}) == len(jax.devices())
  np.testing.assert_array_equal(np.asarray(array), local)
