"""A benchmark worker: one process, one side (ours or the peer), driven over stdin/stdout.

  python -m benchmarks.worker --side=ours|peer

Reads one JSON command per line and answers one line starting with PREFIX (libraries may print
to stdout too, so the driver only reads prefixed lines):
  {"cmd": "info"}                           -> versions and device of this side
  {"cmd": "setup", "item": X, "params": {}} -> builds item X (compiles, warms up); its numbers
  {"cmd": "run"}                            -> one timed repeat of the current item's metrics
  {"cmd": "quit"}
Stdlib only at import time: the peer venv runs this file without the project's dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback

PREFIX = "@@bench "


_CHANNEL = None  # the protocol's own copy of the original stdout (see `_claim_stdout`)


def _claim_stdout() -> None:
  """Keeps fd 1 for the protocol alone: library prints (progress bars, banners) go to stderr.

  A print without a newline would otherwise glue itself in front of an answer line.
  """
  global _CHANNEL
  sys.stdout.flush()
  _CHANNEL = os.fdopen(os.dup(sys.stdout.fileno()), "w")
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


def _reply(payload: dict) -> None:
  _CHANNEL.write(PREFIX + json.dumps(payload) + "\n")
  _CHANNEL.flush()


def serve(side_module) -> None:
  """The command loop; an item error is answered (with its traceback tail), not fatal."""
  item = None
  for line in sys.stdin:
    if not line.strip():
      continue
    cmd = json.loads(line)
    try:
      if cmd["cmd"] == "quit":
        _reply({"ok": True})
        return
      if cmd["cmd"] == "info":
        result = side_module.info()
      elif cmd["cmd"] == "setup":
        item = side_module.ITEMS[cmd["item"]](dict(cmd.get("params", {})))
        result = item.setup()
      elif cmd["cmd"] == "run":
        result = item.run()
      else:
        raise ValueError(f"unknown command {cmd['cmd']!r}")
      _reply({"ok": True, "result": result})
    except Exception as e:  # pylint: disable=broad-except  (reported to the driver)
      tail = traceback.format_exc().strip().splitlines()[-6:]
      _reply({"ok": False, "error": f"{type(e).__name__}: {e}"[:500], "trace": tail})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--side", choices=("ours", "peer"), required=True)
  args = parser.parse_args()
  _claim_stdout()
  serve(importlib.import_module(f"benchmarks.{args.side}"))


if __name__ == "__main__":
  main()
