"""AR decoder: greedy tokens == iterated argmax of the full uncached forward, EOS, padding, bad input.

The model, prompts and `max_new_tokens` here are shared with test_decode_tidar.py (which imports
them), so both files reuse the same compiled decoders within one pytest process.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax import dispatch, masks
from tidar_jax.config import ModelConfig
from tidar_jax.decode import loop
from tidar_jax.decode.ar import generate_ar
from tidar_jax.decode.sampling import SamplingParams
from tidar_jax.model import Transformer, init_variables

CFG = ModelConfig(vocab_size=48, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  mlp_dim=64, qkv_bias=True)
MASK_ID = CFG.vocab_size - 1
M_AR = 23  # AR runs here; test_decode_tidar.py decodes 15 tokens and uses 8 more as oracle drafts
PROMPT_LENGTHS = np.array([3, 9, 1, 14])  # one prompt bucket (16), different lengths in one batch
GREEDY = SamplingParams(temperature=0.0)
# Compilation is most of this module's time, the decoders then run for milliseconds: compiled without
# XLA's expensive backend optimisations (conftest.fast_compile), which change no program.
pytestmark = pytest.mark.usefixtures("fast_compile")


def random_params(cfg: ModelConfig, seed: int, std: float):
  """Random weights with a large std so logits are peaked and context dependent (init's 0.02 is
  ~uniform). Drawn with numpy into the abstract init shapes: compiling `init` costs seconds."""
  shapes = nn.unbox(jax.eval_shape(functools.partial(init_variables, cfg), jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if "scale" in jax.tree_util.keystr(path):  # RMSNorm gains
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def random_prompts(seed: int, lengths: np.ndarray, vocab: int, width: int = 16) -> np.ndarray:
  """[batch, width] right-padded with a junk id, so padding leaking into a row would show."""
  rng = np.random.default_rng(seed)
  prompts = rng.integers(0, vocab - 1, (len(lengths), width))
  return np.where(np.arange(width)[None, :] < lengths[:, None], prompts, vocab - 2)


def first_index(tokens: np.ndarray, value: int) -> np.ndarray:
  """[batch]: first column holding `value`, or the width if none."""
  hit = tokens == value
  return np.where(hit.any(1), hit.argmax(1), tokens.shape[1])


@pytest.fixture(scope="module")
def params():
  return random_params(CFG, seed=0, std=0.3)


@pytest.fixture(scope="module")
def prompts():
  return random_prompts(1, PROMPT_LENGTHS, CFG.vocab_size)


@jax.jit
def full_forward(params, seq):
  """Uncached causal forward over [batch, width] tokens at positions 0..width-1: (logits, K/V)."""
  width = seq.shape[1]
  pos = jnp.broadcast_to(jnp.arange(width)[None, :], seq.shape)
  return Transformer(CFG).apply(params, seq, pos, jnp.asarray(masks.causal_mask(width))[None])


def greedy_by_full_forward(params, prompts, lengths, steps: int) -> np.ndarray:
  """Iterated argmax of the uncached forward over the whole sequence so far: [batch, steps]."""
  seq = np.zeros((len(lengths), prompts.shape[1] + steps), np.int32)
  seq[:, : prompts.shape[1]] = prompts
  n = lengths.copy()
  out = []
  for _ in range(steps):
    logits = np.asarray(full_forward(params, seq)[0])  # [batch, width, vocab]
    tok = logits[np.arange(len(n)), n - 1].argmax(-1)
    seq[np.arange(len(n)), n] = tok
    n = n + 1
    out.append(tok)
  return np.stack(out, axis=1)


def test_greedy_equals_iterated_argmax_of_full_forward(params, prompts):
  out = generate_ar(params, CFG, prompts, PROMPT_LENGTHS, max_new_tokens=M_AR, sampling=GREEDY,
                    key=jax.random.key(0), eos_id=None)
  expected = greedy_by_full_forward(params, prompts, PROMPT_LENGTHS, M_AR)
  np.testing.assert_array_equal(out.tokens, expected)
  np.testing.assert_array_equal(out.lengths, M_AR)
  np.testing.assert_array_equal(out.stats.forward_passes, M_AR)  # prefill + one forward per further token


def test_tight_cache_holds_every_slot_and_is_padded_only_on_a_gpu(monkeypatch, params, prompts):
  """max_len = longest prompt + max_new_tokens + 1 exactly: the last step writes the last slot, and
  off the GPU the cache has exactly those slots (nothing past them to hide an overrun). On a GPU
  the allocation rounds up to the split-KV kernel's `dispatch.CACHE_ALIGN`."""
  tight = int(PROMPT_LENGTHS.max()) + M_AR + 1
  out = generate_ar(params, CFG, prompts, PROMPT_LENGTHS, max_new_tokens=M_AR, sampling=GREEDY,
                    key=jax.random.key(0), eos_id=None, max_len=tight)
  assert out.cache.max_len == dispatch.cache_slots(tight)
  np.testing.assert_array_equal(out.tokens, greedy_by_full_forward(params, prompts, PROMPT_LENGTHS, M_AR))
  if jax.default_backend() != "gpu":
    assert dispatch.cache_slots(tight) == tight
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert [dispatch.cache_slots(n) for n in (tight, 128, 129)] == [128, 128, 256]


def test_eos_ends_each_row_and_pads(params, prompts):
  full = np.asarray(generate_ar(params, CFG, prompts, PROMPT_LENGTHS, max_new_tokens=M_AR, sampling=GREEDY,
                                key=jax.random.key(0), eos_id=None).tokens)
  eos = int(full[0, 5])
  out = generate_ar(params, CFG, prompts, PROMPT_LENGTHS, max_new_tokens=M_AR, sampling=GREEDY,
                    key=jax.random.key(0), eos_id=eos)
  ends = np.minimum(first_index(full, eos) + 1, M_AR)  # the EOS is emitted, then the row stops
  assert ends[0] <= 6
  np.testing.assert_array_equal(out.lengths, ends)
  np.testing.assert_array_equal(out.stats.forward_passes, ends)
  cols = np.arange(M_AR)[None, :]
  np.testing.assert_array_equal(out.tokens, np.where(cols < ends[:, None], full, loop.PAD_TOKEN))


