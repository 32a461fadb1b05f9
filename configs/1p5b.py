"""TiDAR 1.5B: the Qwen2.5-1.5B shape, continually pretrained with the paper's recipe (docs/method.md §3).

    python -m tidar_jax.convert.from_hf --hf_dir=Qwen2.5-1.5B --out=ckpt/qwen2p5_1p5b
    python -m tidar_jax.train --config=configs/1p5b.py --config.init_from=ckpt/qwen2p5_1p5b \
        --config.data.tokenizer=ckpt/qwen2p5_1p5b --config.data.dataset=<tfds name> --workdir=gs://...
    python -m tidar_jax.train --config=configs/1p5b.py --dry_run    # memory/sharding check, no allocation
"""

from ml_collections import ConfigDict

from configs import base, recipes


def get_config() -> ConfigDict:
  c = base.get_config()
  c.model.update(**recipes.QWEN2P5_1P5B, **recipes.ACCELERATOR)
  c.model.remat = "dots"  # keep matmul outputs, recompute the rest: the doubled sequence needs it
  # the paper trains block sizes 4, 8 and 16 on 50B tokens; 16 drafts the most tokens per forward
  return recipes.paper_recipe(c, tokens=50e9, block_size=16)
