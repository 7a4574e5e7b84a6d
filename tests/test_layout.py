"""The package layout stays readable: no import circle, a shallow graph, short functions.

Run as a script to print the import graph by level (`python tests/test_layout.py`).
The graph is read from the source (every `import`, also lazy ones inside functions), so it
needs no imports of the package itself.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "ctdiff_jax"
ENTRY_POINTS = ("ctdiff_jax.train", "ctdiff_jax.generate", "ctdiff_jax.evaluate",
                "ctdiff_jax.build_dataset", "ctdiff_jax.quickstart", "ctdiff_jax.phantom.__main__")
MAX_LEVELS = 6  # modules below an entry point on the longest import chain
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, pathlib.Path]:
  mods = {}
  for path in sorted((REPO_ROOT / PACKAGE).rglob("*.py")):
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    mods[".".join(parts)] = path
  return mods


def _import_nodes(tree: ast.Module, lazy: bool):
  """Import statements executed when the module is imported (or all of them, with lazy)."""
  if lazy:
    yield from (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return
  todo = list(tree.body)
  while todo:  # module level, including inside module-level if/try, not inside def/class
    node = todo.pop()
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      yield node
    elif isinstance(node, (ast.If, ast.Try)):
      todo.extend(ast.iter_child_nodes(node))
    elif isinstance(node, ast.ExceptHandler):
      todo.extend(node.body)


def import_graph(lazy: bool = False) -> dict[str, set[str]]:
  """module -> the package modules importing it imports (`import a.b.c` also runs a.b).

  By default the import-time graph (what `python -X importtime` sees); `lazy=True` adds the
  imports deferred into function bodies.
  """
  mods = _modules()
  graph: dict[str, set[str]] = {m: set() for m in mods}
  for mod, path in mods.items():
    for node in _import_nodes(ast.parse(path.read_text()), lazy):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods
                   else node.module for a in node.names]
      for t in targets:
        while t.startswith(PACKAGE + "."):  # a submodule import runs its parent packages
          if t in mods and t != mod and not mod.startswith(t + "."):
            graph[mod].add(t)
          t = t.rpartition(".")[0]
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(m: str) -> list[str] | None:
    state[m] = 1
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        return stack[stack.index(n):] + [n]
      if n not in state:
        found = visit(n)
        if found:
          return found
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def depth(graph: dict[str, set[str]], mod: str, memo: dict[str, int] | None = None) -> int:
  """Length of the longest import chain below `mod` (0 for a module importing nothing)."""
  memo = {} if memo is None else memo
  if mod not in memo:
    memo[mod] = 1 + max((depth(graph, n, memo) for n in graph[mod]), default=-1)
  return memo[mod]


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
  paths = [*_modules().values(), *sorted((REPO_ROOT / "configs").glob("*.py")),
           *sorted((REPO_ROOT / "data_builders").rglob("*.py")),
           *sorted((REPO_ROOT / "benchmarks").rglob("*.py"))]
  found = []
  for path in paths:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > limit:
          found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} ({n} lines)")
  return found


@pytest.mark.parametrize("lazy", [False, True])
def test_no_import_cycle(lazy):
  assert find_cycle(import_graph(lazy)) is None, find_cycle(import_graph(lazy))


def test_cycle_finder_finds_a_planted_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
  assert find_cycle(graph) == ["a", "b", "c", "a"]
  assert depth({"a": {"b"}, "b": {"c"}, "c": set()}, "a") == 2


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_import_depth_below_entry_points(entry):
  graph = import_graph()
  assert entry in graph, f"entry point {entry} is missing"
  assert depth(graph, entry) <= MAX_LEVELS, _chain(graph, entry)


def test_reading_a_dataset_never_imports_build_code():
  graph = import_graph()
  seen, todo = set(), ["ctdiff_jax.data.sources", "ctdiff_jax.data.pipeline",
                       "ctdiff_jax.training.trainer"]
  while todo:
    m = todo.pop()
    if m not in seen:
      seen.add(m)
      todo.extend(graph[m])
  # sources imports the build driver lazily, only to build a missing dataset on request.
  lazy_ok = {"ctdiff_jax.ingest.build", "ctdiff_jax.ingest.builder"}
  top_level = {m for m in seen if m in lazy_ok and _imported_at_top_level(m, seen)}
  assert not top_level, top_level


def _imported_at_top_level(target: str, importers: set[str]) -> bool:
  mods = _modules()
  for mod in importers:
    for node in ast.parse(mods[mod].read_text()).body:
      if isinstance(node, ast.ImportFrom) and node.module and (
          f"{node.module}.{node.names[0].name}" == target or node.module == target):
        return True
  return False


def test_no_function_over_the_limit():
  assert not long_functions(), "\n".join(long_functions())


def test_configs_import_no_library_code():
  for path in sorted((REPO_ROOT / "configs").glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      assert not any(n.startswith(PACKAGE) for n in names), f"{path.name} imports {names}"


def _chain(graph: dict[str, set[str]], mod: str) -> str:
  chain = [mod]
  while graph[chain[-1]]:
    chain.append(max(graph[chain[-1]], key=lambda n: depth(graph, n)))
  return " -> ".join(chain)


if __name__ == "__main__":
  g = import_graph()
  lazy_g = import_graph(lazy=True)
  print(f"cycle: {find_cycle(g)}; counting deferred imports too: {find_cycle(lazy_g)}")
  for e in ENTRY_POINTS:
    print(f"{e}: {depth(lazy_g, e)} levels counting deferred imports: {_chain(lazy_g, e)}")
  for e in ENTRY_POINTS:
    print(f"{e}: {depth(g, e)} levels: {_chain(g, e)}")
  by_level: dict[int, list[str]] = {}
  for m in g:
    by_level.setdefault(depth(g, m), []).append(m)
  for lvl in sorted(by_level):
    print(f"level {lvl}: {', '.join(sorted(by_level[lvl]))}")
  sys.exit(0)
