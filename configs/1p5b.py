"""TiDAR 1.5B: the Qwen2.5-1.5B shape, continually pretrained with the paper's recipe (docs/method.md §3).

    python -m tidar_jax.convert.from_hf --hf_dir=Qwen2.5-1.5B --out=ckpt/qwen2p5_1p5b
    python -m tidar_jax.train --config=configs/1p5b.py --config.init_from=ckpt/qwen2p5_1p5b \
        --config.data.tokenizer=ckpt/qwen2p5_1p5b --config.data.dataset=<tfds name> --workdir=gs://...
    python -m tidar_jax.train --config=configs/1p5b.py --dry_run    # memory/sharding check, no allocation
"""

from ml_collections import ConfigDict

from configs import tiny


def get_config() -> ConfigDict:
  c = tiny.get_config()
  m = c.model
  m.vocab_size = 151936  # Qwen2.5's padded vocab; <|mask|> takes an unused padded row (151665 real tokens)
  m.d_model = 1536
  m.num_layers = 28
  m.num_heads = 12
  m.num_kv_heads = 2
  m.head_dim = 128
  m.mlp_dim = 8960
  m.qkv_bias = True
  m.qk_norm = False
  m.tie_embeddings = True
  m.rope_theta = 1e6
  m.norm_eps = 1e-6
  m.dtype = "bfloat16"  # bf16 compute, fp32 master weights
  m.param_dtype = "float32"
  m.scan_layers = True
  m.remat = "dots"  # keep matmul outputs, recompute the rest: the doubled sequence needs it
  m.attention = "auto"  # cuDNN flash attention on GPU (bf16), splash on TPU, the dense reference elsewhere

  c.tidar.block_size = 16  # the paper trains 4, 8 and 16; 16 drafts the most tokens per forward
  c.tidar.loss_alpha = 1.0

  c.data.dataset = "local_code"  # replace with your tfds dataset (or text_files + data.source)
  c.data.tokenizer = ""  # the converted checkpoint dir (holds Qwen's tokenizer.json + <|mask|>)

  t = c.train
  t.seq_len = 4096  # max length 4096 (the model sees 8192 tokens: clean + mask halves)
  t.batch_size = 512  # 512 x 4096 = 2M tokens per step, as in the paper
  t.micro_batch_per_device = "auto"  # the largest that fits the device; grad_accum follows
  t.steps = 23842  # 50B tokens / 2.1M tokens per step
  t.learning_rate = 1e-5  # cosine 1e-5 -> 3e-6
  t.min_learning_rate = 3e-6
  t.warmup_steps = 238  # 1% of steps
  t.weight_decay = 0.0
  t.grad_clip = 1.0
  t.log_every = 10
  t.eval_every = 1000
  t.eval_batches = 16
  t.checkpoint_every = 1000

  c.mesh.data = 1
  c.mesh.fsdp = -1  # shard params/optimizer over every device (ZeRO-3 style)
  c.mesh.tensor = 1
  return c
