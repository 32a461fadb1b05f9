"""benchmarks/reproduce/ (issue 8): the --smoke reproduction trains AR-only and TiDAR with the
project's trainer on CPU, evaluates likelihood and decoding, and renders RESULTS.md (with or
without matplotlib); plus its argument checks. Training runs once for the module, compiled without XLA's expensive
backend optimisations (conftest.fast_compile): nearly all of a smoke run is compilation."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks.reproduce import cli, render, results, run

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  base = tmp_path_factory.mktemp("reproduce")
  out = base / "out"
  # A private data_dir: the corpus and tokenizer are prepared here, not in the user's cache.
  argv = ["--smoke", "--out-dir", str(out), "--runs", "ar,tidar", f"--config.data.data_dir={base / 'data'}"]
  cli.main(argv)
  runs = {name: json.loads((out / name / results.RESULT_FILE).read_text()) for name in ("ar", "tidar4")}
  return out, argv, runs


def test_smoke_runs_train_evaluate_and_decode(smoke):
  _, _, runs = smoke
  for name, r in runs.items():
    assert r["status"] == "done", (name, r.get("errors"))
    assert math.isfinite(r["likelihood"]["ar_nll"]), name
  ar, tidar = runs["ar"], runs["tidar4"]
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
  out, argv, runs = smoke
  text = (out / results.RESULTS_MD).read_text()
  rows = {}
  for line in text.splitlines():  # the first table is the results table
    if line.startswith("| "):
      rows.setdefault(line.split("|")[1].strip(), line)
  assert f"{runs['ar']['likelihood']['ar_nll']:.4f}" in rows["ar"]
  assert f"{runs['tidar4']['likelihood']['ar_nll']:.4f}" in rows["tidar4"]
  assert f"{runs['tidar4']['likelihood']['diffusion_loss']:.3f}" in rows["tidar4"]
  assert "## Issue 8 targets" in text and "## Acceptance length" in text
  # The exact command that produced each run, and the one that re-renders this file.
  command = cli.command_line(argv)
  assert command.startswith("python -m benchmarks.reproduce --smoke --out-dir")
  assert f"{command}    # -> ar/{results.RESULT_FILE}" in text
  assert f"{command}    # -> tidar4/{results.RESULT_FILE}" in text
  assert f"python -m benchmarks.reproduce --render {render._shown(str(out))}" in text
  if importlib.util.find_spec("matplotlib") is not None:
    for png in PNGS:
      assert (out / png).stat().st_size > 0 and f"]({png})" in text
  else:
    assert "(plots skipped:" in text and "pip install -e '.[bench]'" in text
    assert not any((out / png).exists() for png in PNGS)


PNGS = ("loss_curves.png", "tnfe_vs_block.png", "tokens_per_s.png")


def copy_results(out, to) -> None:
  for name in ("ar", "tidar4"):  # only the result files: no workdir, no metrics
    os.makedirs(to / name)
    (to / name / results.RESULT_FILE).write_text((out / name / results.RESULT_FILE).read_text())


def test_render_is_repeatable_from_the_json_alone(smoke, tmp_path):
  out, _, _ = smoke
  copy_results(out, tmp_path)
  text = render.render(str(tmp_path), with_plots=False)
  assert text == (tmp_path / results.RESULTS_MD).read_text()
  assert "| tidar4 | 4 |" in text and "## Plots" not in text


def test_render_without_matplotlib_names_the_extra(smoke, tmp_path, monkeypatch):
  """matplotlib is the `bench` extra: without it RESULTS.md is written all the same, saying how to
  get the plots."""
  copy_results(smoke[0], tmp_path)
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
  text = render.render(str(tmp_path))
  assert "(plots skipped: the reproduction's plots need matplotlib: pip install -e '.[bench]')" in text
  assert "## Plots" not in text and "| tidar4 | 4 |" in text
  assert not any((tmp_path / png).exists() for png in PNGS)


def test_module_command_renders(smoke, tmp_path):
  """`python -m benchmarks.reproduce --render DIR`, the command RESULTS.md and the README give."""
  copy_results(smoke[0], tmp_path)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.run([sys.executable, "-m", "benchmarks.reproduce", "--render", str(tmp_path)], cwd=root, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| tidar4 | 4 |" in (tmp_path / results.RESULTS_MD).read_text()


def test_parse_runs():
  assert run.parse_runs("ar,tidar", "", 8) == [("ar", "ar", 8), ("tidar8", "tidar", 8)]
  assert run.parse_runs("tidar,ar", "4,8,16", 8) == [("tidar8", "tidar", 8), ("ar", "ar", 8),
                                                     ("tidar4", "tidar", 4), ("tidar16", "tidar", 16)]
  for bad in ("ar8", "gpt", "tidar0", "", " , "):
    with pytest.raises(ValueError, match="--runs"):
      run.parse_runs(bad, "", 8)
  with pytest.raises(ValueError, match="--block-sizes"):
    run.parse_runs("ar", "x", 8)


def test_cli_flags_override_smoke_defaults():
  args, overrides = cli.parse_args(["--smoke", "--speed-prompts=0", "--config.train.steps=2"])
  assert args.speed_prompts == 0 and args.prompts == cli.SMOKE_ARGS["prompts"]
  assert overrides == {"train.steps": "2"}
  with pytest.raises(SystemExit):  # neither a flag nor a config override
    cli.parse_args(["--smoke", "--config-train-steps=2"])


def test_render_empty_dir_raises(tmp_path):
  with pytest.raises(ValueError, match=r"no \*/result.json"):
    render.render(str(tmp_path))
