"""What every command-line tool shares: one `error:` line for a user's mistake, and quiet logs.

`train`, `generate`, `evaluate`, `export` and the `convert` tools define their flags and a
`main(argv)`, then call `cli.run(main)`, which

* parses the flags; a bad flag, a misspelt config field ("did you mean num_layers?") or a config
  file that does not load prints `error: ...` and exits with code 2 (not absl's usage dump, not
  ml_collections' chained tracebacks);
* runs `main`; the user errors it raises (`ValueError`, `OSError` such as `FileNotFoundError`,
  `app.UsageError`) print as `error: <message>` with exit code 2, anything else is a bug and keeps
  its traceback;
* keeps INFO logs (absl, orbax, tfds, jax) and known third-party noise off the terminal;
* turns on JAX's persistent compilation cache (`--compilation_cache_dir`, default
  `~/.cache/tidar_jax/jax_cache`, or `$JAX_COMPILATION_CACHE_DIR` where set): a later run of the same
  program -- a resumed training run, the next point of a sweep, another evaluation -- loads the
  compiled step (and the auto micro-batch's trial compiles) instead of compiling again.

`--verbose` brings the logs back and shows the traceback of a user error too.
"""

from __future__ import annotations

import difflib
import logging as std_logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

USER_ERRORS = (ValueError, OSError, app.UsageError)
USAGE_EXIT_CODE = 2  # as argparse: the command line was wrong, the program was not
# Third-party warnings a default run would print every time, with nothing for the user to do.
_NOISE = (
    "Using custom data configuration",  # tfds: the local corpora are run-time builder configs by design
)
_CONFIG_FILES: dict[str, str | None] = {}  # config flags made by define_config_file: name -> default file
DEFAULT_COMPILATION_CACHE = "~/.cache/tidar_jax/jax_cache"


def fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USAGE_EXIT_CODE)


def run(main: Callable[[list[str]], int | None]) -> None:
  """`app.run(main)` with the error handling and logging of the module docstring."""
  flags.DEFINE_bool("verbose", False, "Show INFO logs and the traceback of errors.")
  flags.DEFINE_string("compilation_cache_dir", None,
                      "JAX's persistent compilation cache: later runs of the same program load it instead of "
                      f"compiling. Default: $JAX_COMPILATION_CACHE_DIR, else {DEFAULT_COMPILATION_CACHE}; '' turns it off.")
  app.run(lambda argv: _main(main, argv), flags_parser=_parse_flags)


def compilation_cache_dir(flag_value: str | None, environ: dict[str, str] | None = None) -> str:
  """The persistent compilation cache a tool uses ('' = none): the flag if given, else the
  environment's JAX_COMPILATION_CACHE_DIR, else DEFAULT_COMPILATION_CACHE."""
  if flag_value is not None:
    return os.path.expanduser(flag_value)
  environ = os.environ if environ is None else environ
  return os.path.expanduser(environ.get("JAX_COMPILATION_CACHE_DIR", DEFAULT_COMPILATION_CACHE))


def define_required_strings(**help_texts: str) -> None:
  """One required string flag per keyword (`out="Output directory."`): the paths a converter takes.
  Called under `if __name__ == "__main__"`, since modules that tests import together share names."""
  for name, help_text in help_texts.items():
    flags.DEFINE_string(name, None, help_text, required=True)


def define_config_file(name: str, default: str | None, help_text: str, **kwargs: Any) -> flags.FlagHolder:
  """`config_flags.DEFINE_config_file`, whose errors become an `error:` line too: without --NAME on
  the command line, ml_collections loads the default file with the --NAME.* overrides right here."""
  _CONFIG_FILES[name] = default
  try:
    return config_flags.DEFINE_config_file(name, default, help_text, **kwargs)
  except Exception as e:  # noqa: BLE001 - as in _parse_flags
    if _verbose_in(sys.argv):
      raise
    fail(_describe_flag_error(e, sys.argv))


