"""`tidar_jax.generate`: library API and CLI on a random tiny model exported with a real tokenizer."""

import pytest
from absl import app, flags

from tiny_checkpoint import save_tiny
from tidar_jax import checkpoint, predraft
from tidar_jax import generate as gen

TEXTS = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n", "x = [1, 2, 3]\n"]
PROMPTS = ["def add(a, b):", "x", "for i in range(10):\n    print("]  # three lengths, batches of 2
NEW = 10
# Compilation is most of this module's time, the decoders then run for milliseconds: compiled without
# XLA's expensive backend optimisations (conftest.fast_compile), which change no program.
pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
  return save_tiny(str(tmp_path_factory.mktemp("export")), TEXTS)


@pytest.fixture(scope="module")
def loaded(export_dir):
  return checkpoint.load_for_inference(export_dir)


def test_library_greedy_tidar_equals_ar(loaded):
  params, config, tokenizer = loaded
  runs = {mode: gen.generate(params, config, PROMPTS, tokenizer, mode=mode, max_new_tokens=NEW, batch_size=2)
          for mode in gen.MODES}
  for ar, tidar, prompt in zip(runs["ar"], runs["tidar"], PROMPTS):
    assert ar.prompt == tidar.prompt == prompt  # results come back in prompt order
    assert ar.tokens == tidar.tokens and ar.text == tidar.text
    assert 1 <= len(tidar.tokens) <= NEW and tidar.forward_passes <= ar.forward_passes == len(ar.tokens)
    ids = ar.tokens[:-1] if ar.tokens[-1] in tokenizer.special_ids() else ar.tokens
    assert ar.text == tokenizer.decode(ids)
    assert len(tidar.accepted_hist) == config.tidar.block_size
    assert sum(tidar.accepted_hist) == tidar.forward_passes - 1
  line = gen.summary(runs["tidar"])
  assert line.startswith("[tidar] tokens=") and "T/NFE=" in line and "tokens/s=" in line


def test_rows_end_at_every_special_token(loaded, monkeypatch):
  """Both decoders are asked to end a row at any special token, not EOS alone (a chat model's <|im_end|>)."""
  params, config, tokenizer = loaded
  asked = {}

  def recording(name):
    real = getattr(gen, name)

    def decode(*args, **kwargs):
      asked[name] = kwargs["eos_id"]
      return real(*args, **kwargs)
    return decode

  for name in ("generate_ar", "generate_tidar"):
    monkeypatch.setattr(gen, name, recording(name))
  for mode in gen.MODES:
    gen.generate(params, config, PROMPTS[:1], tokenizer, mode=mode, max_new_tokens=2, batch_size=1)
  assert asked == {"generate_ar": tokenizer.special_ids(), "generate_tidar": tokenizer.special_ids()}
  assert tokenizer.eos_id in tokenizer.special_ids() and tokenizer.mask_id in tokenizer.special_ids()


def test_library_predraft_sets_and_auto_keep_greedy_identity(loaded, caplog):
  """A pruned set and "auto" (first batch with every block, then the set best_counts picks from its
  acceptance at this batch size) decode exactly greedy AR; the sets used are in the results, and auto
  says so when even its set is predicted slower than AR."""
  params, config, tokenizer = loaded
  k = config.tidar.block_size
  ar = gen.generate(params, config, PROMPTS, tokenizer, mode="ar", max_new_tokens=NEW, batch_size=1)
  pruned = gen.generate(params, config, PROMPTS, tokenizer, max_new_tokens=NEW, batch_size=1, predraft="0,2")
  auto = gen.generate(params, config, PROMPTS, tokenizer, max_new_tokens=NEW, batch_size=1, predraft="auto")
  for run in (pruned, auto):
    assert [r.tokens for r in run] == [r.tokens for r in ar]
  assert all(r.predraft == [0, 2] for r in pruned) and "pruned_predraft=[[0, 2]]" in gen.summary(pruned)
  # batches run shortest prompt first: the first one decoded with every block measured the acceptance
  first = min(range(len(PROMPTS)), key=lambda i: len(tokenizer.encode(PROMPTS[i])))
  assert auto[first].predraft == list(range(k))
  chosen, gain = predraft.best_counts(auto[first].accepted_hist, 1)
  assert all(r.predraft == list(chosen) for i, r in enumerate(auto) if i != first)
  assert ("--mode=ar decodes faster here" in caplog.text) == (gain < 1)


def test_library_rejects_bad_input(loaded):
  params, config, tokenizer = loaded
  with pytest.raises(ValueError, match=r"prompts \[1\] encode to no tokens"):
    gen.generate(params, config, ["x", ""], tokenizer)
  with pytest.raises(ValueError, match=r"mode='fast'"):
    gen.generate(params, config, ["x"], tokenizer, mode="fast")
  with pytest.raises(ValueError, match=r"max_len=8 is too small"):
    gen.generate(params, config, ["x"], tokenizer, max_new_tokens=NEW, max_len=8)
  with pytest.raises(ValueError, match=r"tidar.predraft=\(9,\)"):
    gen.generate(params, config, ["x"], tokenizer, predraft="9")


def cli(*args: str) -> flags.FlagValues:
  fv = flags.FlagValues()
  gen.define_flags(fv)
  fv(["generate", *args])
  return fv


def test_cli_both_checks_greedy_identity(export_dir, capsys):
  prompt_flags = [f"--prompt={p}" for p in PROMPTS]
  assert gen.run(cli(f"--checkpoint={export_dir}", *prompt_flags, "--mode=both", f"--max_new_tokens={NEW}",
                     "--batch_size=2")) == 0
  out = capsys.readouterr().out
  assert "both: greedy outputs identical (TiDAR == AR token for token on all 3 prompts, in float32)" in out
  for mode in gen.MODES:
    assert f"[{mode}] tokens=" in out and out.count(f"=== [{mode}] prompt") == 3


def test_cli_int8_decode_weights_keep_the_greedy_identity(export_dir, capsys):
  assert gen.run(cli(f"--checkpoint={export_dir}", f"--prompt={PROMPTS[0]}", "--mode=both", "--decode_quant=int8",
                     f"--max_new_tokens={NEW}", "--batch_size=1")) == 0
  out = capsys.readouterr().out
  assert "both: greedy outputs identical (TiDAR == AR token for token on all 1 prompts, in float32)" in out


def test_cli_reads_a_prompts_file(export_dir, tmp_path, capsys):
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("def add(a, b):\n\nx\n")
  assert gen.run(cli(f"--checkpoint={export_dir}", f"--prompts_file={prompts_file}", "--mode=ar",
                     f"--max_new_tokens={NEW}", "--batch_size=2")) == 0
  out = capsys.readouterr().out
  assert out.count("=== [ar] prompt") == 2


@pytest.mark.parametrize("args,match", [
    (["--prompt=x", "--top_p=1.5"], r"--top_p must be in \(0, 1\] \(1 = off\), got 1.5; pass e.g. --top_p=0.9"),
    (["--prompt=x", "--temperature=-1"], r"--temperature must be a finite number >= 0"),
    ([], r"no prompts"),
    (["--prompt=x", "--prompt="], r"--prompt is empty \(prompt 1\)"),
    (["--prompt=x", "--max_new_tokens=0"], r"--max_new_tokens=0: must be at least 1"),
    (["--prompt=x", "--batch_size=-1"], r"--batch_size=-1: must be at least 1"),
])
def test_cli_bad_flags_are_usage_errors(export_dir, args, match):
  with pytest.raises(app.UsageError, match=match):
    gen.run(cli(f"--checkpoint={export_dir}", *args))


def _result(tokens):
  return gen.GenerationResult("p", "", tokens, len(tokens), [len(tokens)], 0.0, "ar")


def test_greedy_verdict_names_the_dtype_and_the_exact_check():
  same, other = [_result([1, 2]), _result([3])], [_result([1, 2]), _result([4])]
  assert gen.greedy_verdict(same, same, "float32") == (
      0, "both: greedy outputs identical (TiDAR == AR token for token on all 2 prompts, in float32)")
  code, line = gen.greedy_verdict(same, other, "bfloat16")
  assert code == 1 and line == ("both: greedy MISMATCH: TiDAR differs from AR on prompts [1] (compared in bfloat16, "
                                "whose rounding can split the two where the top two logits nearly tie; "
                                "--dtype=float32 is the token-exact check)")
  line = gen.greedy_verdict(same, same, "bfloat16")[1]
  assert line.endswith("on all 2 prompts, in bfloat16; --dtype=float32 is the token-exact check)")


def test_cli_warns_that_greedy_ignores_top_k_and_top_p(tmp_path, capsys):
  with pytest.raises(FileNotFoundError):  # the warning comes before the checkpoint is read
    gen.run(cli(f"--checkpoint={tmp_path / 'none'}", "--prompt=x", "--top_k=5", "--top_p=0.9"))
  assert capsys.readouterr().err == ("warning: --temperature=0 decodes greedily, so --top_k/--top_p change nothing; "
                                     "pass --temperature>0 (e.g. 0.8) to sample with them\n")


def test_cli_dtype_overrides_the_checkpoint_compute_dtype(export_dir, monkeypatch):
  seen = []
  monkeypatch.setattr(gen, "generate", lambda params, config, *a, **k: seen.append(config.model.dtype) or [])
  monkeypatch.setattr(gen, "summary", lambda results: "")
  gen.run(cli(f"--checkpoint={export_dir}", "--prompt=x", "--mode=ar", "--dtype=bfloat16"))
  assert seen == ["bfloat16"]
