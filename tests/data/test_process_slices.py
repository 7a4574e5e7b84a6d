"""Multi-process data: each process's block of every global batch, and positioning by step.

The 2-process training test (tests/training/test_multihost.py) runs these through the trainer;
here they are checked alone, in one process, against a plain Grain loader.
"""

import grain.python as grain
import numpy as np
import pytest

from ctdiff_jax.data import pipeline


def _sampler():
  return grain.IndexSampler(num_records=23, shuffle=True, seed=3)


def test_process_blocks_are_disjoint_and_form_the_global_batches():
  local, count = 3, 2
  glob = _sampler()
  slices = [pipeline.ProcessSliceSampler(glob, local, p, count) for p in range(count)]
  for b in range(10):  # past the first epoch (23 records)
    blocks = [[s[b * local + i] for i in range(local)] for s in slices]
    want = [glob[b * local * count + i] for i in range(local * count)]
    got = blocks[0] + blocks[1]
    assert [m.index for m in got] == [m.index for m in want]
    assert [m.record_key for m in got] == [m.record_key for m in want]
    # Same per-record rng as the 1-process loader: masks/augmentations do not depend on it.
    assert all(g.rng.integers(1 << 30) == w.rng.integers(1 << 30) for g, w in zip(got, want))
    assert not {m.index for m in blocks[0]} & {m.index for m in blocks[1]}
  with pytest.raises(ValueError, match="process index 2"):
    pipeline.ProcessSliceSampler(glob, local, 2, count)


@pytest.mark.parametrize("workers", [0, 2])
def test_set_position_continues_where_n_batches_end(workers):
  def loader():
    pipeline.ensure_flags_parsed()
    return grain.DataLoader(data_source=pipeline.ListSource(list(range(100))),
                            sampler=_sampler(), operations=[grain.Batch(4)],
                            worker_count=workers)
  straight = iter(loader())
  batches = [np.asarray(next(straight)) for _ in range(7)]
  assert len({tuple(b) for b in batches}) == 7
  # Every Grain worker is a process: few iterators with workers (3: uneven batches per worker).
  for n in ((0, 1, 4, 5) if workers == 0 else (3,)):
    it = iter(loader())
    pipeline.set_position(it, n, 4)
    np.testing.assert_array_equal(np.asarray(next(it)), batches[n], err_msg=f"n={n}")
    np.testing.assert_array_equal(np.asarray(next(it)), batches[n + 1], err_msg=f"n={n}")
