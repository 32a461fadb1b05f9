"""HF interop: tiny random Qwen2 / Qwen3 / Llama models from `transformers`, converted both ways.

Parity in fp32 against transformers (logits, KV-cached greedy decoding), exact round trips,
sharded checkpoints converted in bounded memory, and a clear error for each bad input.
"""

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from ml_collections.config_flags import config_flags
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models as tok_models

from tidar_jax import checkpoint, sharding, train_step
from tidar_jax.config import ModelConfig, validate
from tidar_jax.decode.ar import generate_ar
from tidar_jax.decode.sampling import SamplingParams
from tidar_jax.model import Transformer, init_params, rope_inv_freq
from tidar_jax.optimizer import make_optimizer
from tidar_jax.tokenizer import Tokenizer

torch = pytest.importorskip("torch")  # the [hf] extra: torch, transformers
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from tidar_jax.convert import families, from_hf, to_hf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_VOCAB = 128
# family -> (tied embeddings, tokenizer size): qwen2 leaves padded rows for the specials to reuse,
# qwen3 (tied) and llama (untied) fill their vocab, so conversion grows the embedding.
FAMILIES = {"qwen2": (False, 100), "qwen3": (True, HF_VOCAB), "llama": (False, HF_VOCAB)}
CONFIG_CLASSES = {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "llama": "LlamaConfig"}
# head_dim 16, theta 5000: wavelengths 6.3 (< 64 / 4: kept), 18.6 and 55 (interpolated), 163+ (/ 8).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _write_tokenizer(hf_dir, size):
  """A word-level tokenizer with `size` ids (no special tokens: the converter adds them)."""
  HFTokenizer(tok_models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0")).save(
      os.path.join(hf_dir, "tokenizer.json"))


def _make_hf(family, hf_dir, *, tied, tokenizer_size):
  """A 2-layer random HF model saved to hf_dir (fp32 safetensors + a tokenizer.json)."""
  kwargs = dict(vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, rope_theta=5000.0,
                rms_norm_eps=1e-5, initializer_range=0.2)  # large weights: peaked logits, no argmax near-ties
  if family != "qwen2":  # Qwen2 derives head_dim = hidden_size / heads (8); the others get 16
    kwargs["head_dim"] = 16
  if family == "llama":  # Llama 3.1's RoPE scaling, sized so its three frequency bands all occur
    kwargs["rope_parameters"] = LLAMA3_ROPE
  config = getattr(transformers, CONFIG_CLASSES[family])(**kwargs)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
  with torch.no_grad():  # HF initialises norms to 1 and biases to 0: perturb so a swapped mapping shows
    for name, p in model.named_parameters():
      if "norm" in name or "bias" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(hf_dir)
  _write_tokenizer(hf_dir, tokenizer_size)
  return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """family -> (HF dir, torch model, converted checkpoint dir)."""
  out = {}
  for family, (tied, tok_size) in FAMILIES.items():
    root = tmp_path_factory.mktemp(family)
    model = _make_hf(family, str(root / "hf"), tied=tied, tokenizer_size=tok_size)
    from_hf.convert(str(root / "hf"), str(root / "ckpt"))
    out[family] = (str(root / "hf"), model, str(root / "ckpt"))
  return out


def _forward(cfg, params, tokens):
  """Full causal forward, jitted (one compile instead of one per eager op): [batch, len] -> logits."""
  B, T = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
  apply = jax.jit(lambda p, t: Transformer(cfg).apply(p, t, positions, jnp.tril(jnp.ones((1, T, T), bool)))[0])
  return np.asarray(apply(params, jnp.asarray(tokens)))


