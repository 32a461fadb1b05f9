"""The reproduction's PNGs beside RESULTS.md: loss curves, T/NFE vs block size, decoding tokens/s.
matplotlib is an optional dependency (the `bench` extra), imported only when plotting, so the rest of
benchmarks/ runs without it."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from benchmarks.reproduce.results import lookup, read_metrics

INSTALL = "pip install -e '.[bench]'"


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend; an ImportError naming the extra without it."""
  try:
    import matplotlib
  except ImportError as e:
    raise ImportError(f"the reproduction's plots need matplotlib: {INSTALL}") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot(results: list[dict[str, Any]], summaries: list[dict[str, Any]], out_dir: str) -> list[str]:
  """Writes loss_curves.png, tnfe_vs_block.png and tokens_per_s.png into out_dir; returns their paths."""
  plt = pyplot()
  written = []
  for name, draw, data in (("loss_curves.png", _loss_curves, results), ("tnfe_vs_block.png", _tnfe_vs_block, summaries),
                           ("tokens_per_s.png", _tokens_per_s, summaries)):
    fig = draw(plt, data)  # one figure open at a time
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
  return written


def _metric_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
  rows = read_metrics(r["_dir"])
  if not rows and r.get("workdir"):
    rows = read_metrics(r["workdir"])
  by_step: dict[tuple[int, bool], dict[str, Any]] = {}
  for row in rows:  # a resumed run appends: keep the last line of each (step, kind)
    by_step[(row["step"], "eval_ar_loss" in row)] = row
  return [by_step[k] for k in sorted(by_step)]


def _loss_curves(plt, results: list[dict[str, Any]]):
  """Training AR loss (and TiDAR's diffusion loss) vs clean tokens; validation AR NLL."""
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for r in results:
    rows = _metric_rows(r)
    tps = lookup(r, "train", "tokens_per_step") or (
        r["config"]["train"]["batch_size"] * r["config"]["train"]["seq_len"])
    tr = [x for x in rows if "ar_loss" in x and "eval_ar_loss" not in x]
    ev = [x for x in rows if "eval_ar_loss" in x]
    if tr:
      line, = axes[0].plot([x["step"] * tps / 1e6 for x in tr], [x["ar_loss"] for x in tr], label=f"{r['run']} AR loss")
      if any("diffusion_loss" in x for x in tr):
        axes[0].plot([x["step"] * tps / 1e6 for x in tr if "diffusion_loss" in x],
                     [x["diffusion_loss"] for x in tr if "diffusion_loss" in x], linestyle="--", color=line.get_color(),
                     label=f"{r['run']} diffusion loss")
    if ev:
      axes[1].plot([x["step"] * tps / 1e6 for x in ev], [x["eval_ar_loss"] for x in ev], marker="o",
                   label=f"{r['run']} (trainer's eval)")
    final = lookup(r, "likelihood", "ar_nll")
    if final is not None and lookup(r, "train", "tokens_seen"):
      axes[1].scatter([r["train"]["tokens_seen"] / 1e6], [final], marker="*", s=120, zorder=5)
  axes[0].set(xlabel="clean training tokens (M)", ylabel="loss (nats/token)", title="training loss")
  axes[1].set(xlabel="clean training tokens (M)", ylabel="validation AR NLL",
              title="validation AR NLL (* = final eval)")
  for ax in axes:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  return fig


def _tnfe_vs_block(plt, summaries: list[dict[str, Any]]):
  tidar = [s for s in summaries if s["objective"] == "tidar"]
  fig, ax = plt.subplots(figsize=(6, 4.5))
  if tidar:
    ks = [s["k"] for s in tidar]
    for key, label in (("tnfe_greedy", "greedy"), ("tnfe_sample", "temperature 1")):
      pts = [(k, s[key]) for k, s in zip(ks, tidar) if s[key] is not None]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.plot([min(ks), max(ks)], [min(ks), max(ks)], color="gray", linestyle=":", label="k (ideal)")
    ax.set_xticks(sorted(set(ks)))
  ax.axhline(1.0, color="black", linewidth=0.8, label="AR (1 token/forward)")
  ax.set(xlabel="block size k", ylabel="tokens per forward (T/NFE)", title="T/NFE vs block size (held-out prompts)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return fig


def _tokens_per_s(plt, summaries: list[dict[str, Any]]):
  """AR vs TiDAR decoding tokens/s of each model, at the decode batch and at batch 1."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  labels, groups = [], []
  for s in summaries:
    for tag, ar_key, ti_key in (("B=%s" % s["decode_batch"], "ar_tok_s", "tidar_tok_s"), ("B=1", "b1_ar", "b1_tidar")):
      if s[ar_key] is None:
        continue
      labels.append(f"{s['run']}\n{tag}")
      groups.append((s[ar_key], s[ti_key]))
  if groups:
    x = np.arange(len(groups))
    ax.bar(x - 0.2, [g[0] for g in groups], 0.4, label="AR decoding")
    ax.bar(x + 0.2, [g[1] or 0 for g in groups], 0.4, label="TiDAR decoding")
    for i, (a, t) in enumerate(groups):
      if t:
        ax.text(i + 0.2, t, f"{t / a:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, labels, fontsize=8)
  ax.set(ylabel="generated tokens/s (greedy)", title="decoding throughput, same model")
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=8)
  return fig
