"""Smoke test of benchmarks/: each benchmark runs one tiny iteration on CPU (`--smoke`), writes its
JSON and a markdown section, and renders again from the JSON, so the GPU benchmarks cannot rot.

The benchmarks run in one process in this order on purpose: the throughput and profile smoke runs
use the decoder shapes decode_latency compiled, and the profile traces the train state that
train_step left, so the whole file costs about two decoder and one train-step compilations.
"""

import json

import numpy as np
import pytest

from benchmarks import (common, config_loader, decode_latency, generate_throughput, input_pipeline,
                        predraft_throughput, profile_step, train_step)
from tidar_jax import flops


@pytest.fixture(scope="module")
def out(tmp_path_factory):
  return tmp_path_factory.mktemp("bench")


def run(module, out, name):
  path, md = str(out / f"{name}.json"), str(out / f"{name}.md")
  result = module.main(["--smoke", "--out", path, "--markdown", md])
  with open(path) as f:
    assert json.load(f)["meta"]["platform"]  # the JSON on disk is complete
  text = open(md).read()
  assert text.startswith(f"\n### {name}")
  module.main(["--render", path, "--markdown", md])  # re-rendering from the JSON alone
  assert open(md).read().count(f"### {name}") == 2
  return result


def test_decode_latency(out):
  result = run(decode_latency, out, "decode_latency")
  recs = {r["block_size"]: r for r in result["records"]}
  assert set(recs) == {0, 4}
  for r in recs.values():
    assert r["steps"] > 0 and r["steps_prefill_only"] == 0 and np.isfinite(r["ms_per_step"])
    assert r["roofline_ms"] > 0 and r["bytes_weights"] > 0
  assert recs[0]["steps"] == 9 - 1  # AR: one token per step after the prefill's
  assert recs[4]["tokens_per_step"] == 4.0  # forced drafts = the AR continuation: all accepted
  assert recs[4]["steps"] == 2 and "ratio_to_ar" in recs[4]


def test_generate_throughput(out):
  result = run(generate_throughput, out, "generate_throughput")
  ar, tidar = result["records"]
  assert ar["generated"] == tidar["generated"] == 9
  assert tidar["e2e_tokens_per_s"] > 0 and "speedup_decode" in tidar
  path, md = str(out / "throughput_int8.json"), str(out / "throughput_int8.md")
  int8 = generate_throughput.main(["--smoke", "--decode-quant", "int8", "--out", path, "--markdown", md])
  assert {r["decode_quant"] for r in int8["records"]} == {"int8"} and "AR, int8 weights" in open(md).read()


def test_predraft_throughput(out):
  """AR, full and pruned TiDAR under the mean-3 law: the drawn counts reach the decoder (about 3
  accepted drafts per full step), a pruned step feeds fewer tokens, and the ratios are to AR."""
  result = run(predraft_throughput, out, "predraft_throughput")
  recs = result["records"]
  assert [r["role"] for r in recs][:2] == ["AR", "all"] and {"best", "set"} <= {r["role"] for r in recs}
  full = recs[1]
  assert full["tokens_fed_per_step"] == 72 and full["tokens_per_step"] > 2.0  # mean-3 law (short run)
  for r in recs[2:]:
    assert r["tokens_fed_per_step"] == 8 + 8 * len(r["predraft"]) < 72
    assert r["tokens_per_s_ratio_to_ar"] > 0 and r["step_ratio_to_ar"] > 0
  assert "predicted_ratio_to_ar" in next(r for r in recs if r["role"] == "best")


def test_train_step(out):
  result = run(train_step, out, "train_step")
  (r,) = result["records"]
  assert r["objective"] == "tidar" and np.isfinite(r["loss"]) and r["step_s"] > 0
  step_flops = flops.train_step_flops(common.model_config("tiny"), 2, 32, "tidar", 8)
  assert r["model_tflop_per_step"] == pytest.approx(step_flops["total"] / 1e12)
  # MFU is against the device's own datasheet peak: a CPU is not in the table, so none is claimed.
  assert result["meta"]["peak_tflops"] is None and r["mfu_pct"] is None
  assert "no MFU" in open(out / "train_step.md").read()
  h200 = train_step.render({"meta": {"device": "NVIDIA H200", "peak_tflops": 989.0},
                            "records": [{**r, "mfu_pct": 41.25}]})
  assert "41.2%" in h200 and "989 TFLOP/s (NVIDIA H200 dense bf16 datasheet peak)" in h200
  assert "/unrolled" not in h200 and r["scan_layers"]  # tiny scans its layers; an unrolled run says so
  assert "| none/auto/unrolled |" in train_step.render({"meta": {}, "records": [{**r, "remat": "none",
                                                        "attention": "auto", "scan_layers": False}]})


def test_profile_step(out):
  result = run(profile_step, out, "profile_step")
  decode, train = result["profiles"]
  assert decode["per_step"]["kernel_us_total"] > 0 and decode["steps"] == 2
  assert train["step"]["kernel_us_total"] > 0 and train["step"]["by_part_us"]


@pytest.mark.parametrize("op_name, part", [
    ("jit(train_step)/jvp()/while/body/eval_jaxpr/reduce_max", "forward: LM head + loss"),  # the loss's chunk loop
    ("jit(train_step)/transpose(jvp())/while/body/eval_jaxpr/convert_element_type", "backward: LM head + loss"),
    ("jit(train_step)/jvp(Transformer)/while/body/jit(dynamic_update_index_in_dim)/dynamic_update_slice",
     "forward: layer-scan plumbing"),
    ("jit(train_step)/transpose(jvp(Transformer))/eval_jaxpr/layers/attn_norm/reduce_sum",
     "backward: norms, SwiGLU, residual (elementwise)"),
    ("jit(train_step)/jvp(Transformer)/eval_jaxpr/layers/mlp/mul", "forward (+remat): norms, SwiGLU, residual"),
])
def test_profile_step_train_parts(op_name, part):
  """A train-step kernel is charged to the part its op belongs to: the loss's chunk loop is not the
  layer scan (with unrolled layers it is the only while loop of the step)."""
  assert profile_step.categorize(op_name, "kernel", profile_step._TRAIN_PARTS) == part


