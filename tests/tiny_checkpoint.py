"""A random tiny model saved with a real (tiny) BPE tokenizer: the checkpoint the CLI tests load."""

from configs import tiny
from test_decode_ar import random_params
from tidar_jax import checkpoint
from tidar_jax.config import ModelConfig
from tidar_jax.tokenizer import train_bpe

MODEL = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)


def save_tiny(path: str, texts: list[str], *, seed: int = 5, std: float = 0.3, block_size: int | None = 4,
              train: dict | None = None, **model) -> str:
  """Trains a 300-id BPE on `texts` (x4), draws the weights (`std`: peaked, context-dependent logits)
  and saves an inference checkpoint at `path`; `model` overrides MODEL's fields."""
  tokenizer = train_bpe(texts * 4, 300)
  config = tiny.get_config()
  config.model.update(vocab_size=tokenizer.vocab_size, **{**MODEL, **model})
  if block_size is not None:
    config.tidar.block_size = block_size
  config.train.update(**(train or {}))
  params = random_params(ModelConfig(**config.model.to_dict()), seed=seed, std=std)
  checkpoint.save_inference(path, params, config, tokenizer)
  return path
