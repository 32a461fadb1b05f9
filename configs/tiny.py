"""The embedded default: a few-million-parameter TiDAR model that trains on 2 CPU cores in minutes.

    python -m tidar_jax.train --config=configs/tiny.py [--config.train.steps=100] [--workdir=DIR]

It is the schema's defaults (`configs/base.py`) unchanged.
"""

from ml_collections import ConfigDict

from configs import base


def get_config() -> ConfigDict:
  return base.get_config()