def test_any_of_several_stop_ids_ends_a_row(params, prompts):
  """eos_id as several ids (generate/evaluate pass every special token): a row ends at the first of any."""
  full = np.asarray(generate_ar(params, CFG, prompts, PROMPT_LENGTHS, max_new_tokens=M_AR, sampling=GREEDY,
                                key=jax.random.key(0), eos_id=None).tokens)
  stops = (int(full[0, 5]), int(full[2, 3]))
  out = generate_ar(params, CFG, prompts, PROMPT_LENGTHS, max_new_tokens=M_AR, sampling=GREEDY,
                    key=jax.random.key(0), eos_id=stops)
  ends = np.minimum(np.minimum(first_index(full, stops[0]), first_index(full, stops[1])) + 1, M_AR)
  assert ends[0] <= 6 and ends[2] <= 4
  np.testing.assert_array_equal(out.lengths, ends)
  cols = np.arange(M_AR)[None, :]
  np.testing.assert_array_equal(out.tokens, np.where(cols < ends[:, None], full, loop.PAD_TOKEN))


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt_lengths=np.array([3, 0, 1, 14])), r"prompt_lengths: prompt\(s\) \[1\] are empty"),
    (dict(max_len=20), r"max_len=20 is too small.*raise max_len to >= 38"),
    (dict(max_new_tokens=0), r"max_new_tokens=0"),
    (dict(eos_id=48), r"eos_id=48 lies outside the vocabulary"),
    (dict(eos_id=(3, 48)), r"eos_id=\(3, 48\) lies outside the vocabulary"),
    (dict(key=jax.random.split(jax.random.key(0), 3)), r"key must be one PRNG key or one per row"),
])
def test_bad_input_is_rejected_before_compiling(params, prompts, kwargs, match):
  args = dict(prompt_lengths=PROMPT_LENGTHS, max_new_tokens=M_AR, sampling=GREEDY, key=jax.random.key(0),
              eos_id=None) | kwargs
  with pytest.raises(ValueError, match=match):
    generate_ar(params, CFG, prompts, **args)


def test_out_of_vocab_prompt_token_is_rejected(params, prompts):
  bad = prompts.copy()
  bad[2, 0] = CFG.vocab_size
  with pytest.raises(ValueError, match=r"prompts\[2, 0\]=48 is not a token id"):
    generate_ar(params, CFG, bad, PROMPT_LENGTHS, max_new_tokens=M_AR, sampling=GREEDY, key=jax.random.key(0),
                eos_id=None)


def test_gpu_compiler_options_are_valid_xla_options():
  """XLA validates option names and enum values at compile time on any backend: a misspelt option or
  command-buffer type fails here, not first on a user's GPU."""
  loop_fn = jax.jit(lambda x: jax.lax.while_loop(lambda c: c < 10, lambda c: c + 1, x),
                    compiler_options=dispatch.GPU_COMPILER_OPTIONS)
  assert int(loop_fn(jnp.int32(0))) == 10
  with pytest.raises(Exception, match="WHIL"):  # the check is real: a bad enum value is rejected
    jax.jit(lambda x: x + 1, compiler_options={"xla_gpu_enable_command_buffer": "FUSION,WHIL"})(1.0)


@pytest.mark.parametrize("backend,xla_flags,expected", [
    ("gpu", "", True),
    ("gpu", "--xla_force_host_platform_device_count=8", True),
    ("gpu", "--xla_gpu_enable_command_buffer=", False),  # the user's own setting wins
    ("gpu", "--xla_gpu_graph_min_graph_size=5", False),
    ("cpu", "", False),
    ("tpu", "", False),
])
def test_gpu_compiler_options_only_on_gpu_and_not_over_user_flags(monkeypatch, backend, xla_flags, expected):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  monkeypatch.setenv("XLA_FLAGS", xla_flags)
  assert dispatch.use_gpu_compiler_options() is expected


def test_decode_compiled_with_gpu_options_gives_the_same_tokens(monkeypatch, params, prompts):
  """The GPU jit of the decoder (a separate compilation) runs and decodes the same tokens (here on CPU,
  where XLA accepts and ignores the GPU options; on a GPU, benchmarks.decode_latency times it)."""
  def run():
    return np.asarray(generate_ar(params, CFG, prompts, PROMPT_LENGTHS, max_new_tokens=M_AR, sampling=GREEDY,
                                  key=jax.random.key(0), eos_id=None).tokens)
  plain = run()
  monkeypatch.setattr(dispatch, "use_gpu_compiler_options", lambda: True)
  np.testing.assert_array_equal(run(), plain)


def test_decode_traced_inside_another_trace_uses_the_plain_jit(monkeypatch, params, prompts):
  """jax rejects compiler_options on a jit nested in an outer trace: the decoder then stages as a plain
  jit (the outer program's options apply) instead of failing."""
  monkeypatch.setattr(dispatch, "use_gpu_compiler_options", lambda: True)
  jaxpr = jax.make_jaxpr(lambda p: generate_ar(p, CFG, prompts, PROMPT_LENGTHS, max_new_tokens=M_AR,
                                               sampling=GREEDY, key=jax.random.key(0), eos_id=None).tokens)(params)
  assert jaxpr.out_avals[0].shape == (len(PROMPT_LENGTHS), M_AR)
