"""Tables and plots of a continual-pretraining comparison (results/smollm2/RESULTS.md): the base
model, the AR-continued model and the TiDAR model, from the files the runs wrote into one folder.

    python -m benchmarks.continual_report results/smollm2 [--tidar tidar8]

Reads (each optional; a missing one leaves its table out):
  metrics_ar.jsonl, metrics_<tidar>.jsonl   the trainer's metrics of the two runs (`--workdir`/metrics.jsonl)
  sweep_<lr>.jsonl                          the short LR-sweep runs
  nll_base.json, nll_ar.json, nll_<tidar>.json        `tidar_jax.evaluate --task=nll`
  he_base.json, he_ar.json, he_<tidar>.json, he_<tidar>_fp32.json, he_<tidar>_predraft.json
                                            `tidar_jax.evaluate --task=humaneval`
  acceptance_curve.json                     `benchmarks.acceptance_curve`
  train_step_smollm2.json                   `benchmarks.train_step`
Prints the markdown tables and writes loss_curves.png, acceptance_curve.png and
accepted_hist_tokens_per_s.png into the folder (matplotlib: the `bench` extra).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Any

from benchmarks import common
from benchmarks.reproduce.plots import pyplot
from tidar_jax import metrics


def _json(folder: str, name: str) -> dict[str, Any] | None:
  path = os.path.join(folder, name)
  return common.load_json(path) if os.path.exists(path) else None


def _jsonl(folder: str, name: str) -> list[dict[str, Any]]:
  path = os.path.join(folder, name)
  return metrics.read_jsonl(path) if os.path.exists(path) else []


def sweep_table(folder: str) -> str | None:
  rows = []
  names = [os.path.basename(p) for p in glob.glob(os.path.join(folder, "sweep_*.jsonl"))]
  lrs = sorted((n[len("sweep_"):-len(".jsonl")] for n in names), key=float)
  for lr in lrs:
    ev = [r for r in _jsonl(folder, f"sweep_{lr}.jsonl") if "eval_ar_loss" in r]
    if not ev:
      continue
    first, last = ev[0], ev[-1]
    total = last["eval_ar_loss"] + last.get("eval_diffusion_loss", 0.0)
    rows.append([lr, last["step"], f"{first['eval_ar_loss']:.4f}", f"{last['eval_ar_loss']:.4f}",
                 f"{last.get('eval_diffusion_loss', float('nan')):.4f}", f"{total:.4f}"])
  if not rows:
    return None
  return common.md_table(["peak LR", "steps", "val AR NLL at step 0", "val AR NLL", "val diffusion loss",
                          "sum (picked: lowest)"], rows)


def _trainer_nll(folder: str, name: str, tidar: str) -> dict[str, float] | None:
  """`evaluate --task=nll`'s fields from a run's own validation evals (the same batches and eval step for
  both runs): the base model is either run's step-0 eval, a continued model its last."""
  runs = ("ar", tidar) if name == "base" else (name,)
  for run in runs:
    evals = [r for r in _jsonl(folder, f"metrics_{run}.jsonl") if "eval_ar_loss" in r]
    if evals:
      r = evals[0] if name == "base" else evals[-1]
      keep = name != "base" and "eval_diffusion_loss" in r  # the base model never trained its mask half
      return {"ar_nll": r["eval_ar_loss"], **({"diffusion_loss": r["eval_diffusion_loss"]} if keep else {})}
  return None


def quality_table(folder: str, tidar: str) -> str | None:
  """One row per model: validation NLL (`nll_<name>.json`, else the trainer's evals, marked) and pass@1."""
  rows = []
  for name, label in (("base", "base (before continual pretraining)"), ("ar", "AR-continued"),
                      (tidar, f"TiDAR ({tidar})")):
    nll, he = _json(folder, f"nll_{name}.json"), _json(folder, f"he_{name}.json")
    mark = ""
    if nll is None:
      nll, mark = _trainer_nll(folder, name, tidar), " (trainer)"
    if nll is None and he is None:
      continue
    pass1 = (he or {}).get("pass_at_1", {})
    rows.append([label, f"{nll['ar_nll']:.4f}{mark}" if nll else "",
                 f"{nll['diffusion_loss']:.4f}{mark}" if nll and "diffusion_loss" in nll else "",
                 *(", ".join(f"{mode} {v:.3f}" for mode, v in pass1.get(s, {}).items()) for s in ("greedy", "t0.8"))])
  if not rows:
    return None
  headers = ["model", "val AR NLL (nats/token)", "val diffusion loss", "HumanEval pass@1 greedy", "pass@1 T=0.8"]
  if not any(row[-1] for row in rows):  # no model was sampled at T = 0.8: no empty column
    headers, rows = headers[:-1], [row[:-1] for row in rows]
  return common.md_table(headers, rows)


