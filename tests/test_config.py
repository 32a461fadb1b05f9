"""Each bad config field yields an error naming it."""

import pytest

from configs import tiny
from tidar_jax import config as config_lib
from tidar_jax.optimizer import learning_rate_schedule


def test_smollm2_config_is_the_published_model():
  """configs/smollm2.py's model section is SmolLM2-135M (transformers counts 134,515,008 parameters for
  its 49152-row tied embedding) plus the rows padded for <|mask|>; the converter checks the rest."""
  from configs import smollm2
  from tidar_jax import flops

  m = config_lib.validate(smollm2.get_config())
  assert flops.count_params(m)["total"] == 134_515_008 + (m.vocab_size - 49152) * m.d_model
  assert m.vocab_size % 64 == 0 and m.tie_embeddings and m.dtype == "bfloat16"


def test_tiny_config_is_valid():
  cfg = config_lib.validate(tiny.get_config())
  assert cfg.num_heads % cfg.num_kv_heads == 0 and hash(cfg)


@pytest.mark.parametrize("section,field,value,message", [
    ("model", "num_kv_heads", 3, "model.num_heads=4 is not a multiple of model.num_kv_heads=3"),
    ("model", "dtype", "float8", "model.dtype='float8': unknown dtype"),
    ("model", "param_dtype", "fp32", "model.param_dtype='fp32': unknown dtype"),
    ("model", "head_dim", 31, "model.head_dim=31: must be even"),
    ("model", "num_layers", 0, "model.num_layers=0: must be a positive integer"),
    ("model", "remat", "some", "model.remat='some'"),
    ("model", "attention", "flash9", "model.attention='flash9'"),
    ("model", "decode_quant", "int4", "model.decode_quant='int4': use one of ['none', 'int8']"),
    ("model", "rope_type", "yarn", "model.rope_type='yarn': use one of ['default', 'linear', 'llama3']"),
    ("tidar", "block_size", 7, "train.seq_len=256 is not a multiple of tidar.block_size=7"),
    ("tidar", "block_size", 0, "tidar.block_size=0"),
    ("tidar", "objective", "mdlm", "tidar.objective='mdlm'"),
    ("tidar", "verify_beta", 1.5, "tidar.verify_beta=1.5"),
    ("tidar", "loss_alpha", -1.0, "tidar.loss_alpha=-1.0"),
    ("train", "seq_len", 100, "train.seq_len=100 is not a multiple of tidar.block_size=8"),
    ("train", "grad_accum", 3, "train.batch_size=8 is not a multiple of train.grad_accum=3"),
    ("train", "grad_accum", -1, "train.grad_accum=-1: must be an integer >= 0"),
    ("train", "micro_batch_per_device", "many",
     "train.micro_batch_per_device='many': use a positive integer, \"auto\""),
    ("train", "micro_batch_per_device", 0, "train.micro_batch_per_device=0"),
    ("train", "eval_batches", -1, "train.eval_batches=-1: must be an integer >= 0 (0: no validation)"),
    ("train", "loss_chunk", 0, "train.loss_chunk=0: must be a positive integer"),
    ("train", "learning_rate", 0.0, "train.learning_rate=0.0"),
    ("train", "warmup_steps", 10_000, "train.warmup_steps=10000: use a fraction of train.steps in (0, 1) or a whole "
     "number of steps in [0, train.steps=300], e.g. --config.train.warmup_steps=0.1"),
    ("train", "warmup_steps", 2.5, "train.warmup_steps=2.5: use a fraction"),
    ("train", "checkpoint_every", 0, "train.checkpoint_every=0: use a whole number of steps >= 1 or a fraction"),
    ("train", "checkpoint_every_s", -1, "train.checkpoint_every_s=-1: must be a number of seconds >= 0"),
    ("data", "window_shuffle", 0, "data.window_shuffle=0: must be a positive integer"),
    ("data", "local_code_roots", "stdlib,numpy", "data.local_code_roots='stdlib,numpy': use a comma-separated"),
])
def test_each_bad_field_is_named(section, field, value, message):
  c = tiny.get_config()
  setattr(getattr(c, section), field, value)
  with pytest.raises(ValueError) as e:
    config_lib.validate(c)
  assert message in str(e.value)


@pytest.mark.parametrize("fields,message", [
    (dict(rope_type="linear", rope_factor=0.0), "model.rope_factor=0.0: must be > 0 with model.rope_type='linear'"),
    (dict(rope_type="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=1.0),
     "model.rope_low_freq_factor=4.0 and model.rope_high_freq_factor=1.0: llama3 RoPE needs 0 < low < high"),
    (dict(rope_type="llama3", rope_original_max_position=0), "model.rope_original_max_position=0: must be a positive"),
])
def test_bad_rope_scaling_is_named(fields, message):
  c = tiny.get_config()
  c.model.update(fields)
  with pytest.raises(ValueError) as e:
    config_lib.validate(c)
  assert message in str(e.value)


def test_unknown_model_field():
  c = tiny.get_config()
  c.model.num_expert = 4
  with pytest.raises(ValueError, match="num_expert"):
    config_lib.validate(c)
  with pytest.raises(ValueError, match="num_expert"):
    config_lib.ModelConfig.from_config(c.model)


def test_one_bad_field_is_one_line():
  c = tiny.get_config()
  c.train.steps = 0
  with pytest.raises(ValueError) as e:
    config_lib.validate(c)
  assert str(e.value) == "invalid config: train.steps=0: must be a positive integer"


def test_step_counts_may_be_fractions_of_the_run():
  """warmup_steps / checkpoint_every below 1 follow train.steps (tiny's 0.1 warmup: 30 of its 300 steps,
  1 of a 10-step run), whole numbers are steps; the schedule peaks where the warmup ends."""
  assert [config_lib.steps_of(v, 300) for v in (0.1, 0.25, 0, 30, 30.0, 0.001)] == [30, 75, 0, 30, 30, 1]
  c = tiny.get_config()
  c.train.steps = 10
  config_lib.validate(c)  # tiny's defaults fit a 10-step run
  lr = learning_rate_schedule(c.train)
  assert float(lr(0)) == 0.0 and float(lr(1)) == pytest.approx(c.train.learning_rate)
