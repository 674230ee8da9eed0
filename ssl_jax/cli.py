"""What every command-line entry point shares: quiet library logs and one-line user errors.

`cli.run(main)` replaces `absl.app.run(main)`:
  * library INFO logs (orbax, absl, jax backend probing) are off unless `--verbosity` is given
    (e.g. `--verbosity=0` brings INFO back, `-v 1` debug);
  * a `UserError` (bad config value, unknown variant, missing dataset or checkpoint) and a bad
    flag print `error: <message>` on one line and exit with status 2; anything else is a bug and
    keeps its traceback.
"""
from __future__ import annotations

import logging as py_logging
import re
import sys
from typing import Callable, Sequence

from absl import app, flags, logging

from ssl_jax.errors import UserError

USAGE_ERROR = 2


def fail(message: str) -> None:
  """Prints `error: message` as one line on stderr and exits with status 2."""
  print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
  sys.exit(USAGE_ERROR)


def _root_user_error(error: BaseException) -> UserError | None:
  """The innermost UserError in an exception's cause/context chain (config_flags re-raises a
  config file's error with the traceback pasted into the message; the original is inside)."""
  found, seen = None, set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, UserError):
      found = error
    error = error.__cause__ or error.__context__
  return found


def _parse_flags(argv: Sequence[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except (flags.Error, UserError) as e:
    fail(str(_root_user_error(e) or e))
  except (AttributeError, KeyError) as e:  # an override of a config field that does not exist
    message = e
    while isinstance(message, BaseException) and message.args:
      message = message.args[0]
    text = re.sub(r"^'([^']*)'", r"\1", str(message))
    fail(f"unknown config field in the command line: {text}")
  return []  # unreachable


def loaded_config(holder, flag: str = "config"):
  """The ConfigDict of a `config_flags` flag, or a one-line error when its file did not load."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = holder.value
  if not isinstance(config, ml_collections.ConfigDict):
    path = getattr(flags.FLAGS[flag], "config_filename", "?")
    fail(f"--{flag}: cannot load config file {path!r} (no such file, or it has no get_config)")
  return config


def quiet_logs() -> None:
  """Library logs at WARNING unless the user asked for a verbosity."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    for name in ("jax", "orbax", "absl", "grain"):
      py_logging.getLogger(name).setLevel(py_logging.WARNING)


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)` with quiet logs and one-line user errors (see the module docstring)."""

  def wrapped(argv):
    quiet_logs()
    try:
      main(argv)
    except UserError as e:
      fail(str(e))
    except app.UsageError as e:
      fail(str(e))

  app.run(wrapped, flags_parser=_parse_flags)