def test_flop_and_byte_counts():
  """The shape arithmetic behind MFU and the roofline, against the real parameter count."""
  cfg = common.model_config("tiny")
  params = common.random_params(cfg, on_host=True)
  assert flops.count_params(cfg)["total"] == sum(x.size for x in __import__("jax").tree.leaves(params))
  c15 = flops.count_params(common.model_config("1p5b"))
  assert 1.50e9 < c15["total"] < 1.56e9  # Qwen2.5-1.5B: 1.54B
  c8 = flops.count_params(common.model_config("8b"))
  assert 8.1e9 < c8["total"] < 8.3e9  # Qwen3-8B: 8.19B
  # Decode flops grow with the tokens fed: a k=16 step feeds 272 tokens.
  c = common.model_config("1p5b")
  assert common.decode_step_flops(c, 1, 16, 100) > 200 * common.decode_step_flops(c, 1, 0, 100)


def test_step_attention(out):
  from benchmarks import step_attention
  result = run(step_attention, out, "step_attention")
  recs = [r for r in result["records"] if "us_per_layer" in r]
  assert {r["block_size"] for r in recs} == {2} and all(r["us_per_layer"] > 0 for r in recs)
  split = [r for r in recs if r["variant"].startswith("split-KV")]
  assert split and all(r["max_abs_err_layer0_vs_dense"] < 0.05 for r in split)  # bf16 rounding only


def test_step_matmuls(out):
  from benchmarks import step_matmuls
  result = run(step_matmuls, out, "step_matmuls")
  recs = [r for r in result["records"] if "us_per_matrix" in r]
  assert {r["matrix"] for r in recs} == {"q/k/v", "down"}  # the smoke run's two shapes
  assert {r["rows"] for r in recs} == {1, 20}  # --rows 1 and the smoke run's many-row step
  assert all(r["max_abs_err_vs_xla"] < 0.1 for r in recs)  # bf16 rounding of sums over <= 384 terms
  assert not [r for r in result["records"] if "error" in r]
  assert sum(r["variant"].startswith("Pallas small-row GEMM") for r in recs) == 4  # 2 shapes x 2 layouts, 20 rows


def test_config_loader():
  """One loader for every benchmark: a configs/ name or a file, overridden as config_flags would."""
  config = config_loader.load_config("configs/tiny.py")
  assert config == config_loader.load_config("tiny")
  config_loader.apply_overrides(config, {"train.steps": "7", "model.qk_norm": "true", "train.learning_rate": "1e-4",
                                         "data.dataset": "text_files", "tidar.block_size": 4,
                                         "model.scan_layers": False})
  assert (config.train.steps, config.model.qk_norm, config.train.learning_rate) == (7, True, 1e-4)
  assert (config.data.dataset, config.tidar.block_size, config.model.scan_layers) == ("text_files", 4, False)
  with pytest.raises(ValueError, match=r"--config.train.stepz=1: unknown field 'stepz'.*steps"):
    config_loader.apply_overrides(config, {"train.stepz": "1"})
  with pytest.raises(ValueError, match=r"--config.train.steps=many: invalid literal for int"):
    config_loader.apply_overrides(config, {"train.steps": "many"})
  with pytest.raises(ValueError, match=r"--config.trian.steps=1: unknown field 'trian'.*train"):
    config_loader.apply_overrides(config, {"trian.steps": "1"})
  assert config.train.steps == 7  # a failed override changes nothing
  with pytest.raises(FileNotFoundError, match="configs/nope.py"):
    config_loader.load_config("nope")
  assert config_loader.split_override_args(["--smoke", "--config.data.source=a=b", "--x"]) == (
      {"data.source": "a=b"}, ["--smoke", "--x"])
  # The decode benchmarks' ModelConfig overrides (None keeps the config's value).
  cfg = common.model_config("tiny", remat="full", attention=None, decode_quant="int8")
  assert (cfg.remat, cfg.decode_quant, cfg.attention) == ("full", "int8", common.model_config("tiny").attention)
  # Every benchmark's command line takes --config.<field>=value, applied before its own model flags.
  cfg = common.model_config("tiny", {"model.num_layers": "3", "model.decode_quant": "int8"}, remat="full")
  assert (cfg.num_layers, cfg.decode_quant, cfg.remat) == (3, "int8", "full")
  with pytest.raises(ValueError, match=r"--config.model.num_layerz=3: unknown field 'num_layerz'"):
    decode_latency.main(["--smoke", "--no-ceilings", "--config.model.num_layerz=3"])


def test_input_pipeline(out):
  """The trainer's own pipeline alone, timed after the batches its thread prepared during start-up."""
  result = run(input_pipeline, out, "input_pipeline")
  (r,) = result["records"]
  assert (r["num_workers"], r["batch"], r["seq_len"], r["batches"]) == (0, 8, 256, 3)
  assert r["tokens_per_s"] > 0 and r["first_batch_s"] > 0 and r["max_ms"] >= r["median_ms"]
  assert result["meta"]["host_cpus"] >= 1 and "8 x 256" in open(out / "input_pipeline.md").read()
