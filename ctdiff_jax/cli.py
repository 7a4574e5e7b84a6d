"""Shared plumbing of the command-line entry points: user errors as one line, quiet libraries.

Every CLI (`python -m ctdiff_jax.<name>`) defines its flags and a `main(argv)` as usual and
hands both to `run` instead of absl's `app.run`:

  from ctdiff_jax import cli

  if __name__ == "__main__":
    _define_flags()
    cli.run(main, "ctdiff_jax.build_dataset", uses_tfds=True)

What `run` adds to `app.run`:
- User errors end the program with ONE message on stderr and exit status 1 (EXIT_USER_ERROR,
  the status of absl's UsageError and of a flag error), no traceback:
      <prog>: error: <what, which case / file / field, what to do>
  A message may span several lines only if its first line is the summary. User errors are
  `UserError` (below), the exception types in USER_ERRORS (ValueError, FileNotFoundError,
  FileExistsError, NotADirectoryError, PermissionError), absl's app.UsageError and flag parsing
  errors; pass `user_errors=` to narrow or extend the list.
- Anything else is a bug: it propagates with its traceback (Python's exit status 1).
- `--verbose` (a flag defined here, once, for every CLI) or the environment variable
  CTDIFF_VERBOSE=1 shows the traceback of user errors too and keeps library logging as is.
- Ctrl-C prints `<prog>: interrupted` and exits 130.
- On a CPU-only install, XLA compiles at LLVM -O1 (`xla_options`: shorter compiles, same speed).
- Unless verbose, `quiet_libraries` runs before `main`: absl-routed library logs (TFDS, Orbax)
  below WARNING are dropped and, with uses_tfds=True, TFDS's progress bars and its "Downloading
  and preparing dataset ..." banner (a print, not a log) too. Our own loggers (`ctdiff_jax.*`),
  summaries and tqdm bars are untouched. An explicit --verbosity / -v wins over the quieting.

Library code raises `UserError` (or a subclass) for problems the user can fix; like every user
error message it should name what is wrong, where (case, file, field) and what to do.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Sequence

from ctdiff_jax import xla_options

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130
VERBOSE_ENV = "CTDIFF_VERBOSE"
# Built-in exception types that, raised out of a CLI's main, are taken as user errors.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)
# TFDS's warning for every config not in BUILDER_CONFIGS (our suffixed names are such).
_TFDS_CHATTER = ("Using custom data configuration",)


class UserError(Exception):
  """A problem the user can fix (bad input, flag or file): shown as one line, no traceback."""


def verbose() -> bool:
  """True with --verbose or CTDIFF_VERBOSE=1 (tracebacks and library logs shown)."""
  if os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
    return True
  from absl import flags  # pylint: disable=g-import-not-at-top
  fl = flags.FLAGS
  return "verbose" in fl and fl.is_parsed() and bool(fl.verbose)


def define_flags() -> None:
  """Defines --verbose (idempotent; `run` calls it)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, f"Show tracebacks of user errors and library logs "
                      f"(same as env {VERBOSE_ENV}=1).")


def error_line(prog: str, error: BaseException | str) -> str:
  """`<prog>: error: <message>` (the exception's notes, if any, on the lines below)."""
  text = str(error).strip() or type(error).__name__
  notes = [str(n) for n in getattr(error, "__notes__", ())]
  return "\n".join([f"{prog}: error: {text}", *notes])


def fail(prog: str, error: BaseException | str, status: int = EXIT_USER_ERROR):
  """Prints the error line to stderr and exits with `status`."""
  sys.stdout.flush()
  print(error_line(prog, error), file=sys.stderr, flush=True)
  sys.exit(status)


class _DropChatter(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_TFDS_CHATTER)


def quiet_libraries(uses_tfds: bool = False) -> None:
  """Keeps library chatter out of normal output (see the module docstring)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO/WARNING lines
  explicit = "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present
  if not explicit:
    for name in ("absl", "orbax", "tensorflow"):  # TFDS and Orbax log through absl
      logging.getLogger(name).setLevel(logging.WARNING)
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropChatter) for f in absl_logger.filters):
    absl_logger.addFilter(_DropChatter())
  if uses_tfds:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()
    # The banner is a termcolor print of DatasetBuilder (no logger to turn down); our CLIs
    # print their own summary instead.
    builder_cls = tfds.core.DatasetBuilder
    for name in ("_log_download_bytes", "_log_download_done"):
      if hasattr(builder_cls, name):
        setattr(builder_cls, name, lambda self: None)


def run(main: Callable[[Sequence[str]], object], prog: str | None = None, *,
        user_errors: Sequence[type[BaseException]] = USER_ERRORS,
        uses_tfds: bool = False) -> None:
  """absl app.run(main) with the error handling and quieting of the module docstring."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  define_flags()
  xla_options.apply()  # before any jax computation: XLA reads XLA_FLAGS once
  prog = prog or os.path.basename(sys.argv[0])
  caught = (UserError, app.UsageError, *user_errors)

  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(prog, f"{e} (see --helpshort)")

  def wrapped(argv: Sequence[str]):
    if not verbose():
      quiet_libraries(uses_tfds)
    try:
      return main(argv)
    except KeyboardInterrupt:
      print(f"{prog}: interrupted", file=sys.stderr, flush=True)
      sys.exit(EXIT_INTERRUPTED)
    except caught as e:
      if verbose():
        raise
      fail(prog, e)

  app.run(wrapped, flags_parser=parse)
