"""Measuring helpers both sides share (stdlib only: the peer venv imports this too)."""

from __future__ import annotations

import time
from typing import Callable


def records_rates(build: Callable[[], list[int]], num_volumes: int) -> dict[str, float]:
  """One timed call of `build` (it returns the slice count of each volume), per second."""
  t0 = time.perf_counter()
  slices = sum(build())
  dt = time.perf_counter() - t0
  return {"volumes_s": num_volumes / dt, "slices_s": slices / dt}
