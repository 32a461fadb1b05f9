"""Export a training workdir's latest params for serving:

    python -m tidar_jax.export --workdir=runs/tiny --out=exports/tiny [--dtype=bfloat16]

Writes a params-only orbax checkpoint with config.json and tokenizer.json beside it; both
`tidar_jax.generate --checkpoint=` and `--config.init_from=` accept the result.
"""

from __future__ import annotations

import jax.numpy as jnp
from absl import flags

from tidar_jax import checkpoint

def export(workdir: str, out: str, dtype: str = "float32") -> None:
  params, config, tokenizer = checkpoint.load_for_inference(workdir, flag="--workdir")
  config.model.param_dtype = dtype
  checkpoint.save_inference(out, params, config, tokenizer, dtype=getattr(jnp, dtype))


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  export(f.workdir, f.out, f.dtype)
  print(f"exported {f.workdir} -> {f.out} ({f.dtype})")


if __name__ == "__main__":
  from tidar_jax import cli

  cli.define_required_strings(workdir="Training workdir (holds checkpoints/).",
                              out="Output directory of the export.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Stored weight dtype.")
  cli.run(main)
