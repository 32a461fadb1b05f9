"""DIR/*/result.json -> DIR/RESULTS.md: the results table, the issue's targets judged from the
measured numbers, acceptance histograms, other prompt sets, errors, the plots (`plots`) and the
command lines that produced it all. Reads only the result files (and metrics.jsonl for the plots)."""

from __future__ import annotations

import datetime
import os
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.reproduce.results import NOTES_MD, PROGRAM, RESULT_FILE, RESULTS_MD, load_results, log, lookup


def render(out_dir: str, with_plots: bool = True) -> str:
  """DIR/*/result.json -> DIR/RESULTS.md (+ loss_curves.png, tnfe_vs_block.png, tokens_per_s.png)."""
  results = load_results(out_dir)
  if not results:
    raise ValueError(f"--render {out_dir}: no */{RESULT_FILE} there; run some --runs first")
  baseline_r = next((r for r in results if r["objective"] == "ar"), None)
  baseline = summarize(baseline_r, None) if baseline_r else None
  summaries = [summarize(r, baseline) for r in results]
  lines = [*_header(results, summaries, out_dir), *_results(results, summaries), *_targets(summaries)]
  notes = os.path.join(out_dir, NOTES_MD)
  if os.path.exists(notes):  # the person who ran it explains the numbers; kept across re-renders
    with open(notes) as f:
      lines += ["## Reading the numbers", "", f.read().strip(), ""]
  lines += [*_acceptance(results), *_other_prompt_sets(results), *_errors(results)]
  if with_plots:
    lines += _plots(results, summaries, out_dir)
  lines += ["## Commands", "", "Each run's numbers come from its own command (one process per run):", "", "```bash"]
  lines += [f"{r['command']}    # -> {r['run']}/{RESULT_FILE}" for r in results]
  lines += [f"{PROGRAM} --render {_shown(out_dir)}    # this file and the plots", "```", ""]
  text = "\n".join(lines)
  with open(os.path.join(out_dir, RESULTS_MD), "w") as f:
    f.write(text)
  return text