def decoding_table(he: dict[str, Any]) -> str:
  rows = []
  for sampling, by_batch in he["decoding"].items():
    for batch, entry in by_batch.items():
      for mode in he["decoders"]:
        r = entry.get(mode)
        if r is None:
          continue
        agree = (entry.get("greedy_agreement" if mode == "tidar" else "greedy_agreement_pruned")
                 if mode != "ar" else None)
        speed = entry.get("speedup" if mode == "tidar" else "speedup_pruned") if mode != "ar" else None
        rows.append([sampling, batch[len("batch"):], mode + (f" {r['predraft']}" if mode == "tidar_pruned" else ""),
                     f"{r['tokens_per_forward']:.2f}", round(r["tokens_per_s"]), f"{speed:.2f}x" if speed else "",
                     f"{agree['equal_rows']}/{agree['rows']}" if agree else "",
                     " ".join(map(str, r["accepted_hist"])) if "accepted_hist" in r else ""])
  return common.md_table(["sampling", "batch", "decoder", "T/NFE", "tokens/s", "÷ AR tokens/s",
                          "greedy == AR (prompts)", "accepted drafts 0..k-1 (steps)"], rows)


def train_table(folder: str, tidar: str, tokens_per_step: int) -> str | None:
  rows = []
  for name in ("ar", tidar):
    ms = _jsonl(folder, f"metrics_{name}.jsonl")
    tr = [r for r in ms if "tokens_per_s" in r]
    ev = [r for r in ms if "eval_ar_loss" in r]
    if not tr:
      continue
    steady = tr[1:] or tr  # the first logged interval holds the compilation
    tps = sorted(r["tokens_per_s"] for r in steady)[len(steady) // 2]
    mfu = sorted(r["mfu"] for r in steady if "mfu" in r)
    peak = max((r["peak_memory_gib"] for r in ms if "peak_memory_gib" in r), default=None)
    rows.append([name, tr[-1]["step"], f"{tr[-1]['step'] * tokens_per_step / 1e6:.1f}", round(tps),
                 f"{100 * mfu[len(mfu) // 2]:.1f}%" if mfu else "", f"{peak:.1f}" if peak else "",
                 f"{ev[0]['eval_ar_loss']:.4f} → {ev[-1]['eval_ar_loss']:.4f}" if ev else ""])
  if not rows:
    return None
  return common.md_table(["run", "steps", "clean tokens (M)", "clean tokens/s (median)", "MFU (median)",
                          "peak GiB", "val AR NLL start → end"], rows)


def plot(folder: str, tidar: str, tokens_per_step: int) -> list[str]:
  plt = pyplot()
  written = []

  def save(fig, name):
    fig.tight_layout()
    path = os.path.join(folder, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

  runs = {name: _jsonl(folder, f"metrics_{name}.jsonl") for name in ("ar", tidar)}
  if any(runs.values()):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, ms in runs.items():
      tr = [r for r in ms if "ar_loss" in r and "eval_ar_loss" not in r]
      ev = [r for r in ms if "eval_ar_loss" in r]
      x = [r["step"] * tokens_per_step / 1e6 for r in tr]
      axes[0].plot(x, [r["ar_loss"] for r in tr], label=f"{name}: AR loss")
      if any("diffusion_loss" in r for r in tr):
        axes[0].plot(x, [r["diffusion_loss"] for r in tr], "--", label=f"{name}: diffusion loss")
      axes[1].plot([r["step"] * tokens_per_step / 1e6 for r in ev], [r["eval_ar_loss"] for r in ev], "o-", label=name)
    axes[0].set(xlabel="clean training tokens (M)", ylabel="nats/token", title="training loss")
    axes[1].set(xlabel="clean training tokens (M)", ylabel="nats/token", title="validation AR NLL")
    for ax in axes:
      ax.legend()
      ax.grid(alpha=0.3)
    save(fig, "loss_curves.png")
  curve = _json(folder, "acceptance_curve.json")
  if curve and curve["records"]:
    recs = curve["records"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [r["clean_tokens"] / 1e6 for r in recs]
    ax.plot(x, [r["tokens_per_forward"] for r in recs], "o-", color="C1", label="T/NFE (HumanEval, greedy)")
    ax.set(xlabel="clean training tokens (M)", ylabel="tokens per forward",
           title=f"TiDAR k={curve['run']['block_size']}: T/NFE and validation NLL vs tokens trained")
    ax2 = ax.twinx()
    pts = [(r["clean_tokens"] / 1e6, r["eval_ar_loss"]) for r in recs if "eval_ar_loss" in r]
    if pts:
      ax2.plot(*zip(*pts), "s--", color="C0", label="validation AR NLL")
      ax2.set_ylabel("nats/token")
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.9))
    ax.grid(alpha=0.3)
    save(fig, "acceptance_curve.png")
  he = _json(folder, f"he_{tidar}.json")
  if he:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    k = he["block_size"]
    width = 0.8 / max(len(he["decoding"]), 1)
    for i, (sampling, by_batch) in enumerate(he["decoding"].items()):
      entry = next(iter(by_batch.values()))
      hist = entry["tidar"]["accepted_hist"]
      total = sum(hist) or 1
      axes[0].bar([a + i * width for a in range(k)], [h / total for h in hist], width, label=sampling)
    axes[0].set(xlabel="drafts accepted in a step (0..k-1)", ylabel="fraction of steps",
                title="accepted-length histogram (HumanEval)")
    axes[0].legend()
    labels, ar_v, ti_v = [], [], []
    for sampling, by_batch in he["decoding"].items():
      for batch, entry in by_batch.items():
        labels.append(f"{sampling}\n{batch}")
        ar_v.append(entry["ar"]["tokens_per_s"])
        ti_v.append(entry["tidar"]["tokens_per_s"])
    xs = range(len(labels))
    axes[1].bar([x - 0.2 for x in xs], ar_v, 0.4, label="AR")
    axes[1].bar([x + 0.2 for x in xs], ti_v, 0.4, label=f"TiDAR k={k}")
    axes[1].set_xticks(list(xs), labels)
    axes[1].set(ylabel="generated tokens/s", title="decoding throughput, same model")
    axes[1].legend()
    save(fig, "accepted_hist_tokens_per_s.png")
  return written


def report(folder: str, tidar: str, tokens_per_step: int) -> str:
  """The markdown of every table the folder's files allow."""
  curve = _json(folder, "acceptance_curve.json")
  parts = []
  for title, table in (("LR sweep", sweep_table(folder)), ("Training", train_table(folder, tidar, tokens_per_step)),
                       ("Quality", quality_table(folder, tidar))):
    if table:
      parts.append(f"### {title}\n\n{table}")
  for suffix, title in (("", "bf16"), ("_fp32", "fp32"), ("_predraft", "pruned pre-drafting")):
    he = _json(folder, f"he_{tidar}{suffix}.json")
    if he:
      parts.append(f"### HumanEval decoding, TiDAR model ({title})\n\n{decoding_table(he)}")
  if curve:
    from benchmarks import acceptance_curve
    parts.append("### T/NFE vs tokens trained\n\n" + acceptance_curve.render(curve).split("\n\n", 1)[-1])
  step = _json(folder, "train_step_smollm2.json")
  if step:
    from benchmarks import train_step
    parts.append("### Train step\n\n" + train_step.render(step).split("\n\n", 1)[-1])
  return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> str:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("folder")
  p.add_argument("--tidar", default="tidar8", help="the TiDAR run's name in the file names")
  p.add_argument("--tokens-per-step", type=int, default=65536, help="clean tokens per training step "
                 "(train.batch_size x train.seq_len; configs/smollm2.py: 64 x 1024)")
  p.add_argument("--no-plots", action="store_true")
  args = p.parse_args(argv)
  text = report(args.folder, args.tidar, args.tokens_per_step)
  if not args.no_plots:
    plot(args.folder, args.tidar, args.tokens_per_step)
  print(text)
  return text


if __name__ == "__main__":
  main(sys.argv[1:])
