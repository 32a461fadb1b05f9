"""SmolLM2-135M continued with the TiDAR objective on Python code: the paper's recipe on a real
pretrained model at a size one GPU trains in minutes (results/smollm2/RESULTS.md).

    python -m tidar_jax.convert.from_gguf --gguf=SmolLM2-135M-Instruct.Q4_1.gguf --out=runs/smollm2 \
        --config=configs/smollm2.py
    python -m benchmarks.reproduce --config=runs/smollm2/config.py --runs ar,tidar8 --out-dir results/smollm2

The model section is SmolLM2-135M's shape (the converter checks it against the file); the rest is
the recipe: the machine's own Python code (stdlib + site-packages), 64 x 1024 = 65,536 clean tokens
per step, warmup then cosine as in the paper, block size 8. The AR-only baseline is the same config
with `tidar.objective="ar"` (reproduce's `ar` run): same data order, same tokens.
"""

from ml_collections import ConfigDict

from configs import base, recipes


def get_config() -> ConfigDict:
  c = base.get_config()
  # 135M: no remat needed. Layers unrolled: at d_model 576 the layer scan's stacking of each layer's
  # saved activations costs a quarter of the train step (benchmarks/profile_step, BENCHMARKS.md).
  c.model.update(**{**recipes.ACCELERATOR, **recipes.SMOLLM2_135M, "remat": "none", "scan_layers": False})
  c.tidar.update(block_size=8, loss_alpha=1.0)
  c.data.update(dataset="local_code", local_code_roots="stdlib,site-packages", window_shuffle=64,
                validation_fraction=0.01,
                num_workers=4)  # one process tokenizes ~320k tokens/s, less than the unrolled AR step takes
  c.train.update(seq_len=1024, batch_size=64, micro_batch_per_device="auto", steps=500, learning_rate=1e-4,
                 min_learning_rate=1e-5, warmup_steps=0.05, weight_decay=0.1, grad_clip=1.0, log_every=10,
                 eval_every=100, eval_batches=8, checkpoint_every=100_000, keep_checkpoints=1)
  return c
