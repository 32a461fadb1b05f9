"""Every config field with its default and a one-line comment: the schema the other configs change.

The defaults are the embedded CPU model (`configs/tiny.py` is this file's config as it stands);
`configs/small.py`, `1p5b.py` and `8b.py` change the model shape and the training recipe
(`configs/recipes.py`).
"""

from ml_collections import ConfigDict, config_dict


def get_config() -> ConfigDict:
  c = ConfigDict()
  c.seed = 0  # one seed for init and data order: a run is reproducible from (config, seed)
  c.init_from = ""  # export or converted-HF checkpoint dir to start params from (continual pretraining)

  c.model = ConfigDict()
  c.model.vocab_size = 8192  # embedding rows; must hold the tokenizer's vocab including <|mask|>
  c.model.d_model = 128  # residual stream width
  c.model.num_layers = 4  # transformer blocks
  c.model.num_heads = 4  # query heads
  c.model.num_kv_heads = 2  # key/value heads (grouped-query attention); divides num_heads
  c.model.head_dim = 32  # per-head width (need not equal d_model // num_heads)
  c.model.mlp_dim = 384  # SwiGLU hidden width
  c.model.qkv_bias = False  # bias on q/k/v projections (Qwen2/2.5)
  c.model.qk_norm = False  # per-head RMSNorm on q and k (Qwen3)
  c.model.tie_embeddings = True  # LM head shares the token embedding matrix
  c.model.rope_theta = 10000.0  # RoPE base frequency
  c.model.rope_type = "default"  # RoPE frequency scaling: default | linear | llama3 (Llama 3.1+ checkpoints)
  c.model.rope_factor = 1.0  # linear/llama3: context extension factor
  c.model.rope_low_freq_factor = 1.0  # llama3 only
  c.model.rope_high_freq_factor = 4.0  # llama3 only
  c.model.rope_original_max_position = 8192  # llama3 only: context length before the extension
  c.model.norm_eps = 1e-6  # RMSNorm epsilon
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 | float16
  c.model.param_dtype = "float32"  # master weight dtype
  c.model.scan_layers = True  # nn.scan over layers (fast compile); False unrolls the same stacked params
  c.model.remat = "none"  # activation checkpointing per block: none | full | dots
  c.model.attention = "dense"  # dense (reference) | cudnn (GPU) | splash (TPU) | auto (cudnn on GPU in bf16,
  # splash on TPU, else dense)
  c.model.decode_quant = "none"  # decoding only: int8 = layer matrices as int8 + one scale per output column

  c.tidar = ConfigDict()
  c.tidar.objective = "tidar"  # tidar: dual AR + diffusion loss on the doubled sequence | ar: AR-only baseline
  c.tidar.block_size = 8  # k: draft block length; train.seq_len must be a multiple of it
  c.tidar.loss_alpha = 4.0  # weight of the AR loss: (alpha * L_AR + L_diff) / (1 + alpha); 4 here: a CPU-minutes
  # budget learns the AR head faster (the paper and the big configs use 1)
  c.tidar.verify_beta = 1.0  # decode: beta * AR + (1 - beta) * diffusion logits for verification (1 = exact AR)
  # decode: the acceptance counts whose draft blocks a step feeds: "all" (k + k² tokens per row, the paper's),
  # a set of counts such as "0,1,2,7" or (0, 1, 2, 7) (k + |S|·k tokens; still exact), or "auto" (generate /
  # evaluate pick the set for a measured acceptance histogram and the batch size: tidar_jax/predraft.py)
  c.tidar.predraft = config_dict.FieldReference("all", field_type=object)

  c.data = ConfigDict()
  c.data.dataset = "local_code"  # local_code (stdlib .py files) | text_files | any registered tfds dataset name
  c.data.source = ""  # text_files: a directory or glob of .txt/.md/.py/.jsonl files
  c.data.local_code_roots = "stdlib"  # local_code: stdlib | stdlib,site-packages (installed packages' code too)
  c.data.feature_key = "text"  # the text feature of a tfds dataset
  c.data.data_dir = "~/.cache/tidar_jax"  # where prepared tfds data and the trained tokenizer are cached
  c.data.tokenizer = ""  # path to tokenizer.json or an HF tokenizer dir; empty = train a BPE on the train split
  c.data.validation_fraction = 0.02  # share of files (by stable hash of the path) held out for validation
  c.data.num_workers = 0  # grain worker processes (0 = a thread of the main process; benchmarks/input_pipeline)
  c.data.window_shuffle = 1024  # packed windows shuffled together, so a batch mixes many files (1 = off)

  c.train = ConfigDict()
  c.train.seq_len = 256  # clean tokens per training window (the TiDAR input is 2 * seq_len)
  c.train.steps = 300  # optimizer steps (about 7 minutes on 2 CPU cores)
  c.train.learning_rate = 3e-3  # peak learning rate
  c.train.min_learning_rate = 1e-4  # end of the cosine decay
  c.train.warmup_steps = 0.1  # linear warmup: a fraction of train.steps in (0, 1), or a whole number of steps
  c.train.weight_decay = 0.1  # AdamW decoupled weight decay
  c.train.adam_b1 = 0.9  # AdamW beta1
  c.train.adam_b2 = 0.95  # AdamW beta2
  c.train.grad_clip = 1.0  # global-norm gradient clipping (0 disables)
  c.train.batch_size = 8  # global batch size in windows (the recipe), split over the data x fsdp devices
  # sequences per device per forward: a number, "auto" (the largest whose compiled step fits the
  # device's memory) or None (per-device batch / grad_accum); gradients accumulate over the rest
  c.train.micro_batch_per_device = config_dict.FieldReference(None, field_type=object)
  c.train.grad_accum = 0  # micro-batches per optimizer step; 0 = derived from micro_batch_per_device
  c.train.loss_chunk = 1024  # sequence positions whose fp32 LM-head logits exist at once (the loss)
  c.train.log_every = 10  # steps between metric lines
  c.train.eval_every = 100  # steps between validation evals
  c.train.eval_batches = 8  # validation batches per eval; 0 = no validation
  c.train.checkpoint_every = 0.25  # between checkpoints: a fraction of train.steps, or a whole number of steps
  c.train.checkpoint_every_s = 600.0  # also checkpoint when this many seconds passed since the last one (0 = off)
  c.train.keep_checkpoints = 3  # checkpoints kept on disk

  c.mesh = ConfigDict()
  c.mesh.data = -1  # data-parallel axis size (-1: the rest of the devices)
  c.mesh.fsdp = 1  # fully-sharded data-parallel axis size
  c.mesh.tensor = 1  # tensor-parallel axis size
  # logical axis -> mesh axes; one table for params and activations
  c.mesh.rules = (
      ("batch", ("data", "fsdp")),
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("mlp", "tensor"),
      ("head_dim", None),
      ("layers", None),
      ("length", None),
  )
  return c
