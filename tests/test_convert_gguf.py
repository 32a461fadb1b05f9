"""GGUF import: tiny random Llama models written by `gguf.GGUFWriter` (F32, and Q8_0/Q4_1 as llama.cpp
quantizes SmolLM2), converted, against transformers' own GGUF loader on the same file."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from tidar_jax import checkpoint
from tidar_jax.config import ModelConfig, validate
from tidar_jax.model import Transformer

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")  # the [hf] extra: torch, transformers, accelerate
transformers = pytest.importorskip("transformers")

from tidar_jax.convert import families, from_gguf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, rope_theta=5000.0, rms_norm_eps=1e-5)
Q = gguf.GGMLQuantizationType
QUANTIZED = {"token_embd.weight": Q.Q8_0, "": Q.Q4_1}  # SmolLM2-135M-Instruct.Q4_1.gguf: norms stay F32
TO_GGUF = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _corpus() -> list[str]:
  """Lines of this repository's Python sources: code, with indentation, digits and punctuation."""
  lines = []
  for name in sorted(os.listdir(os.path.join(REPO, "tidar_jax"))):
    if name.endswith(".py"):
      lines += open(os.path.join(REPO, "tidar_jax", name), encoding="utf-8").read().splitlines()
  return lines


def _bpe(lines: list[str]) -> tuple[list[str], list[str]]:
  """(tokens in id order, merges) of a small byte-level BPE with <|endoftext|> but no <|mask|>."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
  model = json.loads(tok.to_str())["model"]
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  return [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])], merges


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf.py `permute` of q/k rows."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
  glob = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
  if hf in glob:
    return glob[hf]
  parts = hf.split(".")  # model.layers.{i}.{module...}.weight
  return f"blk.{parts[2]}.{TO_GGUF['.'.join(parts[3:-1])]}.weight"


def write_gguf(path, tensors: dict, tokens: list[str], merges: list[str], *, quantize=None, arch="llama",
               tokenizer_model="gpt2", pre="default", extra=None) -> None:
  """An HF Llama state dict (numpy) as llama.cpp writes it; `quantize`: GGUF name (or "" for every other
  2-D tensor) -> type."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_context_length(256)
  w.add_embedding_length(SHAPE["hidden_size"])
  w.add_feed_forward_length(SHAPE["intermediate_size"])
  w.add_block_count(SHAPE["num_hidden_layers"])
  w.add_head_count(SHAPE["num_attention_heads"])
  w.add_head_count_kv(SHAPE["num_key_value_heads"])
  w.add_rope_freq_base(SHAPE["rope_theta"])
  w.add_layer_norm_rms_eps(SHAPE["rms_norm_eps"])
  w.add_rope_dimension_count(SHAPE["head_dim"])
  w.add_tokenizer_model(tokenizer_model)
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_merges(merges)
  w.add_token_types([3] + [1] * (len(tokens) - 1))  # <|endoftext|> is a control token
  w.add_bos_token_id(0)
  w.add_eos_token_id(0)
  for hf, value in {**tensors, **(extra or {})}.items():
    name = _gguf_name(hf) if hf.startswith(("model.", "lm_head")) else hf
    if ".attn_q." in name or ".attn_k." in name:
      value = _permute(value, SHAPE["num_attention_heads" if ".attn_q." in name else "num_key_value_heads"])
    qtype = (quantize or {}).get(name, (quantize or {}).get("") if value.ndim == 2 else None)
    if qtype is None:
      w.add_tensor(name, np.ascontiguousarray(value))
    else:
      w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(value, np.float32), qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def _random_llama(vocab: int, tied: bool) -> dict[str, np.ndarray]:
  config = transformers.LlamaConfig(vocab_size=vocab, tie_word_embeddings=tied, initializer_range=0.2, **SHAPE)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config)
  with torch.no_grad():  # HF initialises norms to 1: perturb so a swapped mapping shows
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return {k: v.numpy().copy() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """name -> (GGUF path, converted checkpoint, vocabulary size): "f32" (untied) and "q4_1" (tied)."""
  root = tmp_path_factory.mktemp("gguf")
  tokens, merges = _bpe(_corpus())
  out = {}
  for name, tied, quantize in (("f32", False, None), ("q4_1", True, QUANTIZED)):
    path = root / f"{name}.gguf"
    write_gguf(path, _random_llama(len(tokens), tied), tokens, merges, quantize=quantize)
    from_gguf.convert(str(path), str(root / name))
    out[name] = (path, str(root / name), len(tokens))
  return out


def _transformers_model(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


def _logits(ckpt: str, tokens: np.ndarray) -> np.ndarray:
  params, config, _ = checkpoint.load_for_inference(ckpt)
  cfg = ModelConfig(**{**config.model.to_dict(), "dtype": "float32"})
  T = tokens.shape[1]
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], tokens.shape)
  return np.asarray(Transformer(cfg).apply(params, jnp.asarray(tokens), positions,
                                           jnp.tril(jnp.ones((1, T, T), bool)))[0])


@pytest.mark.parametrize("name", ["f32", "q4_1"])
def test_logits_match_transformers_gguf_loader(files, name):
  path, ckpt, vocab = files[name]
  tokens = np.random.RandomState(0).randint(0, vocab, (2, 16))
  with torch.no_grad():
    want = _transformers_model(path)(torch.tensor(tokens)).logits.numpy()  # [2, 16, vocab]
  got = _logits(ckpt, tokens)
  assert got.shape[-1] == vocab + 2  # <|pad|>, <|mask|> appended (<|endoftext|> is in the file)
  np.testing.assert_allclose(got[..., :vocab], want, atol=1e-4, rtol=0)


