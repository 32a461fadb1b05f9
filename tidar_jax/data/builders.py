"""The corpus as tensorflow-datasets builders, prepared once to array_record and read without TensorFlow.

Three sources, chosen by `data.dataset`:
  * `local_code`: every `.py` file of the running interpreter's standard library, plus its
    installed packages with `data.local_code_roots="stdlib,site-packages"` (no network);
  * `text_files`: the user's `.txt`/`.md`/`.py`/`.jsonl` files under `data.source` (a dir or a glob);
  * any registered tfds dataset, read through `tfds.data_source` (`data.feature_key` picks the text).

Documents go to train or validation by a stable hash of their path (jsonl: path#line), so the split
never changes when files are added elsewhere, and train and validation never share a document.
Each prepared corpus lives in its own builder-config directory named by a digest of what it was
built from, so different sources (or edited files) never collide in the cache.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import hashlib
import json
import os
import pathlib
import sys
import sysconfig
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds
from absl import logging

from tidar_jax import tokenizer as tokenizer_lib
from tidar_jax.config import parse_local_code_roots

TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
BUILTIN_DATASETS = ("local_code", "text_files")
TOKENIZER_TRAIN_CHARS = 200_000_000  # cap on text fed to BPE training: enough for the merges, bounded time
_DIGEST_CHARS = 12


@dataclasses.dataclass(frozen=True)
class TextSource:
  """Random-access documents `{"text": str}` over a tfds data source (what grain's MapDataset reads).

  tfds returns text features as utf-8 bytes; decoding here keeps the pipeline free of tfds details.
  """

  records: Sequence[Mapping[str, Any]]  # a tfds ArrayRecordDataSource (picklable for grain workers)
  feature_key: str = "text"

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict[str, str]:
    value = self.records[index][self.feature_key]
    return {"text": value.decode("utf-8") if isinstance(value, bytes) else str(value)}


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Both splits of a prepared dataset and the directory that keys caches derived from it."""

  train: TextSource
  validation: TextSource
  prepared_dir: pathlib.Path  # tfds `builder.data_dir`: the trained tokenizer is cached beside the records


@dataclasses.dataclass
class CorpusConfig(tfds.core.BuilderConfig):
  """What a local corpus is built from; the config `name` is a digest of these plus the file stats."""

  source: str = ""  # local_code: "name=dir" roots joined by os.pathsep; text_files: the resolved directory/glob
  validation_fraction: float = 0.02


def split_fraction(key: str) -> float:
  """Stable pseudo-random number in [0, 1) for a document key (sha1: same on every machine and run)."""
  return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64


def validation_keys(keys: Sequence[str], validation_fraction: float) -> frozenset[str]:
  """Keys whose hash falls below the fraction; a tiny corpus still holds out its lowest-hash document."""
  held_out = frozenset(k for k in keys if split_fraction(k) < validation_fraction)
  return held_out or frozenset([min(keys, key=split_fraction)])


def stdlib_files(source: str) -> list[tuple[str, pathlib.Path]]:
  """(relative posix path, path) of every stdlib `.py` file, sorted; installed packages excluded."""
  root = pathlib.Path(source)
  files = []
  for path in root.rglob("*.py"):
    rel = path.relative_to(root)
    if not {"site-packages", "dist-packages"} & set(rel.parts) and path.is_file():
      files.append((rel.as_posix(), path))
  return sorted(files)


def site_packages_dirs() -> list[str]:
  """This interpreter's installed-package directories (purelib, platlib), deduplicated, existing."""
  paths = sysconfig.get_paths()
  dirs = []
  for key in ("purelib", "platlib"):
    d = os.path.realpath(paths[key])
    if os.path.isdir(d) and d not in dirs:
      dirs.append(d)
  return dirs


def site_packages_files(dirs: Sequence[str]) -> list[tuple[str, pathlib.Path]]:
  """("site-packages/<path relative to its dir>", path) of every installed `.py` file, sorted.

  The key starts with the root's name, never with the machine's absolute path, so a file's
  split (a hash of the key) is the same wherever the packages are installed.
  """
  files: dict[str, pathlib.Path] = {}
  for d in dirs:
    root = pathlib.Path(d)
    for path in root.rglob("*.py"):
      if path.is_file():
        files.setdefault("site-packages/" + path.relative_to(root).as_posix(), path)
  return sorted(files.items())


def local_code_roots(names: Sequence[str]) -> list[tuple[str, list[str]]]:
  """(root name, directories) for each named root of this interpreter."""
  roots = []
  for name in names:
    roots.append((name, [sysconfig.get_paths()["stdlib"]] if name == "stdlib" else site_packages_dirs()))
  return roots


def _encode_roots(roots: Sequence[tuple[str, Sequence[str]]]) -> str:
  return os.pathsep.join(f"{name}={d}" for name, dirs in roots for d in dirs)


def local_code_files(source: str) -> list[tuple[str, pathlib.Path]]:
  """The files of `name=dir` roots joined by os.pathsep (CorpusConfig.source of local_code), sorted.

  stdlib keys are relative to the stdlib (as they have always been: the default corpus, its split
  and its cached tokenizer are unchanged); site-packages keys carry a "site-packages/" prefix.
  A bare directory (no "name=") is a stdlib root.
  """
  stdlib, site = [], []
  for entry in source.split(os.pathsep):
    name, sep, d = entry.partition("=")
    if not sep:
      name, d = "stdlib", entry
    (site if name == "site-packages" else stdlib).append(d)
  files = [f for d in stdlib for f in stdlib_files(d)]
  files += site_packages_files(site) if site else []
  return sorted(dict(files).items())


def _glob_base(pattern: str) -> pathlib.Path:
  """The directory before the first wildcard component: relative paths (and so splits) start there."""
  parts = pathlib.Path(pattern).parts
  fixed = next(i for i, p in enumerate(parts) if glob.has_magic(p))
  return pathlib.Path(*parts[:fixed]) if fixed else pathlib.Path(".")


def text_files(source: str) -> list[tuple[str, pathlib.Path]]:
  """(relative posix path, path) of the `.txt/.md/.py/.jsonl` files of a directory or glob, sorted."""
  if glob.has_magic(source):
    base = _glob_base(source)
    paths = [pathlib.Path(p) for p in glob.glob(source, recursive=True)]
  else:
    base = pathlib.Path(source)
    paths = list(base.rglob("*"))
  files = [(p.relative_to(base).as_posix(), p) for p in paths if p.suffix in TEXT_SUFFIXES and p.is_file()]
  return sorted(files)


def iter_documents(files: Sequence[tuple[str, pathlib.Path]]) -> Iterator[tuple[str, str]]:
  """(key, text) of every non-empty utf-8 document: a file, or one `text` line of a `.jsonl` file.

  Undecodable files (the stdlib ships some latin-1 test data) are skipped, not fatal.
  """
  for rel, path in files:
    try:
      content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
      logging.info("skipping %s: not valid utf-8", path)
      continue
    if path.suffix != ".jsonl":
      if content:
        yield rel, content
      continue
    for line_no, line in enumerate(content.splitlines(), 1):
      if not line.strip():
        continue
      try:
        text = json.loads(line)["text"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{line_no}: expected a JSON object with a 'text' string per line "
                         f"(data.source jsonl format): {e!r}") from None
      if text:
        yield f"{rel}#{line_no}", text


class _LocalCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared builder logic; subclasses only say how `config.source` lists its files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # Nothing is downloaded, so there is no checksums file beside the code to look up; None also skips
  # tfds' lookup that imports the undeclared `importlib_resources` package (tensorflow/datasets#11212).
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
        disable_shuffling=True,  # keep sorted-path order: eval batches read in a human-predictable order
    )

  @staticmethod
  def list_files(source: str) -> list[tuple[str, pathlib.Path]]:
    raise NotImplementedError

  # tfds announces a download ("Downloading and preparing dataset Unknown size ...") and its end;
  # nothing is downloaded here, so one line says what happens instead.
  def _log_download_bytes(self) -> None:
    print(f"preparing the {self.name} corpus in {self.data_dir} (once: later runs reuse it)", flush=True)

  def _log_download_done(self) -> None:
    pass

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict[str, str]]]]:
    del dl_manager  # nothing to download
    files = self.list_files(self.builder_config.source)
    keys = [key for key, _ in iter_documents(files)]
    if len(keys) < 2:
      raise ValueError(f"data.source={self.builder_config.source!r}: found {len(keys)} non-empty utf-8 "
                       "document(s); need at least 2 (one is held out for validation)")
    held_out = validation_keys(keys, self.builder_config.validation_fraction)
    return {"train": self._generate_examples(files, held_out, False),
            "validation": self._generate_examples(files, held_out, True)}

  def _generate_examples(self, files: Sequence[tuple[str, pathlib.Path]], held_out: frozenset[str],
                         validation: bool) -> Iterator[tuple[str, dict[str, str]]]:
    for key, text in iter_documents(files):
      if (key in held_out) == validation:
        yield key, {"text": text, "path": key}