def _load_fp32(ckpt):
  params, config, tokenizer = checkpoint.load_for_inference(ckpt)
  return params, ModelConfig(**{**config.model.to_dict(), "dtype": "float32"}), config, tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(hf, family):
  hf_dir, model, ckpt = hf[family]
  params, cfg, config, tokenizer = _load_fp32(ckpt)
  assert config.hf.model_type == family and config.model.dtype == "bfloat16"  # generated: bf16 compute
  tokens = np.random.RandomState(0).randint(0, HF_VOCAB, (3, 24))
  with torch.no_grad():
    want = model(torch.tensor(tokens)).logits.numpy()  # [3, 24, HF_VOCAB]
  got = _forward(cfg, params, tokens)
  np.testing.assert_allclose(got[..., :HF_VOCAB], want, atol=1e-4, rtol=0)
  # The mask token: padded Qwen rows are reused, full vocabularies grow (3 specials appended).
  grows = FAMILIES[family][1] == HF_VOCAB
  assert cfg.vocab_size == (HF_VOCAB + 3 if grows else HF_VOCAB) == got.shape[-1]
  assert tokenizer.mask_id == (HF_VOCAB + 2 if grows else 102)  # after <|endoftext|>, <|pad|>
  if grows:  # appended rows start at the mean embedding
    table = np.asarray(params["params"]["embed"]["embedding"])
    np.testing.assert_allclose(table[HF_VOCAB:], np.broadcast_to(table[:HF_VOCAB].mean(0), (3, cfg.d_model)),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_decoding_matches_generate(hf, family):
  _, model, ckpt = hf[family]
  params, cfg, _, _ = _load_fp32(ckpt)
  prompts = np.random.RandomState(1).randint(0, HF_VOCAB, (2, 7))
  model.generation_config.eos_token_id = None  # decode exactly 20 tokens, as generate_ar does
  with torch.no_grad():
    want = model.generate(torch.tensor(prompts), max_new_tokens=20, do_sample=False,
                          pad_token_id=0).numpy()[:, 7:]
  got = generate_ar(params, cfg, prompts, np.full((2,), 7), max_new_tokens=20,
                    sampling=SamplingParams(temperature=0.0), key=jax.random.key(0), eos_id=None)
  assert len(np.unique(want)) > 5  # a real sequence, not one repeated token
  np.testing.assert_array_equal(np.asarray(got.tokens), want)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_gives_identical_tensors(hf, family, tmp_path):
  hf_dir, _, ckpt = hf[family]
  hf_cfg = to_hf.export(ckpt, str(tmp_path / "back"), drop_mask_row=True)
  original = load_file(os.path.join(hf_dir, "model.safetensors"))
  back = load_file(str(tmp_path / "back" / "model.safetensors"))
  assert sorted(back) == sorted(original)
  for name, tensor in original.items():
    np.testing.assert_array_equal(back[name], tensor, err_msg=name)
  assert hf_cfg["model_type"] == family and hf_cfg["vocab_size"] == HF_VOCAB
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
  assert type(reloaded).__name__ == CONFIG_CLASSES[family].replace("Config", "ForCausalLM")
  tok = json.load(open(tmp_path / "back" / "tokenizer.json"))
  assert all(t["id"] < FAMILIES[family][1] for t in tok["added_tokens"])  # the TiDAR specials are gone


def test_older_orbax_without_streaming_saves_converts_the_same(hf, tmp_path, monkeypatch):
  """orbax-checkpoint releases whose NumpyHandler lacks `deepcopy_host_arrays` still convert (with
  the copying handler): same parameters as the streaming conversion."""
  class OldNumpyHandler(ocp.type_handlers.NumpyHandler):
    def __init__(self):  # the older signature: no keyword arguments
      super().__init__()

  monkeypatch.setattr(ocp.type_handlers, "NumpyHandler", OldNumpyHandler)
  hf_dir, _, ckpt = hf["qwen2"]
  from_hf.convert(hf_dir, str(tmp_path / "ckpt"))
  got, want = checkpoint.load_params(str(tmp_path / "ckpt")), checkpoint.load_params(ckpt)
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("rope", [LLAMA3_ROPE, {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}])
def test_rope_frequencies_match_transformers(rope):
  """model.rope_inv_freq of the converted fields == transformers' own RoPE init for that rope_type."""
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  hf_cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_parameters=dict(rope))
  want = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu")[0].numpy()
  fields = families.rope_fields(hf_cfg.to_dict())
  cfg = ModelConfig(vocab_size=8, d_model=64, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=16, mlp_dim=8,
                    **fields)
  np.testing.assert_allclose(rope_inv_freq(cfg), want, rtol=1e-6)
  assert not np.allclose(want, rope_inv_freq(dataclasses.replace(cfg, rope_type="default")))