def test_quantized_params_are_exactly_the_dequantized_tensors(files):
  """Every param equals transformers' dequantized (and q/k un-permuted) tensor bit for bit, in our layout."""
  path, ckpt, vocab = files["q4_1"]
  want = {k: v.numpy() for k, v in _transformers_model(path).state_dict().items()}
  params = checkpoint.load_params(ckpt)["params"]
  _, config, _ = checkpoint.load_for_inference(ckpt)
  m = ModelConfig(**config.model.to_dict())
  assert m.tie_embeddings and config.hf.model_type == "llama"
  checked = 0
  for i in range(m.num_layers):
    for t in families.FAMILIES["llama"].layer_tensors:
      ours = np.asarray(params["layers"][t.path[0]][t.path[1]][t.path[2]] if len(t.path) == 3
                        else params["layers"][t.path[0]][t.path[1]])[i]
      np.testing.assert_array_equal(ours, want[families.LAYER.format(i=i) + t.hf].T.reshape(ours.shape), t.hf)
      checked += 1
  np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"])[:vocab], want["model.embed_tokens.weight"])
  np.testing.assert_array_equal(np.asarray(params["final_norm"]["scale"]), want["model.norm.weight"])
  assert checked == 18


def test_checkpoint_trains_from_its_config(files):
  """CKPT/config.py is what `train --config=CKPT/config.py` loads: it validates and points at CKPT."""
  _, ckpt, vocab = files["f32"]
  import importlib.util
  spec = importlib.util.spec_from_file_location("gguf_config", os.path.join(ckpt, "config.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  m = validate(config)
  assert config.init_from == ckpt and config.data.tokenizer == os.path.join(ckpt, "tokenizer.json")
  assert (m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.mlp_dim, m.rope_theta, m.vocab_size,
          m.tie_embeddings) == (2, 64, 4, 2, 128, 5000.0, vocab + 2, False)


@pytest.mark.parametrize("pre", ["default", "llama-bpe"])
def test_tokenizer_encodes_and_decodes_like_transformers(tmp_path, pre):
  lines = _corpus()
  tokens, merges = _bpe(lines)
  path = tmp_path / "tok.gguf"
  write_gguf(path, {}, tokens, merges, pre=pre)
  ours = from_gguf.gguf_tokenizer(from_gguf.open_gguf(str(path)))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
  rng = np.random.RandomState(0)
  strings = [lines[i] for i in rng.choice(len(lines), 250, replace=False)] + [
      "naïve café — 東京 😀", "  two  spaces\tand\ttabs\n\n", "1234567 + 89 = 1234656", "x<|endoftext|>y"]
  for s in strings:
    ids = ours.encode(s, add_special_tokens=False).ids
    assert ids == theirs.encode(s, add_special_tokens=False), s
    assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids) == s


def _write(tmp_path, **kwargs):
  tokens, merges = _bpe(_corpus()[:300])
  path = tmp_path / "m.gguf"
  write_gguf(path, kwargs.pop("tensors", None) or _random_llama(len(tokens), True), tokens, merges, **kwargs)
  return str(path), len(tokens)


BAD_INPUTS = {  # name -> (GGUF writer arguments, or a file's bytes; expected error; message pattern)
    "missing_file": (None, FileNotFoundError, "no such file"),
    "not_gguf": (b"PK\x03\x04 not a gguf", ValueError, "is not a readable GGUF file"),
    "unknown_architecture": (dict(arch="gpt2"), ValueError, r"general.architecture='gpt2' is not supported"),
    "unsupported_type": (dict(extra={"model.layers.0.mlp.up_proj.weight": np.zeros((128, 64), np.int32)}), ValueError,
                         r"tensor blk.0.ffn_up.weight \(I32\) has an unsupported type"),
    "sentencepiece_vocab": (dict(tokenizer_model="llama"), ValueError, "tokenizer.ggml.model='llama'"),
    "unknown_pre_tokenizer": (dict(pre="mystery"), ValueError, "tokenizer.ggml.pre='mystery'"),
}


@pytest.mark.parametrize("kind, error, match", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_gguf_input_is_refused_clearly(tmp_path, kind, error, match):
  path = str(tmp_path / "m.gguf")
  if isinstance(kind, bytes):
    open(path, "wb").write(kind)
  elif kind is not None:
    path, _ = _write(tmp_path, **kind)
  with pytest.raises(error, match=match) as e:
    from_gguf.convert(path, str(tmp_path / "ckpt"))
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "ckpt" / "params")


def test_no_room_for_the_mask_token(tmp_path):
  path, vocab = _write(tmp_path)
  from configs import tiny
  config = tiny.get_config()
  config.model.vocab_size = vocab  # the file's rows: none left for <|pad|> and <|mask|>
  with pytest.raises(ValueError, match=f"no room for the mask token: --config model.vocab_size={vocab}"):
    from_gguf.convert(path, str(tmp_path / "ckpt"), config)


def test_cli_reports_a_missing_file_in_one_line(tmp_path):
  run = subprocess.run([sys.executable, "-m", "tidar_jax.convert.from_gguf", f"--gguf={tmp_path}/none.gguf",
                        f"--out={tmp_path}/ckpt"], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 2 and run.stderr.strip().splitlines() == [
      f"error: --gguf={tmp_path}/none.gguf: no such file; pass a llama.cpp .gguf model file"]
