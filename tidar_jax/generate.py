"""Generate text with a trained model, AR or TiDAR: a library function and a CLI.

    python -m tidar_jax.generate --checkpoint=DIR --prompt="def fib(" [--prompt=...] [--prompts_file=F]
        [--mode=tidar|ar|both] [--temperature=0 --top_k=0 --top_p=1] [--max_new_tokens=64]
        [--batch_size=8] [--seed=0] [--dtype=float32]

    from tidar_jax.generate import generate
    results = generate(params, config, ["def fib("], tokenizer, mode="tidar")

Each prompt decodes with its own key (fold_in(seed, prompt index)) and rows of a batch are
independent, so a prompt's output does not depend on batch_size or on the other prompts (up to
rounding: docs/method.md §2). `--mode=both` decodes with both and, when greedy, checks that TiDAR
reproduced AR token for token. It compares in the checkpoint's compute dtype; in bfloat16 the two
may split where the top two logits nearly tie, so `--dtype=float32` is the token-exact check.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
from absl import app, flags, logging

from tidar_jax import predraft as predraft_lib
from tidar_jax.decode.ar import generate_ar
from tidar_jax.decode.loop import resolve_config
from tidar_jax.decode.sampling import SamplingParams
from tidar_jax.decode.tidar import generate_tidar

MODES = ("tidar", "ar")
# JAX reports these durations for every trace/compile; decode speed excludes them.
_COMPILE_EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                             "/jax/core/compile/jaxpr_to_mlir_module_duration",
                             "/jax/core/compile/backend_compile_duration"})
_compile_seconds = [0.0]
_listening = [False]


@dataclasses.dataclass(frozen=True)
class GenerationResult:
  prompt: str
  text: str  # decoded continuation (a final EOS is not part of the text)
  tokens: list[int]  # generated ids, a final EOS included
  forward_passes: int  # prefill + decode steps of this prompt
  accepted_hist: list[int]  # TiDAR: steps that accepted 0..k-1 drafts; AR: [steps]
  seconds: float  # this prompt's share of its batch's decode time, compilation excluded
  mode: str
  predraft: list[int] = dataclasses.field(default_factory=list)  # TiDAR: the acceptance counts with a draft block

  @property
  def tokens_per_forward(self) -> float:
    return len(self.tokens) / self.forward_passes


def _on_duration(event: str, seconds: float, **_: Any) -> None:
  if event in _COMPILE_EVENTS:
    _compile_seconds[0] += seconds


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
  """Prompt indices grouped by length (fewer distinct prompt buckets, less padding)."""
  order = sorted(range(len(lengths)), key=lambda i: lengths[i])
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate(params: Any, config: Any, prompts: Sequence[str], tokenizer: Any, *, mode: str = "tidar",
             sampling: SamplingParams = SamplingParams(temperature=0.0), max_new_tokens: int = 64,
             seed: int = 0, batch_size: int = 8, max_len: int | None = None, predraft: Any = None
             ) -> list[GenerationResult]:
  """Decodes every prompt (in batches of `batch_size`); results in prompt order.

  config: the checkpoint's ConfigDict (TiDAR takes block_size, verify_beta and predraft from its
  `tidar` section). tokenizer: encode/decode, eos_id, mask_id. Every batch has exactly batch_size
  rows (a short last batch repeats a prompt), so each prompt-length bucket compiles once.
  predraft: TiDAR's kept draft blocks (None: the config's); "auto" decodes the first batch with
  every block, then the rest with `predraft.best_counts` of its acceptance histogram at this batch
  size (each result's `predraft` says which blocks decoded it; `summary` lists the pruned sets).
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}: use one of {MODES}")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r}: must be a positive integer")
  if not _listening[0]:
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    _listening[0] = True
  encoded = [tokenizer.encode(p) for p in prompts]
  empty = [i for i, ids in enumerate(encoded) if not ids]
  if empty:
    raise ValueError(f"prompts {empty} encode to no tokens; every prompt needs at least one token")
  root = jax.random.key(seed)
  predraft = predraft_lib.configured(predraft, resolve_config(config)[1])
  auto = predraft == predraft_lib.AUTO
  kept = predraft_lib.ALL if auto else predraft
  results: list[GenerationResult | None] = [None] * len(prompts)
  for batch in _batches([len(ids) for ids in encoded], batch_size):
    rows = batch + [batch[0]] * (batch_size - len(batch))
    lengths = np.array([len(encoded[i]) for i in rows], np.int32)
    tokens = np.zeros((batch_size, lengths.max()), np.int32)
    for r, i in enumerate(rows):
      tokens[r, : lengths[r]] = encoded[i]
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(np.array(rows, np.uint32))
    kwargs = dict(max_new_tokens=max_new_tokens, sampling=sampling, key=keys, eos_id=tokenizer.special_ids(),
                  max_len=max_len)
    compile_before, start = _compile_seconds[0], time.perf_counter()
    if mode == "tidar":
      out = generate_tidar(params, config, tokens, lengths, mask_id=tokenizer.mask_id, predraft=kept, **kwargs)
    else:
      out = generate_ar(params, config, tokens, lengths, **kwargs)
    out_tokens, out_lengths = np.asarray(out.tokens), np.asarray(out.lengths)  # waits for the device
    seconds = time.perf_counter() - start - (_compile_seconds[0] - compile_before)
    forward_passes, hist = np.asarray(out.stats.forward_passes), np.asarray(out.stats.accepted_hist)
    used = list(predraft_lib.counts(kept, hist.shape[1])) if mode == "tidar" else []
    for r, i in enumerate(batch):
      ids = out_tokens[r, : out_lengths[r]].tolist()
      results[i] = GenerationResult(prompts[i], tokenizer.generated_text(ids), ids, int(forward_passes[r]),
                                    hist[r].tolist(), seconds / len(batch), mode, used)
    if mode == "tidar" and auto and kept == predraft_lib.ALL:  # the first batch measured the acceptance
      kept, gain = predraft_lib.best_counts(hist[:len(batch)].sum(axis=0), batch_size)
      if gain < 1:  # the step-cost table says even the best pruned step loses to AR at this batch
        logging.warning("predraft=auto: at batch %d this acceptance makes TiDAR about %.2fx AR's tokens/s "
                        "even with draft blocks %s; --mode=ar decodes faster here", batch_size, gain, kept)
  return results


