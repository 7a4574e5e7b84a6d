"""Tests of ctdiff_jax/cli.py, the error handling and quieting every CLI shares.

A tiny CLI (written to tmp) runs in a subprocess per case: what it raises decides the exit
status, the `<prog>: error: ...` line and whether a traceback shows (--verbose /
CTDIFF_VERBOSE=1). The real build CLI is tested the same way in tests/ingest/test_build_cli.py.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from ctdiff_jax import cli

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

FAKE_CLI = textwrap.dedent("""
    import logging
    from absl import app, flags
    from absl import logging as absl_logging
    from ctdiff_jax import cli

    flags.DEFINE_string("fail", None, "What to raise.")
    flags.DEFINE_integer("n", 1, "A number.")

    def main(argv):
      kind = flags.FLAGS.fail
      if kind == "user":
        raise cli.UserError("case 'c1': /raw/c1_ct.nii.gz: broken header\\ndetail line")
      if kind == "value":
        raise ValueError("image_size must be in [8, 4096], got 4")
      if kind == "missing":
        open("/nonexistent/dir/file.json")
      if kind == "noted":
        e = FileExistsError("out/ exists: pass --overwrite")
        e.add_note("note: written by an earlier run")
        raise e
      if kind == "usage":
        raise app.UsageError("pass --workdir=<dir>")
      if kind == "bug":
        raise RuntimeError("internal invariant broken")
      if kind == "interrupt":
        raise KeyboardInterrupt
      absl_logging.info("library chatter")
      absl_logging.warning("library warning")
      logging.getLogger("ctdiff_jax.fake").warning("our own note")
      print("done", argv[1:])

    cli.run(main, "ctdiff_jax.fake")
""")


def run_cli(tmp_path: pathlib.Path, *args: str, env: dict | None = None
            ) -> subprocess.CompletedProcess:
  script = tmp_path / "fake_cli.py"
  script.write_text(FAKE_CLI)
  full_env = {k: v for k, v in os.environ.items() if k != cli.VERBOSE_ENV}
  full_env.update(env or {})
  full_env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
  return subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=full_env,
                        capture_output=True, text=True, timeout=120, check=False)


P = "ctdiff_jax.fake: error: "
# name -> (args, env, exit status, stderr must contain, traceback shown)
CASES = {
    "user_error": (["--fail=user"], {}, 1,
                   P + "case 'c1': /raw/c1_ct.nii.gz: broken header\ndetail line", False),
    "value_error": (["--fail=value"], {}, 1, P + "image_size must be in [8, 4096], got 4",
                    False),
    "missing_file": (["--fail=missing"], {}, 1,
                     P + "[Errno 2] No such file or directory: '/nonexistent/dir/file.json'",
                     False),
    "notes_follow": (["--fail=noted"], {}, 1, P + "out/ exists: pass --overwrite\n"
                     "note: written by an earlier run", False),
    "usage_error": (["--fail=usage"], {}, 1, P + "pass --workdir=<dir>", False),
    "bad_flag_value": (["--n=abc"], {}, 1, P + "flag --n=abc: invalid literal for int() with "
                       "base 10: 'abc' (see --helpshort)", False),
    "unknown_flag": (["--nope=1"], {}, 1, P + "Unknown command line flag 'nope' (see --helpshort)",
                     False),
    "interrupt": (["--fail=interrupt"], {}, cli.EXIT_INTERRUPTED, "ctdiff_jax.fake: interrupted",
                  False),
    # A bug is not a user error: its traceback stays.
    "bug": (["--fail=bug"], {}, 1, "RuntimeError: internal invariant broken", True),
    "verbose_flag": (["--fail=user", "--verbose"], {}, 1, "cli.UserError: case 'c1'", True),
    "verbose_env": (["--fail=value"], {cli.VERBOSE_ENV: "1"}, 1, "ValueError: image_size", True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_errors(tmp_path, name):
  args, env, status, expected, traceback = CASES[name]
  proc = run_cli(tmp_path, *args, env=env)
  assert proc.returncode == status, proc.stderr
  assert expected in proc.stderr, proc.stderr
  assert ("Traceback (most recent call last)" in proc.stderr) == traceback, proc.stderr
  if not traceback:  # the error is the last thing said, on stderr only
    assert proc.stderr.rstrip().endswith(expected), proc.stderr
    assert P not in proc.stdout


def test_normal_run_keeps_our_logs_and_drops_library_info(tmp_path):
  proc = run_cli(tmp_path, "arg")
  assert proc.returncode == 0 and "done ['arg']" in proc.stdout, proc.stderr
  assert "our own note" in proc.stderr and "library warning" in proc.stderr
  assert "library chatter" not in proc.stderr
  # --verbose, or an explicit absl verbosity, keeps the library's INFO lines.
  for args in (["--verbose"], ["--verbosity=0"]):
    proc = run_cli(tmp_path, *args)
    assert proc.returncode == 0 and "library chatter" in proc.stderr, (args, proc.stderr)


def test_error_line_and_user_error():
  assert cli.error_line("p", ValueError("x\ny")) == "p: error: x\ny"
  assert cli.error_line("p", KeyError()) == "p: error: KeyError"
  assert issubclass(cli.UserError, Exception) and not issubclass(cli.UserError, ValueError)
