"""TiDAR small: a ~100M-parameter model for the small-scale reproduction on one H100 (issue 8).

    python -m benchmarks.reproduce --config=configs/small.py --runs ar --out-dir $OUT/repro
    python -m benchmarks.reproduce --config=configs/small.py --runs tidar8 --out-dir $OUT/repro
    python -m tidar_jax.train --config=configs/small.py --dry_run    # params and per-device memory

GPT-2-small width (12 layers, d_model 768, 12 heads of 64) with SwiGLU 2048, a 16k BPE trained on
the interpreter's own code (stdlib + site-packages), seq_len 1024, batch 32 (32,768 clean tokens per
step; TiDAR feeds 65,536). The budget (steps) is sized so one TiDAR run trains in about 4 minutes on
an H100; the AR-only baseline uses the same config (same data, same tokens) with
`tidar.objective="ar"` and costs about half the step time.
"""

from ml_collections import ConfigDict

from configs import base, recipes


def get_config() -> ConfigDict:
  c = base.get_config()
  # GPT-2-small width with SwiGLU 8/3 x d_model; full multi-head attention (GQA saves little cache here);
  # no remat: activations of 32 x 2048 tokens x 12 layers fit an 80 GB GPU
  c.model.update(vocab_size=16384, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, head_dim=64,
                 mlp_dim=2048, tie_embeddings=True, rope_theta=10000.0, remat="none", **recipes.ACCELERATOR)
  c.tidar.update(block_size=8, loss_alpha=1.0)  # reproduce --block-sizes adds 4 and 16
  # the machine's Python code (~100+ MB with torch/jax installed); window_shuffle as measured in results/small
  c.data.update(dataset="local_code", local_code_roots="stdlib,site-packages", window_shuffle=64,
                validation_fraction=0.01, num_workers=0)
  # 32 x 1024 = 32,768 clean tokens per step, 26.2M per run; only the final step is checkpointed
  c.train.update(seq_len=1024, batch_size=32, steps=800, learning_rate=1.5e-3, min_learning_rate=1.5e-4,
                 warmup_steps=80, weight_decay=0.1, grad_clip=1.0, log_every=20, eval_every=200, eval_batches=8,
                 checkpoint_every=100_000, keep_checkpoints=1)
  return c