def test_legacy_rope_scaling_reads_as_rope_parameters():
  """Llama 3.1's config.json as transformers 4.x writes it (rope_theta + rope_scaling) gives the same
  fields as the transformers 5 form."""
  legacy = {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
  v5 = {"rope_parameters": {**legacy["rope_scaling"], "rope_theta": 5e5}}
  assert families.rope_fields(legacy) == families.rope_fields(v5) == dict(
      rope_theta=5e5, rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
      rope_original_max_position=8192)
  assert families.rope_fields({"rope_scaling": {"type": "linear", "factor": 2.0}})["rope_factor"] == 2.0


def test_export_keeps_mask_rows_and_infers_family(hf, tmp_path):
  """Without --drop_mask_row the grown vocab stays; a model trained from scratch exports too."""
  _, model, ckpt = hf["llama"]
  to_hf.export(ckpt, str(tmp_path / "kept"))
  kept = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "kept"))
  assert kept.config.vocab_size == HF_VOCAB + 3
  tokens = torch.tensor(np.random.RandomState(2).randint(0, HF_VOCAB, (1, 9)))
  with torch.no_grad():
    np.testing.assert_allclose(kept(tokens).logits[..., :HF_VOCAB].numpy(), model(tokens).logits.numpy(), atol=1e-5)

  # A tidar_jax model with qk-norm and no HF origin: exported as qwen3, same logits in transformers.
  cfg = ModelConfig(vocab_size=70, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48,
                    qk_norm=True, tie_embeddings=False, rope_theta=1e4, norm_eps=1e-6)
  rng = np.random.RandomState(4)
  params = jax.tree_util.tree_map_with_path(  # random weights, norm scales near 1; no init compile
      lambda path, x: float("scale" in jax.tree_util.keystr(path)) + 0.2 * rng.randn(*x.shape).astype(np.float32),
      jax.eval_shape(lambda: nn.unbox(init_params(cfg, jax.random.key(0)))))
  _write_tokenizer(str(tmp_path), 60)
  checkpoint.save_inference(str(tmp_path / "scratch"), params,
                            ml_collections.ConfigDict({"model": dataclasses.asdict(cfg)}),
                            Tokenizer.load(str(tmp_path / "tokenizer.json")))
  hf_cfg = to_hf.export(str(tmp_path / "scratch"), str(tmp_path / "scratch_hf"))
  assert hf_cfg["model_type"] == "qwen3"
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "scratch_hf"),
                                                               attn_implementation="eager")
  tokens = np.random.RandomState(3).randint(0, 70, (2, 10))
  with torch.no_grad():
    np.testing.assert_allclose(exported(torch.tensor(tokens)).logits.numpy(), _forward(cfg, params, tokens),
                               atol=1e-4, rtol=0)
  with pytest.raises(ValueError, match="was not converted from HF"):
    to_hf.export(str(tmp_path / "scratch"), str(tmp_path / "x"), drop_mask_row=True)


def test_generated_config_is_a_training_start(hf):
  """CKPT/config.py loads like `--config=CKPT/config.py`; its init_from restores as train.py does."""
  _, _, ckpt = hf["qwen3"]
  flag_values = flags.FlagValues()  # parsed as `python -m tidar_jax.train --config=CKPT/config.py` would
  config_flags.DEFINE_config_file("config", os.path.join(ckpt, "config.py"), flag_values=flag_values)
  flag_values(["train"])
  config = flag_values.config
  cfg = validate(config)
  assert config.init_from == ckpt and config.train.learning_rate == from_hf.CONTINUAL_LEARNING_RATE
  assert Tokenizer.load(config.data.tokenizer).vocab_size <= cfg.vocab_size
  mesh, rules = sharding.make_mesh(config.mesh), sharding.logical_rules(config.mesh)
  with mesh, nn.logical_axis_rules(rules):  # train.train_and_evaluate's restore target, step by step
    abstract = train_step.abstract_train_state(cfg, make_optimizer(config.train), config.seed)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(abstract),
                          sharding.param_shardings(abstract, mesh, rules))
    restored = checkpoint.load_params(config.init_from, target["params"])
  reference, _, _ = checkpoint.load_for_inference(ckpt)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(reference)):
    assert isinstance(a, jax.Array)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _rss_anon_mb():
  with open("/proc/self/status") as f:
    return int(f.read().split("RssAnon:")[1].split()[0]) / 1024