def summary(results: Sequence[GenerationResult]) -> str:
  """One stats line: tokens, forward passes (summed per prompt), T/NFE, tokens/s and (TiDAR) the
  acceptance histogram: steps that accepted 0 .. k-1 drafts."""
  tokens = sum(len(r.tokens) for r in results)
  forwards = sum(r.forward_passes for r in results)
  seconds = sum(r.seconds for r in results)
  speed = f"{tokens / seconds:.1f}" if seconds > 0 else "n/a"
  line = (f"[{results[0].mode}] tokens={tokens} forward_passes={forwards} T/NFE={tokens / forwards:.2f} "
          f"tokens/s={speed} (compilation excluded)")
  if results[0].mode == "tidar":
    line += f" acceptance_hist={np.sum([r.accepted_hist for r in results], axis=0).tolist()}"
    k = len(results[0].accepted_hist)
    sets = sorted({tuple(r.predraft) for r in results if not predraft_lib.is_full(r.predraft, k)})
    if sets:
      line += f" pruned_predraft={[list(s) for s in sets]}"
  return line


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The CLI's flags (defined on demand, not at import: other entry points define --seed etc.)."""
  flags.DEFINE_string("checkpoint", None, "export dir or training workdir (latest checkpoint)", flag_values=fv)
  flags.DEFINE_multi_string("prompt", [], "prompt text; repeat the flag for several prompts", flag_values=fv)
  flags.DEFINE_string("prompts_file", None, "text file with one prompt per line (blank lines skipped)",
                      flag_values=fv)
  flags.DEFINE_enum("mode", "tidar", ["tidar", "ar", "both"], "decoder; both: run AR and TiDAR and compare",
                    flag_values=fv)
  flags.DEFINE_float("temperature", 0.0, "0 = greedy", flag_values=fv)
  flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0 = off)", flag_values=fv)
  flags.DEFINE_float("top_p", 1.0, "nucleus mass in (0, 1] (1 = off)", flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate per prompt (fewer if EOS)", flag_values=fv)
  flags.DEFINE_integer("batch_size", 8, "prompts decoded together", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "sampling seed (each prompt folds in its index)", flag_values=fv)
  flags.DEFINE_string("predraft", None, "TiDAR's kept draft blocks: 'all', acceptance counts ('0,1,2,7') or "
                      "'auto' (chosen for --batch_size from the first batch's acceptance); default: the "
                      "checkpoint's tidar.predraft", flag_values=fv)
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                    "compute dtype for decoding; default: the checkpoint's model.dtype (float32 makes "
                    "--mode=both a token-exact check)", flag_values=fv)
  flags.DEFINE_enum("decode_quant", None, ["none", "int8"],
                    "layer matrices for decoding: int8 (half the bytes per step; numbers change by the "
                    "rounding, TiDAR stays exactly its own AR) or none; default: the checkpoint's "
                    "model.decode_quant", flag_values=fv)