class LocalCode(_LocalCorpus):
  """The running interpreter's standard library `.py` files (and optionally its installed packages'):
  a no-network default corpus."""

  list_files = staticmethod(local_code_files)


class TextFiles(_LocalCorpus):
  """A user's `.txt/.md/.py/.jsonl` files (jsonl: one `{"text": ...}` document per line)."""

  list_files = staticmethod(text_files)


def _digest(*parts: object) -> str:
  return hashlib.sha1(repr(parts).encode("utf-8")).hexdigest()[:_DIGEST_CHARS]


def _check_fraction(validation_fraction: float) -> None:
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"data.validation_fraction={validation_fraction!r}: must lie in (0, 1), e.g. 0.02")


def local_code_builder(data_dir: str, validation_fraction: float, roots: str = "stdlib") -> LocalCode:
  """The `local_code` builder for this interpreter (its version, roots and their paths key the cache).

  roots: `data.local_code_roots`. The stdlib alone is keyed by its path and the Python version (its
  files do not change); with site-packages the size and mtime of every file join the key, so
  installing or upgrading a package gives a fresh cache entry.
  """
  _check_fraction(validation_fraction)
  names = parse_local_code_roots(roots)
  resolved = local_code_roots(names)
  version = f"py{sys.version_info.major}{sys.version_info.minor}"
  if names == ("stdlib",):
    root = resolved[0][1][0]
    name = f"{version}-" + _digest(root, sys.version, validation_fraction)  # unchanged: existing caches stay valid
    source = root
  else:
    source = _encode_roots(resolved)
    stats = [(rel, p.stat().st_size, p.stat().st_mtime_ns) for rel, p in local_code_files(source)
             if rel.startswith("site-packages/")]
    name = f"{version}-{'-'.join(n.replace('-', '') for n in names)}-" + _digest(
        resolved, sys.version, validation_fraction, stats)
  config = CorpusConfig(name=name, source=source, validation_fraction=validation_fraction)
  return LocalCode(config=config, data_dir=data_dir, file_format="array_record")