def test_sharded_checkpoint_converts_in_bounded_memory(tmp_path):
  """A 134 MB model in shards of up to 50 MB converts with < 40 MB of extra host memory."""
  import huggingface_hub

  hf_dir = str(tmp_path / "hf")
  config = transformers.LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
  with torch.device("meta"):  # HF's own tensor names and shapes, nothing allocated
    shapes = {n: p.shape for n, p in transformers.AutoModelForCausalLM.from_config(config).state_dict().items()}
  gen = torch.Generator().manual_seed(0)
  state = {n: 0.02 * torch.randn(shape, generator=gen) for n, shape in shapes.items()}  # faster than HF's init
  config.save_pretrained(hf_dir)
  huggingface_hub.save_torch_state_dict(state, hf_dir, max_shard_size="50MB")  # what save_pretrained shards with
  del state
  _write_tokenizer(hf_dir, 250)
  shards = [f for f in os.listdir(hf_dir) if f.endswith(".safetensors")]
  budget_mb = 40
  sizes = [os.path.getsize(os.path.join(hf_dir, f)) for f in shards]
  assert os.path.isfile(os.path.join(hf_dir, "model.safetensors.index.json")) and len(shards) >= 3
  assert max(sizes) > budget_mb * 2**20 and sum(sizes) > 3 * budget_mb * 2**20

  peak, stop = [0.0], threading.Event()

  def sample():  # anonymous memory only: the memmapped output is page cache the kernel can evict
    while not stop.is_set():
      peak[0] = max(peak[0], _rss_anon_mb())
      time.sleep(0.002)

  base = _rss_anon_mb()
  sampler = threading.Thread(target=sample, daemon=True)
  tracemalloc.start()
  sampler.start()
  try:
    from_hf.convert(hf_dir, str(tmp_path / "ckpt"))
  finally:
    stop.set()
    sampler.join()
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
  print(f"convert: numpy peak {traced_peak / 2**20:.1f} MB, RssAnon peak +{peak[0] - base:.1f} MB")
  assert traced_peak < budget_mb * 2**20
  assert peak[0] - base < budget_mb

  to_hf.export(str(tmp_path / "ckpt"), str(tmp_path / "back"), drop_mask_row=True, max_shard_gb=40 / 1024)
  index = json.load(open(tmp_path / "back" / "model.safetensors.index.json"))
  assert len(set(index["weight_map"].values())) >= 3
  original = {}
  for f in shards:
    original.update(load_file(os.path.join(hf_dir, f)))
  for name, file in index["weight_map"].items():
    np.testing.assert_array_equal(load_file(str(tmp_path / "back" / file))[name], original[name], err_msg=name)
  shutil.rmtree(tmp_path)  # ~400 MB, most of the suite's disk use (pytest keeps tmp dirs); kept when a check fails


@pytest.fixture
def hf_copy(hf, tmp_path):
  """A writable copy of the tiny Qwen2 HF dir (padded vocab: 100 tokenizer ids in 128 rows)."""
  shutil.copytree(hf["qwen2"][0], tmp_path / "hf")
  return tmp_path / "hf"


def _edit_config(hf_dir, **changes):
  cfg = json.load(open(hf_dir / "config.json"))
  cfg.update(changes)
  json.dump(cfg, open(hf_dir / "config.json", "w"))


