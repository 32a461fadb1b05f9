"""Corpus (tfds builders), tokenizer selection and the grain input pipeline."""

from tidar_jax.data.builders import Corpus, TextSource, get_tokenizer, load_splits, prepare
from tidar_jax.data.pipeline import make_eval_batches, make_train_iterator, to_global_array

__all__ = ["Corpus", "TextSource", "get_tokenizer", "load_splits", "make_eval_batches", "make_train_iterator",
           "prepare", "to_global_array"]
