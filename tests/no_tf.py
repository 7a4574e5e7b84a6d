"""Run Python code in a subprocess where `import tensorflow` fails (the TF-free path).

A meta-path finder rather than sys.modules['tensorflow'] = None, because TFDS reads the latter
as "TF is loaded".
"""

import os
import pathlib
import subprocess
import sys
import textwrap

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

BLOCK_TF = textwrap.dedent("""
    import importlib.machinery, sys
    class _BlockTF:
      def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
          return importlib.machinery.ModuleSpec(name, self)
      def create_module(self, spec):
        raise ImportError("TensorFlow is blocked in this test")
      def exec_module(self, module):
        raise ImportError("TensorFlow is blocked in this test")
    sys.meta_path.insert(0, _BlockTF())
    try:
      import tensorflow
      raise SystemExit("TensorFlow import was not blocked")
    except ImportError:
      pass
""")


def run_python(code: str, timeout: float = 300, env: dict | None = None
               ) -> subprocess.CompletedProcess:
  """Runs `code` with TensorFlow blocked; asserts exit 0 and returns the process."""
  full_env = dict(os.environ, **(env or {}))
  full_env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
  proc = subprocess.run([sys.executable, "-c", BLOCK_TF + textwrap.dedent(code)], cwd=REPO_ROOT,
                        env=full_env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc
