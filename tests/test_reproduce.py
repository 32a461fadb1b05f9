"""benchmarks/reproduce.py (issue 8): the --smoke reproduction trains AR-only and TiDAR with the
project's trainer on CPU, evaluates likelihood and decoding, and renders RESULTS.md; plus its
argument checks. Training runs once for the module, compiled without XLA's expensive backend
optimisations (conftest.fast_compile): nearly all of a smoke run is compilation."""

import importlib.util
import json
import math
import os

import pytest

from benchmarks import reproduce

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  base = tmp_path_factory.mktemp("reproduce")
  out = base / "out"
  # A private data_dir: the corpus and tokenizer are prepared here, not in the user's cache.
  argv = ["--smoke", "--out-dir", str(out), "--runs", "ar,tidar", f"--config.data.data_dir={base / 'data'}"]
  reproduce.main(argv)
  results = {name: json.loads((out / name / reproduce.RESULT_FILE).read_text()) for name in ("ar", "tidar4")}
  return out, argv, results


def test_smoke_runs_train_evaluate_and_decode(smoke):
  _, _, results = smoke
  for name, r in results.items():
    assert r["status"] == "done", (name, r.get("errors"))
    assert math.isfinite(r["likelihood"]["ar_nll"]), name
  ar, tidar = results["ar"], results["tidar4"]
  assert (ar["objective"], tidar["objective"], tidar["block_size"]) == ("ar", "tidar", 4)
  # Equal compute: same steps of the same batches; the configs differ only in the objective.
  assert ar["train"]["tokens_seen"] == tidar["train"]["tokens_seen"] == 3 * 8 * 32
  assert ar["compare_digest"] == tidar["compare_digest"]
  assert "diffusion_loss" not in ar["likelihood"]
  assert math.isfinite(tidar["likelihood"]["diffusion_loss"])

  held = tidar["decode"]["sets"]["held_out"]
  for sampling in ("greedy", "sample"):
    ti = held[sampling]["tidar"]
    assert ti["tokens_per_forward"] >= 1.0
    assert held[sampling]["ar"]["tokens_per_forward"] == 1.0  # one token per forward, prefill included
    assert sum(ti["accepted_hist"]) > 0 and len(ti["accepted_hist"]) == 4
    assert ti["generated_tokens"] > 0 and ti["tokens_per_s"] > 0
  cmp = held["greedy"]["compare"]
  assert cmp["rows"] == held["prompts"] == 4
  # The smoke decodes in float32, where TiDAR greedy must reproduce AR greedy token for token.
  assert tidar["decode"]["dtype"] == "float32"
  assert cmp["equal_rows"] == cmp["rows"], cmp
  assert set(tidar["decode"]["batch1"]) >= {"ar", "tidar", "speedup"}
  assert "tidar" not in ar["decode"]["sets"]["held_out"]["greedy"]  # the AR-only model has no draft head


def test_smoke_renders_results_md(smoke):
  out, argv, results = smoke
  text = (out / reproduce.RESULTS_MD).read_text()
  rows = {}
  for line in text.splitlines():  # the first table is the results table
    if line.startswith("| "):
      rows.setdefault(line.split("|")[1].strip(), line)
  assert f"{results['ar']['likelihood']['ar_nll']:.4f}" in rows["ar"]
  assert f"{results['tidar4']['likelihood']['ar_nll']:.4f}" in rows["tidar4"]
  assert f"{results['tidar4']['likelihood']['diffusion_loss']:.3f}" in rows["tidar4"]
  assert "## Issue 8 targets" in text and "## Acceptance length" in text
  # The exact command that produced each run, and the one that re-renders this file.
  command = reproduce.command_line(argv)
  assert command.startswith("python -m benchmarks.reproduce --smoke --out-dir")
  assert f"{command}    # -> ar/{reproduce.RESULT_FILE}" in text
  assert f"{command}    # -> tidar4/{reproduce.RESULT_FILE}" in text
  assert f"python -m benchmarks.reproduce --render {reproduce._shown(str(out))}" in text
  pngs = ("loss_curves.png", "tnfe_vs_block.png", "tokens_per_s.png")
  if importlib.util.find_spec("matplotlib") is not None:
    for png in pngs:
      assert (out / png).stat().st_size > 0 and f"]({png})" in text
  else:
    assert "(plots skipped:" in text and "pip install" in text
    assert not any((out / png).exists() for png in pngs)


def test_render_is_repeatable_from_the_json_alone(smoke, tmp_path):
  out, _, _ = smoke
  for name in ("ar", "tidar4"):  # only the result files: no workdir, no metrics
    os.makedirs(tmp_path / name)
    (tmp_path / name / reproduce.RESULT_FILE).write_text((out / name / reproduce.RESULT_FILE).read_text())
  text = reproduce.render(str(tmp_path), with_plots=False)
  assert text == (tmp_path / reproduce.RESULTS_MD).read_text()
  assert "| tidar4 | 4 |" in text and "## Plots" not in text


def test_parse_runs():
  assert reproduce.parse_runs("ar,tidar", "", 8) == [("ar", "ar", 8), ("tidar8", "tidar", 8)]
  assert reproduce.parse_runs("tidar,ar", "4,8,16", 8) == [("tidar8", "tidar", 8), ("ar", "ar", 8),
                                                           ("tidar4", "tidar", 4), ("tidar16", "tidar", 16)]
  for bad in ("ar8", "gpt", "tidar0", "", " , "):
    with pytest.raises(ValueError, match="--runs"):
      reproduce.parse_runs(bad, "", 8)
  with pytest.raises(ValueError, match="--block-sizes"):
    reproduce.parse_runs("ar", "x", 8)


def test_apply_overrides():
  config = reproduce.load_config("configs/tiny.py")
  reproduce.apply_overrides(config, {"train.steps": "7", "model.qk_norm": "true", "train.learning_rate": "1e-4",
                                     "data.dataset": "text_files", "tidar.block_size": 4})
  assert (config.train.steps, config.model.qk_norm, config.train.learning_rate) == (7, True, 1e-4)
  assert (config.data.dataset, config.tidar.block_size) == ("text_files", 4)
  with pytest.raises(ValueError, match="train.stepz"):
    reproduce.apply_overrides(config, {"train.stepz": "1"})
  with pytest.raises(ValueError, match=r"--config.train.steps='many'"):
    reproduce.apply_overrides(config, {"train.steps": "many"})
  with pytest.raises(ValueError, match="no section 'trian'"):
    reproduce.apply_overrides(config, {"trian.steps": "1"})


def test_cli_flags_override_smoke_defaults():
  args, overrides = reproduce.parse_args(["--smoke", "--speed-prompts=0", "--config.train.steps=2"])
  assert args.speed_prompts == 0 and args.prompts == reproduce.SMOKE_ARGS["prompts"]
  assert overrides == {"train.steps": "2"}


def test_render_empty_dir_raises(tmp_path):
  with pytest.raises(ValueError, match=r"no \*/result.json"):
    reproduce.render(str(tmp_path))