def _main(main: Callable[[list[str]], int | None], argv: list[str]) -> int | None:
  verbose = flags.FLAGS.verbose
  quiet_logs(verbose)
  import jax  # every tool runs JAX; its cache keys each entry by program, devices, compiler and flags
  jax.config.update("jax_compilation_cache_dir", compilation_cache_dir(flags.FLAGS.compilation_cache_dir) or None)
  try:
    return main(argv)
  except USER_ERRORS as e:
    if verbose:
      raise
    fail(str(e))


def quiet_logs(verbose: bool) -> None:
  """INFO logs off (absl sets INFO once flags are parsed) and the `_NOISE` warnings dropped, unless
  `verbose`."""
  logging.set_verbosity(logging.INFO if verbose else logging.WARNING)
  if not verbose:
    logging.get_absl_handler().addFilter(_not_noise)


def _not_noise(record: std_logging.LogRecord) -> bool:
  return not any(str(record.msg).startswith(n) for n in _NOISE)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    rest = flags.FLAGS(argv)
    for name in _CONFIG_FILES:
      _check_config_loaded(name, flags.FLAGS[name])
  except Exception as e:  # noqa: BLE001 - any failure to read the command line is the user's to fix
    if _verbose_in(argv):
      raise
    fail(_describe_flag_error(e, argv))
  return rest


def _verbose_in(argv: Sequence[str]) -> bool:
  """--verbose before the flags are parsed (a parse that fails leaves flags.FLAGS.verbose unset)."""
  return any(re.fullmatch(r"--?verbose(=(true|True|1))?", arg) for arg in argv)


def _check_config_loaded(name: str, flag: flags.Flag) -> None:
  """ml_collections defers a config file's load error to the first use of the config: raise it here."""
  if flag.value is None or isinstance(flag.value, ConfigDict):
    return
  try:
    getattr(flag.value, "keys")
  except OSError as e:  # ml_collections' message lists every path it tried; its last line is the cause
    cause = str(e).strip().splitlines()[-1].strip()
    raise ValueError(f"--{name}={config_flags.get_config_filename(flag)}: cannot load this config file "
                     f"({cause}); pass a Python file defining get_config(), e.g. --{name}=configs/tiny.py") from e


def _describe_flag_error(error: Exception, argv: Sequence[str]) -> str:
  if isinstance(error, flags.UnrecognizedFlagError):
    close = difflib.get_close_matches(error.flagname, list(flags.FLAGS), n=1)
    hint = f"did you mean --{close[0]}?" if close else "--helpshort lists the flags"
    return f"unknown flag --{error.flagname}; {hint}"
  try:
    unknown = _unknown_config_field(argv)
  except Exception:  # noqa: BLE001 - the config file itself is broken: report the original error
    unknown = None
  return unknown or " ".join(str(error).split())


def _unknown_config_field(argv: Sequence[str]) -> str | None:
  """The first `--NAME.a.b=value` whose path the config of config flag NAME lacks, with the closest
  field name: ml_collections reports it as a chain of KeyError/AttributeError tracebacks."""
  for name, default in _CONFIG_FILES.items():
    overrides = [m for arg in argv[1:] if (m := re.match(rf"--?{re.escape(name)}\.([^=]+)(=.*)?$", arg))]
    given = [arg.split("=", 1)[1] for arg in argv[1:] if re.match(rf"--?{re.escape(name)}=", arg)]
    path = given[-1] if given else default
    if not overrides or path is None:
      continue
    config = ConfigFileFlagParser(name).parse(path)
    for match in overrides:
      problem = _missing_field(config, match.group(1))
      if problem:
        return f"--{name}.{match.group(1)}{match.group(2) or ''}: {problem}"
  return None


def _missing_field(config: Any, dotted: str) -> str | None:
  node, seen = config, ["config"]
  for key in dotted.split("."):
    if not isinstance(node, ConfigDict):
      return None
    if key not in node:
      fields = sorted(node.keys())
      close = difflib.get_close_matches(key, fields, n=1)
      hint = f"did you mean {close[0]}?" if close else f"its fields are {', '.join(fields)}"
      return f"{'.'.join(seen)} has no field {key!r}; {hint}"
    node = node[key]
    seen.append(key)
  return None