def text_files_builder(data_dir: str, source: str, validation_fraction: float) -> TextFiles:
  """The `text_files` builder for `source`; editing, adding or removing a file gives a fresh cache entry."""
  _check_fraction(validation_fraction)
  if not source:
    raise ValueError("data.source is empty: data.dataset='text_files' needs a directory or glob of "
                     f"{'/'.join(TEXT_SUFFIXES)} files, e.g. --config.data.source=~/my_corpus")
  resolved = os.path.abspath(os.path.expanduser(source))
  if not glob.has_magic(resolved) and not os.path.isdir(resolved):
    raise FileNotFoundError(f"data.source={source!r}: no such directory; point it at an existing directory "
                            "or a glob such as '~/corpus/**/*.md'")
  files = text_files(resolved)
  if not files:
    raise ValueError(f"data.source={source!r}: the corpus is empty (no {'/'.join(TEXT_SUFFIXES)} files "
                     "matched); point it at a directory or glob containing such files")
  stats = [(rel, p.stat().st_size, p.stat().st_mtime_ns) for rel, p in files]
  name = "src-" + _digest(resolved, stats, validation_fraction)
  config = CorpusConfig(name=name, source=resolved, validation_fraction=validation_fraction)
  return TextFiles(config=config, data_dir=data_dir, file_format="array_record")


def _prepared(builder: _LocalCorpus) -> Corpus:
  tfds.display_progress_bar(logging.level_info())  # tfds' per-split bars: only with INFO logs (--verbose)
  builder.download_and_prepare()  # a no-op once prepared
  splits = builder.as_data_source()
  return Corpus(train=TextSource(splits["train"]), validation=TextSource(splits["validation"]),
                prepared_dir=pathlib.Path(builder.data_dir))


