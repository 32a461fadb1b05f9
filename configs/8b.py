"""TiDAR 8B: the Qwen3-8B shape, block size 16, gradient checkpointing (docs/method.md §3).

    python -m tidar_jax.train --config=configs/8b.py --dry_run
"""

from ml_collections import ConfigDict

from configs import base, recipes


def get_config() -> ConfigDict:
  c = base.get_config()
  c.model.update(**recipes.QWEN3_8B, **recipes.ACCELERATOR)
  c.model.remat = "full"  # the paper uses gradient checkpointing at 8B
  c = recipes.paper_recipe(c, tokens=150e9, block_size=16)
  c.tidar.verify_beta = 0.0  # the paper's 8B decodes best trusting diffusion (beta = 0)
  c.train.checkpoint_every = 500
  return c
