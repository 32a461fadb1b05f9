"""How every benchmark reads a config, the way `python -m tidar_jax.train` does (ml_collections'
config_flags) so that a config and its overrides mean the same in both:

* `load_config(spec)`: a configs/ name ("tiny", "1p5b") or the path of a config file;
* `apply_overrides(config, {"train.steps": "100"})`: each dotted field set as
  `--config.train.steps=100` sets it, the text parsed by the type of the value it replaces (int,
  float, bool as true/false/1/0, tuple, str); an unknown field or an unparsable value is a
  ValueError that names it;
* `split_override_args(argv)`: the `--config.<field>=value` arguments of a command line.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, Mapping, Sequence

from absl import flags
from ml_collections import ConfigDict, config_flags

import configs

CONFIGS_DIR = os.path.dirname(os.path.abspath(configs.__file__))
OVERRIDE_ARG = re.compile(r"^--config\.([\w.]+)=(.*)$")
_FLAG = "config"
_PROGRAM = "benchmarks"  # argv[0] of the private flag parses below


def config_path(spec: str) -> str:
  """`spec` itself where it is a file, else configs/<spec>.py."""
  if os.path.isfile(spec):
    return spec
  path = os.path.join(CONFIGS_DIR, f"{spec}.py")
  if os.path.isfile(path):
    return path
  raise FileNotFoundError(f"--config={spec}: neither a config file nor a name in configs/ (configs/{spec}.py)")


def load_config(spec: str) -> ConfigDict:
  """get_config() of a configs/ name or a config file, loaded by config_flags (unlocked: the
  benchmarks set fields of it)."""
  argv = [_PROGRAM, f"--{_FLAG}={config_path(spec)}"]
  values = flags.FlagValues()  # private: the benchmarks' own flags are argparse's, not absl's
  config_flags.DEFINE_config_file(_FLAG, None, flag_values=values, sys_argv=argv, lock_config=False)
  try:
    with warnings.catch_warnings():  # config_flags loads the file with importlib's deprecated load_module()
      warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
      values(argv)
  except flags.Error as e:  # config_flags puts get_config()'s whole traceback in the message: keep its cause
    raise ValueError(f"--config={spec}: cannot load it ({str(e).strip().splitlines()[-1]})") from e
  config = values[_FLAG].value
  getattr(config, "keys")  # config_flags defers a load error to the config's first use: raise it here
  return config


def apply_overrides(config: ConfigDict, overrides: Mapping[str, Any]) -> ConfigDict:
  """Sets each dotted field of `config` in place, in order, through config_flags as the command-line
  override `--config.<field>=<value>` would; a value that is not text is first written as such text
  (True -> "true"). Returns `config`."""
  for dotted, value in overrides.items():
    arg = f"--{_FLAG}.{dotted}={_as_text(value)}"
    argv = [_PROGRAM, arg]
    values = flags.FlagValues()
    try:
      config_flags.DEFINE_config_dict(_FLAG, config, flag_values=values, sys_argv=argv, lock_config=False)
      values(argv)
    except (KeyError, AttributeError) as e:  # config_flags' unknown field, with its closest name
      raise ValueError(f"{arg}: unknown field {_one_line(_innermost(e))}") from e
    except flags.Error as e:
      raise ValueError(f"{arg}: {_one_line(str(e)).removeprefix(f'flag {arg}: ')}") from e
  return config


def split_override_args(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
  """({field: value text} of the `--config.<field>=value` arguments, the other arguments)."""
  overrides: dict[str, str] = {}
  rest = []
  for arg in argv:
    m = OVERRIDE_ARG.match(arg)
    if m:
      overrides[m.group(1)] = m.group(2)
    else:
      rest.append(arg)
  return overrides, rest


def _as_text(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  return str(value)


def _innermost(error: BaseException) -> Any:
  """The message under config_flags' wrapping (an AttributeError holding the KeyError holding it)."""
  while isinstance(error, BaseException) and error.args:
    error = error.args[0]
  return error


def _one_line(message: Any) -> str:
  return " ".join(str(message).split())
