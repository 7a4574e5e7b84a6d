"""The quickstart entry point at a tiny size: every stage runs and the report is written.

The diffusion UNets are shrunk (as in tests/evaluation/test_evaluate.py) so the CPU compile
stays small; everything else is the quickstart's own code path (`run`, as `main` calls it).
Needs the FID weight archive (conftest.fid_source).
"""

import csv
import json
import os

import pytest

from ctdiff_jax import quickstart


@pytest.fixture
def tiny_models(monkeypatch):
  smoke_config = quickstart.smoke_config

  def tiny(module, **kwargs):
    config = smoke_config(module, **kwargs)
    if config.model_family == "diffusion":
      config.model.channels = (8, 16)
      config.model.attention_levels = (False, True)
      config.model.head_dim = 8
    # A few slices; crops at the slice size and the FID batch of test_evaluate share its
    # Inception compile.
    config.eval.num_samples = 4
    config.eval.crop_size = 32
    config.eval.fid_batch_size = 24
    config.eval.bootstrap = 2
    return config

  monkeypatch.setattr(quickstart, "smoke_config", tiny)


def test_quickstart_tiny(tiny_models, fid_source, tmp_path, monkeypatch):
  del tiny_models
  if not os.path.isfile(os.environ.get("CTDIFF_FID_WEIGHTS", "")):
    monkeypatch.setenv("CTDIFF_FID_WEIGHTS", str(tmp_path / "inception_fid.npz"))
    from ctdiff_jax.evaluation.fid import weights  # pylint: disable=g-import-not-at-top
    weights.convert(fid_source, tmp_path / "inception_fid.npz")
  out = tmp_path / "qs"
  paths = quickstart.run(str(out), num_cases=4, seed=0, steps=2, image_size=32,
                         spacing_mm=12.0, num_samples=2, sampling_steps=2)
  report = out / "report"
  for name in ("figure4.png", "figure4_context.png", "figure4_tumor.png", "table1.md",
               "table1.csv", "table1.json", "per_slice.csv", "training_loss.png",
               "scenarios.md", "downstream.md", "downstream.png", "consistency.md",
               "volume25d.png", "volume25d.md"):
    assert (report / name).is_file() and (report / name).stat().st_size > 0, name
  assert paths["Table 1"] == str(report / "table1.md")
  # Downstream arms x 3 seeds and the mask consistency of both train-split exports.
  downstream = json.loads((report / "downstream.json").read_text())
  assert [r["arm"] for r in downstream["summary"]] == ["real", "real+organ+tumor", "organ+tumor"]
  assert all(len(r["seeds"]) == 3 for r in downstream["summary"])
  assert {"organ", "tumor"} < set(json.loads((report / "consistency.json").read_text())[
      "scenarios"])
  # Each scenario beside the ring-mean fill, and the tumour's three W1 numbers.
  scen = (report / "scenarios.md").read_text()
  for scenario in ("organ", "context", "tumor"):
    assert f"| {scenario} | 2 |" in scen, scen
  assert "W1(generated, real lesions) =" in scen and "W1(generated, replaced host) =" in scen
  for scenario in ("organ", "context", "tumor"):
    with open(out / "synthetic" / scenario / "manifest.csv", newline="") as f:
      assert len(list(csv.DictReader(f))) == 2, scenario
  (row,) = json.loads((report / "table1.json").read_text())["rows"]
  assert (row["organ"], row["split"]) == ("kidneys", "test")
  assert row["num_slices"] == 4
  assert {m for m, v in row["methods"].items() if v} == {"pix2pix", "diffusion", "neighbour"}
  assert row["methods"]["pix2pix"]["checkpoint"]["model_family"] == "pix2pix"
  md = (report / "table1.md").read_text()
  rows = [line for line in md.splitlines() if line.startswith("| kidneys")]
  assert rows == [rows[0]] and rows[0].startswith(f"| kidneys (test) | {row['num_slices']} |")
