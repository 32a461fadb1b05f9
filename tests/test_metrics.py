"""metrics.jsonl tells one history: a resumed run drops the lines past the step it resumes from."""

import json

from tidar_jax.metrics import MetricsWriter, read_jsonl


def _killed_run_log(path):
  """Steps 0-5 logged, then killed while writing step 6 (a torn last line)."""
  lines = [json.dumps({"step": s, "loss": 1.0 / (s + 1)}) for s in range(6)]
  path.write_text("\n".join(lines) + '\n{"step": 6, "lo')


def test_resume_drops_the_lines_past_the_restored_step(tmp_path):
  _killed_run_log(tmp_path / "metrics.jsonl")
  writer = MetricsWriter(str(tmp_path), keep_through=3)  # resumed from the step-3 checkpoint
  writer.write(4, {"loss": 0.5})
  writer.close()
  assert [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [0, 1, 2, 3, 4]


def test_fresh_start_drops_every_line(tmp_path):
  _killed_run_log(tmp_path / "metrics.jsonl")
  writer = MetricsWriter(str(tmp_path))  # no checkpoint to resume from: the run starts over at step 0
  writer.write(0, {"eval_ar_loss": 2.0})
  writer.close()
  records = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [(r["step"], "eval_ar_loss" in r) for r in records] == [(0, True)]


def test_other_processes_leave_the_file_alone(tmp_path):
  _killed_run_log(tmp_path / "metrics.jsonl")
  before = (tmp_path / "metrics.jsonl").read_text()
  MetricsWriter(str(tmp_path), enabled=False, keep_through=0).close()
  assert (tmp_path / "metrics.jsonl").read_text() == before