def _base_config(**model):
  from configs import tiny

  config = tiny.get_config()
  config.model.update(dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                           qkv_bias=True, tie_embeddings=False, rope_theta=5000.0, norm_eps=1e-5, vocab_size=128))
  config.model.update(model)
  return config


def _drop_tensor(hf_dir, fragment):
  tensors = load_file(hf_dir / "model.safetensors")
  save_file({k: v for k, v in tensors.items() if fragment not in k}, hf_dir / "model.safetensors")


def _add_tensor(hf_dir, name, value):
  save_file({**load_file(hf_dir / "model.safetensors"), name: value}, hf_dir / "model.safetensors")


BAD_INPUTS = {  # name -> (how to break the Qwen2 dir, expected error, message pattern)
    "no_config": (lambda d: os.remove(d / "config.json"), FileNotFoundError, "no config.json"),
    "no_tokenizer": (lambda d: os.remove(d / "tokenizer.json"), FileNotFoundError, "no tokenizer.json"),
    "pytorch_bin_only": (lambda d: os.rename(d / "model.safetensors", d / "pytorch_model.bin"), FileNotFoundError,
                         "only safetensors checkpoints"),
    "unknown_model_type": (lambda d: _edit_config(d, model_type="mistral"), ValueError,
                           r"model_type='mistral'.*\['llama', 'qwen2', 'qwen3'\]"),
    "llama3_rope_without_its_parameters": (lambda d: _edit_config(d, rope_parameters=None, rope_theta=5e5,
                                                                  rope_scaling={"rope_type": "llama3", "factor": 8.0}),
                                           ValueError, "RoPE scaling 'llama3' needs 'low_freq_factor'"),
    "yarn_rope_parameters": (lambda d: _edit_config(d, rope_parameters={"rope_type": "yarn", "rope_theta": 5e3}),
                             ValueError, "'yarn'"),
    "sliding_window": (lambda d: _edit_config(d, use_sliding_window=True), ValueError, "use_sliding_window"),
    "gelu": (lambda d: _edit_config(d, hidden_act="gelu"), ValueError, "hidden_act='gelu'"),
    "config_vs_weights_shape": (lambda d: _edit_config(d, intermediate_size=96), ValueError,
                                r"mlp.down_proj.weight in .* has shape \[32, 64\] but "
                                r"the config implies \[32, 96\]"),
    "tokenizer_beyond_embedding": (lambda d: _edit_config(d, vocab_size=90), ValueError,
                                   "tokenizer uses ids up to 99 but the embedding has only 90"),
    "missing_tensor": (lambda d: _drop_tensor(d, "layers.1.mlp.up"), ValueError,
                       r"missing .*model.layers.1.mlp.up_proj.weight"),
    "unexpected_tensor": (lambda d: _add_tensor(d, "model.layers.0.mlp.up_proj.bias", np.zeros(64, np.float32)),
                          ValueError, "have no place .*up_proj.bias"),
}


