"""The markdown report of one `benchmarks.run` invocation: header, table, notes."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks import suites


def _values(side: dict | None, key: str) -> list[float]:
  if not side:
    return []
  return [float(r[key]) for r in side.get("runs", []) if key in r]


def _fmt(x: float) -> str:
  return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def _cell(values: list[float]) -> str:
  if not values:
    return ""
  med = statistics.median(values)
  if len(values) == 1:
    return _fmt(med)
  return f"{_fmt(med)} ({_fmt(min(values))}-{_fmt(max(values))})"


def _side_cell(row: suites.Row, results: dict, peer_present: bool) -> tuple[str, list[float]]:
  """The comparison cell and its values; n/a / skipped / error when there are none."""
  if row.side is None:
    return "n/a", []
  side = results.get(row.side)
  if row.side != "ours" and side is None:
    return ("n/a" if peer_present or row.side == "ours" else "skipped (no torch)"), []
  if side is not None and "error" in side and not side.get("runs"):
    return f"error: {side['error'][:120]}", []
  vals = _values(side, row.side_metric)
  return (_cell(vals) or "n/a"), vals


def _verdict(row: suites.Row, ours: list[float], other: list[float]) -> tuple[str, str]:
  """(ratio text, target text with met / NOT met)."""
  if not ours:
    return "", row.target.text if row.target else ""
  mo = statistics.median(ours)
  ratio = None
  if other:
    mp = statistics.median(other)
    ratio = (mo / mp) if row.higher_better else (mp / mo)
  rtext = f"{ratio:.2f}x" if ratio is not None else ""
  t = row.target
  if t is None:
    return rtext, ""
  if t.kind == "ratio":
    met = None if ratio is None else ratio >= t.value
  elif t.kind == "max_s":
    met = mo < t.value
  elif t.kind == "min":
    met = mo >= t.value
  else:  # le_side
    met = None if not other else mo <= statistics.median(other)
  word = "not measured" if met is None else ("met" if met else "**NOT met**")
  return rtext, f"{t.text}: {word}"


def table(items: list[suites.Item], results: dict, rows: list[suites.Row],
          peer_present: bool) -> list[str]:
  lines = ["| item | metric | ctdiff-jax | compared with | their value | speed ratio | target |",
           "|---|---|---|---|---|---|---|"]
  titles = {i.name: i.title for i in items}
  for row in rows:
    if row.item not in results:
      continue
    res = results[row.item]
    if row.side not in (None, "ours") and row.side not in res and peer_present:
      continue  # e.g. no torch.compile side was run
    ours_vals = _values(res.get("ours"), row.ours)
    ours_cell = _cell(ours_vals) or (f"error: {res['ours'].get('error', '')[:120]}"
                                     if "error" in res.get("ours", {}) else "n/a")
    other_cell, other_vals = _side_cell(row, res, peer_present)
    ratio, target = _verdict(row, ours_vals, other_vals)
    lines.append(f"| {titles[row.item]} | {row.label} | {ours_cell} | {row.side_label} | "
                 f"{other_cell} | {ratio} | {target} |")
  return lines


def _setups(items: list[suites.Item], results: dict) -> list[str]:
  lines = []
  for item in items:
    for side, res in results.get(item.name, {}).items():
      setup = {k: (round(v, 2) if isinstance(v, float) else v)
               for k, v in res.get("setup", {}).items()}
      extra = f"; error: {res['error']}" if "error" in res else ""
      if setup or extra:
        lines.append(f"- {item.name} / {side}: {setup}{extra}")
  return lines


# Other processes' share of the machine's CPU above which the report says it was shared.
FOREIGN_CPU_LIMIT = 0.1


def _busy(machine: dict[str, Any]) -> bool:
  """Whether other jobs ran: their measured CPU share, else (no /proc) the load average."""
  if machine.get("foreign_cpu") is not None:
    return machine["foreign_cpu"] > FOREIGN_CPU_LIMIT
  try:
    loads = [float(machine[k].split()[0]) for k in ("load", "load_end")]
  except (KeyError, ValueError, IndexError):
    return False
  return max(loads) > (machine.get("cores") or 1)


def markdown(meta: dict[str, Any], items: list[suites.Item], results: dict,
             rows: list[suites.Row]) -> str:
  m, info = meta["machine"], meta["info"]
  ours, peer = info.get("ours", {}), info.get("peer", {})
  versions = (f"jax {ours.get('jax', '?')}, jaxlib {ours.get('jaxlib', '?')}, "
              f"flax {ours.get('flax', '?')}")
  if peer:
    versions += f"; torch {peer.get('torch')}, monai {peer.get('monai')}"
  lines = [
      f"# Benchmarks: ctdiff-jax vs PyTorch/MONAI ({meta['suite']} suite"
      f"{', dry run' if meta['dry_run'] else ''})", "",
      f"- Date: {meta['started'][:16].replace('T', ' ')} UTC; took {meta['seconds']:.0f} s",
      f"- Machine: {m['cpu']}, {m['cores']} cores; load average (1/5/15 min) at start "
      f"{m['load']}, at end {m['load_end']}"
      + (f"; other processes used {100 * m['foreign_cpu']:.0f}% of its CPU during the run"
         if m.get("foreign_cpu") is not None else ""),
      f"- Devices: ours {ours.get('device', '?')} ({ours.get('platform', '?')}); peer "
      f"{peer.get('device', 'not run (no torch)')}",
      f"- Versions: {versions}",
      f"- Command: `{meta['command']}`", "",
      "Medians over the timed repeats with (min-max); ours and the peer ran in the same "
      "invocation, in separate processes, alternating repeat by repeat. Speed ratio > 1 means "
      "ctdiff-jax is faster (for seconds: their time / ours).", "",
  ]
  if _busy(m):
    lines += [f"**The machine was shared with other jobs during this run** (other processes "
              f"used more than {100 * FOREIGN_CPU_LIMIT:.0f}% of its {m['cores']} cores' CPU, or "
              "without that measure its load average was above its cores). Absolute numbers are lower than on an idle machine; "
              "because the sides alternate repeat by repeat in one run, the ratios are fairer "
              "than the absolute values, but still noisy (see the min-max).", ""]
  lines += table(items, results, rows, peer_present=bool(meta.get("peer_python")))
  if meta.get("not_run"):
    lines += ["", f"Not run (the invocation was stopped before them): "
              f"{', '.join(meta['not_run'])}."]
  setups = _setups(items, results)
  if setups:
    lines += ["", "Setup of each side (sizes, first-call seconds incl. compile, sanity values):",
              ""] + setups
  return "\n".join(lines) + "\n"
