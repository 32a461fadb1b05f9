"""benchmarks.continual_report: the tables come from the files the runs wrote (their formats as the
trainer, `tidar_jax.evaluate` and `benchmarks.acceptance_curve` write them), and a missing file
leaves its table out instead of failing."""

import json

from benchmarks import continual_report


def _write(folder, name, obj):
  path = folder / name
  if name.endswith(".jsonl"):
    path.write_text("".join(json.dumps(r) + "\n" for r in obj))
  else:
    path.write_text(json.dumps(obj))


def _run_metrics(eval_losses, tidar):
  rows = []
  for i, loss in enumerate(eval_losses):
    step = 100 * i
    ev = {"step": step, "eval_ar_loss": loss}
    if tidar:
      ev["eval_diffusion_loss"] = loss + 1
    rows.append(ev)
    if step:
      rows.append({"step": step, "ar_loss": loss + 0.1, "loss": loss, "tokens_per_s": 1000.0 * i, "mfu": 0.1 * i,
                   **({"diffusion_loss": loss + 1.1} if tidar else {})})
  return rows


def _decoder(mode, tps, hist=None):
  r = {"mode": mode, "tokens_per_forward": 1.0 if hist is None else 2.5, "tokens_per_s": tps}
  if hist is not None:
    r["accepted_hist"] = hist
  return r


def test_report_tables_from_run_files(tmp_path):
  _write(tmp_path, "metrics_ar.jsonl", _run_metrics([1.5, 1.2, 1.1], tidar=False))
  _write(tmp_path, "metrics_tidar8.jsonl", _run_metrics([1.5, 1.25, 1.15], tidar=True))
  for lr, loss in (("3e-5", 1.4), ("1e-4", 1.3), ("3e-4", 1.35)):
    _write(tmp_path, f"sweep_{lr}.jsonl", [{"step": 0, "eval_ar_loss": 1.5, "eval_diffusion_loss": 9.0},
                                           {"step": 50, "eval_ar_loss": loss, "eval_diffusion_loss": 2.0}])
  _write(tmp_path, "nll_base.json", {"ar_nll": 1.5})
  _write(tmp_path, "nll_ar.json", {"ar_nll": 1.1})
  _write(tmp_path, "nll_tidar8.json", {"ar_nll": 1.15, "diffusion_loss": 2.15})
  _write(tmp_path, "he_ar.json", {"pass_at_1": {"greedy": {"ar": 0.125}}})
  hist = [5, 0, 1, 0, 0, 0, 0, 4]
  _write(tmp_path, "he_tidar8.json", {
      "block_size": 8, "decoders": ["ar", "tidar"], "pass_at_1": {"greedy": {"ar": 0.1, "tidar": 0.1}},
      "decoding": {"greedy": {"batch1": {"ar": _decoder("ar", 100.0), "tidar": _decoder("tidar", 250.0, hist),
                                         "speedup": 2.5, "greedy_agreement": {"equal_rows": 163, "rows": 164}}}}})
  _write(tmp_path, "acceptance_curve.json", {
      "meta": {"device": "cpu"}, "run": {"block_size": 8, "prompts": 4, "max_new_tokens": 8, "batch": 2,
                                          "dtype": "float32", "clean_tokens_per_step": 65536},
      "records": [{"step": 0, "clean_tokens": 0, "tokens_per_forward": 1.01, "accepted_hist": hist},
                  {"step": 200, "clean_tokens": 200 * 65536, "tokens_per_forward": 2.5, "accepted_hist": hist,
                   "eval_ar_loss": 1.15}]})

  text = continual_report.main([str(tmp_path), "--no-plots"])
  sweep = text.split("### LR sweep")[1].split("###")[0]
  assert "| 1e-4 | 50 | 1.5000 | 1.3000 | 2.0000 | 3.3000 |" in sweep
  assert sweep.index("| 3e-5 ") < sweep.index("| 1e-4 ") < sweep.index("| 3e-4 ")  # in LR order
  train = text.split("### Training")[1].split("###")[0]
  assert "| ar | 200 | 13.1 | 2000 | 20.0% |" in train  # median of the logged intervals after the first
  assert "1.5000 → 1.1000" in train and "1.5000 → 1.1500" in train
  quality = text.split("### Quality")[1].split("###")[0]
  assert "| AR-continued | 1.1000 |  | ar 0.125 |" in quality and "T=0.8" not in quality  # none sampled
  assert "| TiDAR (tidar8) | 1.1500 | 2.1500 | ar 0.100, tidar 0.100 |" in quality
  decoding = text.split("### HumanEval decoding, TiDAR model (bf16)")[1]
  assert "| greedy | 1 | tidar | 2.50 | 250 | 2.50x | 163/164 | 5 0 1 0 0 0 0 4 |" in decoding
  assert "fp32" not in text and "### Train step" not in text  # no such files: no tables
  assert "| 200 | 13.1 | 2.500 | 1.15 |" in text.split("### T/NFE vs tokens trained")[1]


def test_quality_falls_back_to_the_trainers_evals(tmp_path):
  """Without `evaluate --task=nll` files, the NLL column comes from the runs' own validation evals:
  the base model from the step-0 eval, each continued model from its last, marked as such."""
  _write(tmp_path, "metrics_ar.jsonl", _run_metrics([1.5, 1.2, 1.1], tidar=False))
  _write(tmp_path, "metrics_tidar8.jsonl", _run_metrics([1.5, 1.25, 1.15], tidar=True))
  _write(tmp_path, "nll_ar.json", {"ar_nll": 1.05})  # a file, where present, wins
  _write(tmp_path, "he_ar.json", {"pass_at_1": {"greedy": {"ar": 0.125}, "t0.8": {"ar": 0.0625}}})
  quality = continual_report.quality_table(str(tmp_path), "tidar8")
  assert "| AR-continued | 1.0500 |  | ar 0.125 | ar 0.062 |" in quality  # a sampled model: the T=0.8 column
  assert "| base (before continual pretraining) | 1.5000 (trainer) |  |" in quality
  assert "| AR-continued | 1.0500 |  |" in quality
  assert "| TiDAR (tidar8) | 1.1500 (trainer) | 2.1500 (trainer) |" in quality