@pytest.mark.parametrize("breakage, error, match", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_hf_input_is_refused_clearly(hf_copy, tmp_path, breakage, error, match):
  breakage(hf_copy)
  with pytest.raises(error, match=match):
    from_hf.convert(str(hf_copy), str(tmp_path / "ckpt"))
  assert not os.path.exists(tmp_path / "ckpt" / "params")


def test_sharded_index_with_missing_shard(hf_copy, tmp_path):
  tensors = load_file(hf_copy / "model.safetensors")
  names = sorted(tensors)
  for k, part in enumerate((names[:10], names[10:])):
    save_file({n: tensors[n] for n in part}, hf_copy / f"model-0000{k + 1}-of-00002.safetensors")
  json.dump({"weight_map": {n: f"model-0000{1 + (i >= 10)}-of-00002.safetensors" for i, n in enumerate(names)}},
            open(hf_copy / "model.safetensors.index.json", "w"))
  os.remove(hf_copy / "model.safetensors")
  from_hf.convert(str(hf_copy), str(tmp_path / "ok"))  # a sharded checkpoint converts
  os.remove(hf_copy / "model-00002-of-00002.safetensors")
  with pytest.raises(FileNotFoundError, match="lists shard model-00002-of-00002.safetensors, which is missing"):
    from_hf.convert(str(hf_copy), str(tmp_path / "ckpt"))


def test_full_disk_is_a_clear_error(hf, tmp_path, monkeypatch):
  """Too little free space, or a disk that fills while the scratch is allocated: an ENOSPC error that
  names --out and the space needed (not a SIGBUS crash from a sparse memmap), and nothing left behind."""
  hf_dir, real_usage = hf["qwen2"][0], shutil.disk_usage
  scratch = from_hf._disk_backed(str(tmp_path / "blocks"), (1000, 300), np.float32)
  assert os.stat(tmp_path / "blocks").st_blocks * 512 >= scratch.nbytes  # allocated now, not sparse
  monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1000))
  with pytest.raises(OSError, match=r"not enough disk space in --out=\S+/ckpt: converting needs about [\d.]+ GB"
                     r".*0\.00 GB is free") as e:
    from_hf.convert(hf_dir, str(tmp_path / "ckpt"))
  assert e.value.errno == errno.ENOSPC and os.listdir(tmp_path / "ckpt") == []
  monkeypatch.setattr(shutil, "disk_usage", real_usage)

  def disk_fills(fd, offset, length):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "posix_fallocate", disk_fills)
  with pytest.raises(OSError, match="not enough disk space in --out=") as e:
    from_hf.convert(hf_dir, str(tmp_path / "ckpt2"))
  assert e.value.errno == errno.ENOSPC and os.listdir(tmp_path / "ckpt2") == []


def test_config_mismatch_and_mask_room(hf, tmp_path):
  qwen2_dir, llama_dir = hf["qwen2"][0], hf["llama"][0]
  # --config describing another shape: every mismatching field is named.
  with pytest.raises(ValueError, match=r"model.d_model=64 but the checkpoint has 32(.|\n)*model.num_layers=3"):
    from_hf.convert(qwen2_dir, str(tmp_path / "a"), _base_config(d_model=64, num_layers=3))
  # Llama's tokenizer fills all 128 rows: a --config that pins 128 rows leaves no room for <|mask|>.
  llama_fields = dict(qkv_bias=False, head_dim=16, **families.rope_fields({"rope_parameters": LLAMA3_ROPE}))
  llama = _base_config(**llama_fields)
  with pytest.raises(ValueError, match=r"no room for the mask token: --config model.vocab_size=128 .* needs 131"):
    from_hf.convert(llama_dir, str(tmp_path / "b"), llama)
  with pytest.raises(ValueError, match="never drops trained rows"):
    from_hf.convert(llama_dir, str(tmp_path / "c"), _base_config(**llama_fields, vocab_size=100))
  # Rows beyond the need (e.g. a multiple of the tensor-parallel size) are fine; the config's
  # non-shape fields survive.
  config = from_hf.convert(llama_dir, str(tmp_path / "d"),
                           _base_config(**llama_fields, vocab_size=136, remat="full"))
  assert config.model.vocab_size == 136 and config.model.remat == "full" and config.model.dtype == "float32"
  with pytest.raises(ValueError, match="already holds a checkpoint"):
    from_hf.convert(llama_dir, str(tmp_path / "d"))


def test_cli(hf, tmp_path):
  """The absl entry points: success prints the training command; errors exit 2 with the message."""
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  ok = subprocess.run([sys.executable, "-m", "tidar_jax.convert.from_hf", f"--hf_dir={hf['qwen3'][0]}",
                       f"--out={tmp_path / 'ckpt'}"], capture_output=True, text=True, env=env, cwd=REPO)
  assert ok.returncode == 0, ok.stderr
  assert f"--config={tmp_path / 'ckpt'}/config.py" in ok.stdout
  bad = subprocess.run([sys.executable, "-m", "tidar_jax.convert.to_hf", f"--ckpt={tmp_path / 'nothing'}",
                        f"--out={tmp_path / 'hf'}"], capture_output=True, text=True, env=env, cwd=REPO)
  assert bad.returncode == 2 and "checkpoint directory not found" in bad.stderr