def _read_prompts(fv: flags.FlagValues) -> list[str]:
  empty = [i for i, p in enumerate(fv.prompt) if not p]
  if empty:
    raise app.UsageError(f"--prompt is empty (prompt {empty[0]}): give the text to continue, e.g. "
                         "--prompt='def fib('")
  prompts = list(fv.prompt)
  if fv.prompts_file:
    with open(fv.prompts_file, encoding="utf-8") as f:
      prompts += [line.rstrip("\n") for line in f if line.strip()]
  if not prompts:
    raise app.UsageError("no prompts: pass --prompt=TEXT (repeatable) or --prompts_file=FILE")
  return prompts


def _check_counts(fv: flags.FlagValues) -> None:
  for name in ("max_new_tokens", "batch_size"):
    if fv[name].value < 1:
      raise app.UsageError(f"--{name}={fv[name].value}: must be at least 1, e.g. --{name}={fv[name].default}")


def run(fv: flags.FlagValues) -> int:
  """The CLI on parsed flags: prints texts and stats; returns the exit code (1: greedy mismatch)."""
  from tidar_jax.checkpoint import load_for_inference  # orbax import only for the CLI

  if not fv.checkpoint:
    raise app.UsageError("--checkpoint is required (an export dir or a training workdir)")
  prompts = _read_prompts(fv)
  _check_counts(fv)
  try:
    sampling = SamplingParams(temperature=fv.temperature, top_k=fv.top_k, top_p=fv.top_p)
  except ValueError as e:  # name the flag, not the dataclass field
    raise app.UsageError(re.sub(r"(SamplingParams\.|\b)(temperature|top_k|top_p)\b", r"--\2", str(e))) from e
  if sampling.greedy and (fv.top_k or fv.top_p < 1):
    print("warning: --temperature=0 decodes greedily, so --top_k/--top_p change nothing; pass "
          "--temperature>0 (e.g. 0.8) to sample with them", file=sys.stderr)
  params, config, tokenizer = load_for_inference(fv.checkpoint)
  with config.unlocked():
    for field in ("dtype", "decode_quant"):
      if fv[field].value is not None:
        config.model[field] = fv[field].value
  modes = MODES[::-1] if fv.mode == "both" else (fv.mode,)
  runs = {}
  for mode in modes:
    runs[mode] = generate(params, config, prompts, tokenizer, mode=mode, sampling=sampling,
                          max_new_tokens=fv.max_new_tokens, seed=fv.seed, batch_size=fv.batch_size,
                          predraft=fv.predraft)
    for i, r in enumerate(runs[mode]):
      acceptance = f", acceptance_hist={r.accepted_hist}" if mode == "tidar" else ""
      print(f"=== [{mode}] prompt {i}: {r.prompt!r}\n{r.prompt}{r.text}\n--- {len(r.tokens)} tokens, "
            f"{r.forward_passes} forward passes ({r.tokens_per_forward:.2f} tokens/forward){acceptance}")
    print(summary(runs[mode]))
  if fv.mode != "both":
    return 0
  if not sampling.greedy:
    print("both: outputs are sampled (same law, different draws); token identity is checked only "
          "for greedy decoding (--temperature=0)")
    return 0
  code, line = greedy_verdict(runs["ar"], runs["tidar"], config.model.dtype)
  print(line)
  return code


def greedy_verdict(ar: Sequence[GenerationResult], tidar: Sequence[GenerationResult], dtype: str) -> tuple[int, str]:
  """(exit code, line) of `--mode=both` for greedy outputs decoded in `dtype`: 0 when TiDAR reproduced
  AR token for token, else 1. Outside float32 a split at a near-tie is rounding, not a bug
  (docs/method.md §2), and the line says so."""
  differ = [i for i, (a, t) in enumerate(zip(ar, tidar)) if a.tokens != t.tokens]
  exact = "" if dtype == "float32" else "; --dtype=float32 is the token-exact check"
  if differ:
    near_tie = "" if dtype == "float32" else ", whose rounding can split the two where the top two logits nearly tie"
    return 1, f"both: greedy MISMATCH: TiDAR differs from AR on prompts {differ} (compared in {dtype}{near_tie}{exact})"
  return 0, (f"both: greedy outputs identical (TiDAR == AR token for token on all {len(ar)} prompts, "
             f"in {dtype}{exact})")


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {list(argv[1:])}; prompts go in --prompt")
  return run(flags.FLAGS)


if __name__ == "__main__":
  from tidar_jax import cli

  define_flags()
  cli.run(main)
