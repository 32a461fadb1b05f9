"""Hugging Face interop: Qwen2/Qwen2.5, Qwen3 and Llama checkpoints in and out; llama.cpp GGUF in.

    python -m tidar_jax.convert.from_hf --hf_dir=DIR --out=CKPT_DIR [--config=configs/x.py]
    python -m tidar_jax.convert.from_gguf --gguf=FILE.gguf --out=CKPT_DIR [--config=configs/x.py]
    python -m tidar_jax.convert.to_hf --ckpt=CKPT_DIR --out=HF_DIR [--drop_mask_row]

In Python: `from_hf.convert(hf_dir, out, config=None)`, `from_gguf.convert(path, out, config=None)`
and `to_hf.export(ckpt, out, ...)`; the per-family name/layout tables live in `families.py`.
The submodules are not imported here, so `python -m` runs each one once (and its flags are defined once).
"""
