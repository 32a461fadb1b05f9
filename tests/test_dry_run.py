"""`--dry_run`: parameter counts against the published models, per-device bytes on a hypothetical
64-chip fsdp mesh, parameter shardings, compiled memory numbers; nothing allocated."""

import importlib
import os
import re
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

from configs import tiny
from tidar_jax import dry_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (published parameter count, params whose dims have no "embed" axis, so fsdp does not split them)
PUBLISHED = {
    "1p5b": (1.54e9, 28 * (12 + 2 + 2) * 128),  # q/k/v biases [layers, heads, head_dim]
    "8b": (8.19e9, 36 * 2 * 128),  # q_norm/k_norm scales [layers, head_dim]
}


@pytest.mark.parametrize("name", ["1p5b", "8b"])
def test_counts_bytes_and_shardings_on_64_way_fsdp(name, capsys):
  config = importlib.import_module(f"configs.{name}").get_config()
  out = dry_run.report(config, (1, 64, 1), measure=False)
  printed = capsys.readouterr().out

  published, unsplit = PUBLISHED[name]
  count = out["param_count"]
  assert abs(count - published) / published < 0.01
  assert out["reference"]["relative_difference"] == 0  # the exact safetensors count
  assert f"{count:,}" in printed and out["reference"]["name"] in printed

  assert out["mesh_shape"] == (1, 64, 1) and out["hypothetical"] and out["per_device_batch"] == 512 // 64
  assert "data=1 fsdp=64 tensor=1 = 64 devices (hypothetical" in printed
  b = out["per_device_bytes"]
  assert b["params"] == 4 * ((count - unsplit) // 64 + unsplit)  # fp32, everything with an embed dim / 64
  assert 0 <= b["opt_state"] - 2 * b["params"] < 64  # Adam mu + nu, plus the step and count scalars
  assert b["batch"] == 8 * 4096 * 4
  assert b["activations_and_temporaries"] is None and b["total"] is None
  assert out["activations"]["method"] == "skipped"

  sh = out["shardings"]
  d_model = config.model.d_model
  assert sh["embed/embedding"]["spec"] == P("tensor", "fsdp")
  assert sh["embed/embedding"]["per_device_shape"] == (151936, d_model // 64)
  assert sh["layers/mlp/down/kernel"]["logical"] == ("layers", "mlp", "embed")
  assert sh["layers/mlp/down/kernel"]["per_device_shape"] == (config.model.num_layers, config.model.mlp_dim,
                                                              d_model // 64)
  assert re.search(rf"layers/attn/q/kernel +\(layers, embed, heads, head_dim\) +\(None, fsdp, tensor, None\) +"
                   rf"\({config.model.num_layers}, {d_model}, {config.model.num_heads}, 128\) +"
                   rf"\({config.model.num_layers}, {d_model // 64}, {config.model.num_heads}, 128\)", printed)
  if name == "8b":
    assert sh["lm_head/kernel"]["per_device_shape"] == (64, 151936)
  else:
    assert "lm_head/kernel" not in sh


def small_config():
  c = tiny.get_config()
  m = c.model
  m.vocab_size, m.d_model, m.num_layers, m.mlp_dim = 256, 32, 2, 64
  m.num_heads, m.num_kv_heads, m.head_dim = 4, 2, 8
  c.tidar.block_size = 4
  c.train.seq_len, c.train.batch_size = 16, 16
  return c


def test_larger_mesh_than_devices_is_extrapolated_from_a_stand_in(capsys):
  """16-way fsdp on 8 devices: compiled on an 8-way stand-in with the same per-device batch, its
  gradient buffer swapped for the target's; XLA's argument bytes match the analytic ones."""
  out = dry_run.report(small_config(), (1, 16, 1))
  printed = capsys.readouterr().out
  act = out["activations"]
  assert act["method"] == "extrapolated" and out["hypothetical"]
  measured = act["measured"]
  assert measured["mesh_shape"] == (1, 8, 1) and measured["global_batch"] == 8  # 1 sequence per device
  ma = measured["memory_analysis"]
  assert ma["argument_size_in_bytes"] == measured["analytic_argument_bytes"]
  b = out["per_device_bytes"]
  assert b["activations_and_temporaries"] == ma["temp_size_in_bytes"] - measured["grad_bytes"] + b["params"]
  assert b["params"] < measured["grad_bytes"] and b["activations_and_temporaries"] > 0
  assert b["total"] == sum(v for k, v in b.items() if k != "total")
  assert "stand-in mesh data=1 fsdp=8 tensor=1" in printed and "extrapolated:" in printed
  assert "XLA's argument bytes" in printed and "dense attention ('dense' on cpu)" in printed


def test_hypothetical_mesh_from_config_and_bad_fits():
  config = importlib.import_module("configs.8b").get_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 4, 16, 8  # explicit sizes beyond this machine
  out = dry_run.report(config, measure=False)
  assert out["mesh_shape"] == (4, 16, 8) and out["num_devices"] == 512 and out["hypothetical"]
  assert out["shardings"]["layers/attn/k/kernel"]["per_device_shape"] == (36, 256, 1, 128)  # 8 KV heads / 8
  with pytest.raises(ValueError, match=r"model.num_kv_heads=2 is smaller than mesh.tensor=4"):
    dry_run.report(importlib.import_module("configs.1p5b").get_config(), (1, 16, 4), measure=False)
  with pytest.raises(ValueError, match=r"train.batch_size=512 is not divisible by mesh.data=3 \* mesh.fsdp=1"):
    dry_run.report(importlib.import_module("configs.1p5b").get_config(), (3, 1, 1), measure=False)
  assert dry_run.parse_mesh("1,64,1") == (1, 64, 1) and dry_run.parse_mesh("") is None
  with pytest.raises(ValueError, match=r"--dry_run_mesh='1,64'.*data,fsdp,tensor"):
    dry_run.parse_mesh("1,64")


def test_cli_dry_run_1p5b():
  """The command a user types, on this machine's one CPU device: counts, memory, shardings, plan, verdict."""
  # the whole 80 GiB H100 as JAX's pool (the default 75% is tested below)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "XLA_PYTHON_CLIENT_MEM_FRACTION": "1.0"}
  result = subprocess.run([sys.executable, "-m", "tidar_jax.train", "--config=configs/1p5b.py", "--dry_run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "parameters: 1,543,714,304 (1.544B)" in out and "vs Qwen2.5-1.5B on Hugging Face" in out
  assert "mesh: data=1 fsdp=1 tensor=1 = 1 devices (on the current cpu devices)" in out
  assert re.search(r"params \(float32 master weights\) +5\.751 ", out)  # 1,543,714,304 * 4 bytes
  assert re.search(r"optimizer state \(AdamW mu, nu; float32\) +11\.502 ", out)
  assert re.search(r"activations \+ temporaries +[0-9.]+ +measured: XLA memory_analysis", out)
  assert re.search(r"check on the compiled mesh: XLA's argument bytes 17\.\d+ GiB = analytic", out)
  assert re.search(r"embed/embedding +\(vocab, embed\) +\(tensor, fsdp\) +\(151936, 1536\)", out)
  assert "--dry_run_mesh=1,64,1" in out
  assert "device h100 (gpu) 80.0 GiB (JAX's 100% pool of 80.0" in out
  # the shipped "auto" micro-batch on the 80 GiB device: 2 sequences (~54 GiB; 4 would need ~77)
  assert "batch plan: global 512 x 4096 = 1 device x micro 2 x accum 256 (auto: compiled at micro 1:" in out
  assert "attention compiled as 'flash_footprint'" in out and "in float16 for bfloat16 (same width)" in out
  assert re.search(r"one loss chunk's fp32 logits \[2, 1024, 151936\] 1\.159 GiB", out)
  assert re.search(r"^verdict: fits: [0-9.]+ GiB per device of 80\.0 GiB", out, re.M)


@pytest.fixture
def measured_once(monkeypatch):
  """Each (config, mesh, micro-batch) compiled once across the reports of one test: the compile is
  what a dry run measures, and it does not depend on the device size being asked about."""
  cache = {}
  real = dry_run._measure

  def cached(config, model_cfg, tx, abstract, rules, shape, per_device_batch, grad_accum, attention_impl):
    key = (model_cfg, tuple(shape), per_device_batch, grad_accum, attention_impl)
    if key not in cache:
      cache[key] = real(config, model_cfg, tx, abstract, rules, shape, per_device_batch, grad_accum, attention_impl)
    return cache[key]

  monkeypatch.setattr(dry_run, "_measure", cached)


def test_auto_micro_batch_fits_each_device_and_says_when_none_does(measured_once, capsys):
  """micro_batch_per_device="auto" on the dry run's numbers: the largest micro-batch whose compiled
  step fits 90% of the device, for 1p5b on one device of 139 and of 80 GiB, 8b over 8 devices (fsdp)
  of 80 and 139 GiB; 8b on one 80 GiB device does not fit even at 1 sequence: the verdict says so with
  the remedy (the trainer refuses: test_batch_plan). Each pair shares its mesh, so its compiles."""
  import math

  cfg_1p5b = importlib.import_module("configs.1p5b").get_config()
  cfg_8b = importlib.import_module("configs.8b").get_config()
  picks = {}
  for name, config, mesh, gb in (("1p5b", cfg_1p5b, (1, 1, 1), 139.0), ("1p5b", cfg_1p5b, (1, 1, 1), 80.0),
                                 ("8b", cfg_8b, (1, 8, 1), 80.0), ("8b", cfg_8b, (1, 8, 1), 139.0)):
    out = dry_run.report(config, mesh, device_gb=gb)
    plan, total = out["plan"], out["per_device_bytes"]["total"]
    assert out["fits"] and total <= 0.9 * gb * 2**30
    assert plan.micro_batch * plan.grad_accum * math.prod(mesh[:2]) == 512
    totals = _compiled_totals(capsys.readouterr().out)
    assert plan.micro_batch in totals and len(totals) >= 2
    assert all(b > 0.9 * gb for m, b in totals.items() if m > plan.micro_batch)  # nothing larger fitted
    picks[(name, gb)] = plan.micro_batch
  assert picks[("1p5b", 80.0)] < picks[("1p5b", 139.0)] and picks[("8b", 80.0)] < picks[("8b", 139.0)]
  out = dry_run.report(cfg_8b, (1, 1, 1), device_gb=80.0)
  assert out["fits"] is False and out["plan"].micro_batch == 1
  verdict = capsys.readouterr().out.strip().splitlines()[-1]
  assert re.fullmatch(r"verdict: does NOT fit: [0-9.]+ GiB per device of 80\.0 GiB \(budget 72\.000 GiB\); try "
                      r".*more devices on mesh\.fsdp.*", verdict)


def _compiled_totals(printed: str) -> dict[int, float]:
  """{micro-batch: GiB} from the plan line 'auto: compiled at micro 1: 51.393 GiB, micro 2: ...'."""
  line = [ln for ln in printed.splitlines() if ln.startswith("batch plan:")][-1]
  return {int(m): float(b) for m, b in re.findall(r"micro (\d+): ([0-9.]+) GiB", line)}


def test_tpu_target_reports_splash_and_the_mask_sparsity(capsys):
  """Sizing for a TPU chip from this machine: splash attention's memory modelled (no dense scores),
  the chip's HBM, and the share of the training mask's blocks a block-sparse kernel skips."""
  out = dry_run.report(importlib.import_module("configs.1p5b").get_config(), (1, 4, 1), measure=False,
                       device="tpu-v5p")
  printed = capsys.readouterr().out
  assert out["device_gb"] == 95.0 and out["compiled_attention"] == "flash_footprint"
  assert "device tpu-v5p (tpu) 95.0 GiB" in printed and "splash attention's memory, modelled" in printed
  assert "compiled on the CPU for a TPU in float16 for bfloat16 (same width)" in printed
  assert dry_run.cpu_standin_dtype("bfloat16") == "float16" and dry_run.cpu_standin_dtype("float32") == "float32"
  assert "training mask: 68.8% of its (512 x 512) (q, kv) blocks are empty" in printed
  m = dry_run.validate(importlib.import_module("configs.1p5b").get_config())
  assert dry_run._compiled_attention(m, "ar", "tpu") == "dense"  # splash takes only the TiDAR training mask
  assert dry_run._compiled_attention(m, "tidar", "gpu") == "flash_footprint"  # cuDNN's, modelled
  with pytest.raises(ValueError, match=r"--dry_run_device='tpu-v9': use one of"):
    dry_run.report(tiny.get_config(), measure=False, device="tpu-v9")


def test_a_named_gpu_is_sized_as_jax_pool_of_it(monkeypatch, capsys):
  """The trainer's auto rule sees JAX's allocator limit (75% of an H100's 80 GiB unless
  XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise), so the dry run for a named GPU budgets the same;
  an explicit --dry_run_device_gb and a TPU's HBM are taken as they are."""
  cfg = tiny.get_config()
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR", raising=False)
  assert dry_run.report(cfg, measure=False, device="h100")["device_gb"] == 60.0
  assert "device h100 (gpu) 60.0 GiB (JAX's 75% pool of 80.0" in capsys.readouterr().out
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  assert dry_run.report(cfg, measure=False, device="h200")["device_gb"] == pytest.approx(126.0)
  assert dry_run.report(cfg, measure=False, device="h200", device_gb=140.0)["device_gb"] == 140.0
  assert dry_run.report(cfg, measure=False, device="tpu-v5p")["device_gb"] == 95.0
  monkeypatch.setenv("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")
  assert dry_run.report(cfg, measure=False, device="h100")["device_gb"] == 80.0
  monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR")
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "75")
  with pytest.raises(ValueError, match=r"XLA_PYTHON_CLIENT_MEM_FRACTION='75': use a fraction in \(0, 1\]"):
    dry_run.report(cfg, measure=False, device="h100")