def _registered_tfds(name: str, data_dir: str, feature_key: str, validation_fraction: float) -> Corpus:
  """A registered tfds dataset: its validation (else test) split, else the tail of train held out."""
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError:
    known = [*BUILTIN_DATASETS, *tfds.list_builders(with_community_datasets=False)]  # community: needs GCS
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"data.dataset={name!r}: unknown dataset{hint}; use 'local_code', 'text_files' or a "
                     "registered tfds dataset name (see tfds.list_builders())") from None
  if feature_key not in builder.info.features:
    raise ValueError(f"data.feature_key={feature_key!r} is not a feature of {name}: use one of "
                     f"{sorted(builder.info.features)}")
  # With an explicit data_dir tfds would default to TFRecord, which needs TensorFlow: ask for array_record.
  read = dict(data_dir=data_dir, builder_kwargs={"file_format": "array_record"})
  splits = tfds.data_source(name, **read)  # prepares (downloads) on first use
  held_out = next((s for s in ("validation", "test") if s in splits), None)
  if held_out is not None:
    train, validation = splits["train"], splits[held_out]
  else:
    _check_fraction(validation_fraction)
    n_val = max(1, round(len(splits["train"]) * validation_fraction))
    train, validation = tfds.data_source(name, split=[f"train[:-{n_val}]", f"train[-{n_val}:]"], **read)
  return Corpus(train=TextSource(train, feature_key), validation=TextSource(validation, feature_key),
                prepared_dir=pathlib.Path(builder.data_dir))


def prepare(data_cfg: Any) -> Corpus:
  """Prepares (once) and opens the corpus that `config.data` names."""
  data_dir = os.path.expanduser(data_cfg.data_dir)
  if data_cfg.dataset == "local_code":
    return _prepared(local_code_builder(data_dir, data_cfg.validation_fraction,
                                        data_cfg.get("local_code_roots", "stdlib")))
  if data_cfg.dataset == "text_files":
    return _prepared(text_files_builder(data_dir, data_cfg.source, data_cfg.validation_fraction))
  return _registered_tfds(data_cfg.dataset, data_dir, data_cfg.feature_key, data_cfg.validation_fraction)


def load_splits(data_cfg: Any) -> tuple[TextSource, TextSource]:
  """(train, validation) random-access sources of `{"text": str}` for the trainer."""
  corpus = prepare(data_cfg)
  return corpus.train, corpus.validation


def get_tokenizer(config: Any) -> tokenizer_lib.Tokenizer:
  """`data.tokenizer` if set; else a BPE trained once on the train split and cached beside the data.

  The cache key is the prepared dataset directory plus vocab size and text feature, so a second run
  (or another process) reuses the same tokenizer and ids stay stable across resumes.
  """
  vocab_size = config.model.vocab_size
  if config.data.tokenizer:
    tok = tokenizer_lib.Tokenizer.load(config.data.tokenizer)
  else:
    if vocab_size < tokenizer_lib.MIN_VOCAB_SIZE:
      raise ValueError(f"model.vocab_size={vocab_size} is too small for a trained byte-level BPE: it needs "
                       f"{tokenizer_lib.NUM_BYTES} byte tokens + {len(tokenizer_lib.SPECIAL_TOKENS)} special "
                       f"tokens; set model.vocab_size >= {tokenizer_lib.MIN_VOCAB_SIZE}")
    corpus = prepare(config.data)
    cache = corpus.prepared_dir / f"tokenizer-bpe{vocab_size}-{config.data.feature_key}"
    if (cache / tokenizer_lib.TOKENIZER_FILE).is_file():
      tok = tokenizer_lib.Tokenizer.load(cache)
    else:
      print(f"training a {vocab_size}-token BPE tokenizer on {config.data.dataset} (once: cached in {cache})",
            flush=True)
      tok = tokenizer_lib.train_bpe(_bounded_texts(corpus.train, TOKENIZER_TRAIN_CHARS), vocab_size)
      tok.save(cache)
  if tok.vocab_size > vocab_size:
    raise ValueError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's vocab ({tok.vocab_size} "
                     f"ids including special tokens): set model.vocab_size={tok.vocab_size} or more")
  return tok


def _bounded_texts(source: TextSource, max_chars: int) -> Iterator[str]:
  """Documents in order until `max_chars` characters: BPE merges converge long before huge corpora end."""
  total = 0
  for i in range(len(source)):
    text = source[i]["text"]
    yield text
    total += len(text)
    if total >= max_chars:
      return
