"""Evaluating a model: likelihood on a corpus split, decoding speed and acceptance (TiDAR vs AR),
HumanEval pass@1. `tidar_jax.evaluate` is the command line; `benchmarks.reproduce` uses the same
functions.

    likelihood.py  AR NLL / perplexity (and TiDAR's diffusion loss) with the trainer's eval step
    decoding.py    decode a prompt set with AR or TiDAR: T/NFE, accepted-length histogram, tokens/s
    humaneval.py   HumanEval problems, stop sequences, each completion's check run in a subprocess
"""