def summarize(r: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
  """The numbers of one run that the table shows (None where not measured)."""
  held = lookup(r, "decode", "sets", "held_out") or {}
  s = {
      "run": r["run"], "objective": r["objective"], "k": r["block_size"] if r["objective"] == "tidar" else None,
      "tokens": lookup(r, "train", "tokens_seen"),
      "train_s": lookup(r, "train", "loop_s") or lookup(r, "train", "wall_s"),
      "train_tok_s": lookup(r, "train", "steady_tokens_per_s"), "budget_stop": lookup(r, "train", "stopped_by_budget"),
      "nll": lookup(r, "likelihood", "ar_nll"), "ppl": lookup(r, "likelihood", "ar_ppl"),
      "diff": lookup(r, "likelihood", "diffusion_loss"),
      "tnfe_greedy": lookup(held, "greedy", "tidar", "tokens_per_forward"),
      "tnfe_sample": lookup(held, "sample", "tidar", "tokens_per_forward"),
      "ar_tok_s": lookup(held, "greedy", "ar", "tokens_per_s"),
      "tidar_tok_s": lookup(held, "greedy", "tidar", "tokens_per_s"),
      "speedup": lookup(held, "greedy", "compare", "speedup"),
      "b1_ar": lookup(r, "decode", "batch1", "ar", "tokens_per_s"),
      "b1_tidar": lookup(r, "decode", "batch1", "tidar", "tokens_per_s"),
      "b1_speedup": lookup(r, "decode", "batch1", "speedup"),
      "equal": lookup(held, "greedy", "compare", "equal_fraction"),
      "decode_batch": lookup(held, "greedy", "ar", "batch"),
  }
  s["gap_pct"] = (100.0 * (s["nll"] - baseline["nll"]) / baseline["nll"]
                  if baseline and s["nll"] is not None and baseline.get("nll") and r["objective"] != "ar" else None)
  return s


# ----------------------------------------------------------------------------------------------
# Sections, each a list of markdown lines


def _header(results: list[dict[str, Any]], summaries: list[dict[str, Any]], out_dir: str) -> list[str]:
  """Title, where the numbers come from, warnings where the runs are not comparable, the shape."""
  metas = [r.get("meta", {}) for r in results]
  m0 = metas[0]
  devices = sorted({m.get("device", "?") for m in metas})
  commits = sorted({m.get("git_commit") or "unknown" for m in metas})
  digests = sorted({m.get("source_digest", "?") for m in metas})
  lines = [
      "# TiDAR vs AR-only: small-scale reproduction", "",
      f"Rendered {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from "
      f"{len(results)} result file(s) in `{_shown(out_dir)}`; runs measured "
      f"{', '.join(sorted({m.get('date', '?') for m in metas}))} on {', '.join(devices)}, jax {m0.get('jax', '?')}, "
      f"git commit {', '.join(commits)} (source digest {', '.join(digests)}). Every number below is read from "
      "those JSON files; nothing is estimated.", "",
  ]
  digests_cmp = {r.get("compare_digest") for r in results}
  tokens = {s["tokens"] for s in summaries if s["tokens"]}
  if len(digests_cmp) > 1:
    lines += ["**Warning:** the runs' model/data/train config sections differ (beyond objective and block size); "
              "they are not an equal-compute comparison.", ""]
  if len(tokens) > 1:
    lines += [f"**Warning:** the runs saw different numbers of training tokens ({sorted(tokens)}): a time budget "
              "stopped some early.", ""]
  cfg = results[0].get("config", {})
  mc, tc = cfg.get("model", {}), cfg.get("train", {})
  if mc:
    lines += [f"Model: {mc.get('num_layers')} layers, d_model {mc.get('d_model')}, {mc.get('num_heads')} heads "
              f"({mc.get('num_kv_heads')} KV) x {mc.get('head_dim')}, MLP {mc.get('mlp_dim')}, "
              f"vocab {mc.get('vocab_size')}, "
              f"compute {mc.get('dtype')}, attention {mc.get('attention')}; training {tc.get('steps')} steps x "
              f"{tc.get('batch_size')} x {tc.get('seq_len')} tokens, LR {tc.get('learning_rate')} -> "
              f"{tc.get('min_learning_rate')}, warmup {tc.get('warmup_steps')}; "
              f"data {_data_desc(cfg.get('data', {}))}.", ""]
  return lines


def _results(results: list[dict[str, Any]], summaries: list[dict[str, Any]]) -> list[str]:
  """The results table and what its columns mean."""
  headers = ["run", "k", "tokens seen", "train loop s", "train tok/s", "val AR NLL", "ppl", "NLL gap vs AR-only",
             "diffusion loss", "T/NFE greedy", "T/NFE T=1", "AR tok/s", "TiDAR tok/s", "speedup",
             "B=1 AR tok/s", "B=1 TiDAR tok/s", "B=1 speedup", "greedy TiDAR == AR"]
  rows = []
  for s in summaries:
    rows.append([
        s["run"] + (" (budget stop)" if s["budget_stop"] else ""), s["k"] or "",
        _tokens(s["tokens"]), _f(s["train_s"], ".0f"), _f(s["train_tok_s"], ",.0f"),
        _f(s["nll"], ".4f"), _f(s["ppl"], ".2f"), (_f(s["gap_pct"], "+.2f") + "%") if s["gap_pct"] is not None else "",
        _f(s["diff"], ".3f"), _f(s["tnfe_greedy"], ".2f"), _f(s["tnfe_sample"], ".2f"),
        _f(s["ar_tok_s"], ",.0f"), _f(s["tidar_tok_s"], ",.0f"),
        (_f(s["speedup"], ".2f") + "x") if s["speedup"] else "",
        _f(s["b1_ar"], ",.0f"), _f(s["b1_tidar"], ",.0f"),
        (_f(s["b1_speedup"], ".2f") + "x") if s["b1_speedup"] else "",
        f"{s['equal'] * 100:.0f}%" if s["equal"] is not None else ""])
  dec = lookup(results[-1], "decode") or {}
  held = lookup(dec, "sets", "held_out") or {}
  return [
      "## Results", "", common.md_table(headers, rows), "",
      "Columns: *tokens seen* = clean training tokens (TiDAR's model also processes as many mask tokens); "
      "*train loop s* = the trainer's loop from the first step (compilation and periodic evals included); "
      "*train tok/s* = median clean tokens/s of the trainer's log windows after the first; "
      f"*val AR NLL* = mean next-token NLL (nats) over the same validation batches for every run, each model run "
      "in AR mode (clean tokens, causal); *NLL gap* = (NLL - AR-only NLL) / AR-only NLL; *diffusion loss* = "
      "TiDAR's same-position NLL on the fully masked half; *T/NFE* = generated tokens / forward passes "
      f"(prefill included) over {held.get('prompts', '?')} held-out prompts (the first "
      f"{held.get('prompt_len_max', '?')} tokens of validation files), "
      f"{lookup(held, 'greedy', 'ar', 'max_new_tokens') or '?'} new tokens each (fewer at an EOS); "
      f"*AR / TiDAR tok/s* = generated tokens/s of AR vs TiDAR decoding of the same model, greedy, at batch "
      f"{lookup(held, 'greedy', 'ar', 'batch') or '?'}, decode dtype {dec.get('dtype', '?')}, after a warm-up call "
      "(compilation excluded); *B=1* = the same at batch 1 on the first prompts; *greedy TiDAR == AR* = share of "
      "prompts whose greedy TiDAR output equals greedy AR decoding token for token (exact in exact arithmetic; "
      "in bf16 a near-tie can flip a token: rerun with `--decode-dtype float32` to check).", "",
  ]


def _targets(summaries: list[dict[str, Any]]) -> list[str]:
  """Targets of issue 8, judged from the measured numbers only (the k=8 run, else the first TiDAR run)."""
  tidar8 = next((s for s in summaries if s["k"] == 8), None) or next((s for s in summaries if s["k"]), None)
  if tidar8 is None:
    return []

  def verdict(ok):
    return "**met**" if ok else "**missed**"

  t = []
  if tidar8["gap_pct"] is not None:
    t.append(f"| AR-mode validation NLL within 3% of AR-only | {tidar8['run']}: {tidar8['gap_pct']:+.2f}% | "
             f"{verdict(tidar8['gap_pct'] <= 3.0)} |")
  if tidar8["tnfe_greedy"] is not None:
    no8 = "" if tidar8["k"] == 8 else " (no k=8 run)"
    t.append(f"| T/NFE >= 3 at block 8 on held-out code | {tidar8['run']}{no8}: {tidar8['tnfe_greedy']:.2f} greedy, "
             f"{_f(tidar8['tnfe_sample'], '.2f')} at T=1 | {verdict(tidar8['tnfe_greedy'] >= 3.0)} |")
  sp = [x for x in (tidar8["speedup"], tidar8["b1_speedup"]) if x]
  if sp:
    t.append(f"| TiDAR tokens/s >= 3x the same model's AR decoding | {tidar8['run']}: "
             f"{_f(tidar8['speedup'], '.2f')}x at batch {tidar8['decode_batch']}, "
             f"{_f(tidar8['b1_speedup'], '.2f')}x at "
             f"batch 1 | {verdict(max(sp) >= 3.0)} |")
  return ["## Issue 8 targets", "", "| target | measured | |", "|---|---|---|", *t, ""] if t else []


def _acceptance(results: list[dict[str, Any]]) -> list[str]:
  """Acceptance histograms of the held-out prompts."""
  hist_lines = []
  for r in results:
    for sname in ("greedy", "sample"):
      h = lookup(r, "decode", "sets", "held_out", sname, "tidar", "accepted_hist")
      if h:
        total = max(sum(h), 1)
        shares = " ".join(f"{a + 1}:{100 * c / total:.0f}%" for a, c in enumerate(h))
        hist_lines.append(f"| {r['run']} | {sname} | {total} | {shares} |")
  if not hist_lines:
    return []
  return ["## Acceptance length", "",
          "Share of TiDAR decode steps (held-out prompts) that committed n tokens (n - 1 accepted drafts + 1):", "",
          "| run | decoding | steps | n: share |", "|---|---|---|---|", *hist_lines, ""]


def _other_prompt_sets(results: list[dict[str, Any]]) -> list[str]:
  extra = []
  for r in results:
    for name, entry in (lookup(r, "decode", "sets") or {}).items():
      if name == "held_out":
        continue
      g = entry.get("greedy", {})
      extra.append(f"| {r['run']} | {name} | {entry.get('prompts')} | "
                   f"{_f(lookup(g, 'tidar', 'tokens_per_forward'), '.2f')} | "
                   f"{_f(lookup(g, 'compare', 'speedup'), '.2f')} | "
                   f"{_f(lookup(g, 'compare', 'equal_fraction'), '.2f')} |")
  if not extra:
    return []
  return ["## Other prompt sets (greedy)", "", "| run | set | prompts | T/NFE | speedup | TiDAR == AR |",
          "|---|---|---|---|---|---|", *extra, ""]


def _errors(results: list[dict[str, Any]]) -> list[str]:
  errors = [(r["run"], e["error"]) for r in results for e in r.get("errors", [])]
  skipped = [(r["run"], r.get("status")) for r in results if str(r.get("status", "")).startswith(("skipped", "failed"))]
  if not (errors or skipped):
    return []
  return ["## Errors and gaps", ""] + [f"- {run}: {msg}" for run, msg in skipped + errors] + [""]


def _plots(results: list[dict[str, Any]], summaries: list[dict[str, Any]], out_dir: str) -> list[str]:
  """The PNGs written beside RESULTS.md, or a line saying why there are none (no matplotlib)."""
  from benchmarks.reproduce.plots import plot
  try:
    pngs = plot(results, summaries, out_dir)
  except ImportError as e:
    log(f"plots skipped: {e}")
    return [f"(plots skipped: {e})", ""]
  return ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs] + [""]


# ----------------------------------------------------------------------------------------------
# Formatting


def _shown(path: str) -> str:
  """`path` as a command run from here takes it: relative below the working directory, else absolute."""
  rel = os.path.relpath(path)
  return os.path.abspath(path) if rel.startswith("..") else rel


def _data_desc(d: dict[str, Any]) -> str:
  where = {"local_code": d.get("local_code_roots"), "text_files": d.get("source")}.get(d.get("dataset"))
  return f"`{d.get('dataset')}`" + (f" (`{where}`)" if where else "")


def _tokens(n: int | None) -> str:
  return "" if not n else f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


def _f(x: Any, fmt: str) -> str:
  return "" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, fmt)
