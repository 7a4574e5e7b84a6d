"""Generation scenarios, the synthetic-dataset exporters and the generate CLI (CPU, tiny model).

A 4-case phantom cohort with tumours is built as kidney_tumor at 32 px x 12 mm (kidney=1,
tumour=2). The checkpoint is a random-weight train state written with the trainer's own
checkpointing module: a 2-step train_lib run costs minutes of XLA compile on a shared 2-core
CPU, and test_train.py covers the trainer. The model is untrained, so the tests check the
mechanics (masks, paste-back, labels, files, orientation, determinism), not image quality.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from configs import kidney_tumor, kidneys
from ctdiff_jax.ingest import build as ingest_build
from ctdiff_jax.ingest import naming
from ctdiff_jax.training import checkpointing
from ctdiff_jax.data import sources
from ctdiff_jax.generation import export
from ctdiff_jax.generation import runner
from ctdiff_jax import phantom
from ctdiff_jax.ingest import records
from ctdiff_jax.generation import scenarios
from ctdiff_jax.training import tasks
from ctdiff_jax.data import masks
from ctdiff_jax.data import pipeline
from no_tf import REPO_ROOT, run_python

SIZE, SPACING = 32, 12.0  # 32 px x 12 mm covers the phantom's 384 mm field of view
LESION = 2
# Phantom label ids -> kidney_tumor dataset ids (kidney = both kidneys).
PHANTOM_TO_DATASET = {phantom.ID["kidney_right"]: 1, phantom.ID["kidney_left"]: 1,
                      phantom.KIDNEY_TUMOR: 2}


def make_config(data_dir, module=kidney_tumor):
  config = module.get_config("smoke")
  config.data_dir = str(data_dir)
  config.image_size = SIZE
  config.spacing_mm = SPACING
  config.sampling.num_steps = 3
  return config


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, pathlib.Path]:
  root = tmp_path_factory.mktemp("generate_data")
  phantom.write_cohort(root / "raw", 4, seed=0, lesions=True, progress=False)
  for name in ("kidney_tumor", "kidneys"):
    ingest_build.build(name, root / "raw", root / "tfds", image_size=SIZE, spacing_mm=SPACING)
  return {"raw": root / "raw", "tfds": root / "tfds", "root": root}


def write_random_checkpoints(wd, config, seeds_by_step) -> pathlib.Path:
  """Random-weight train states (one numpy seed per step), saved by the trainer's module."""
  task = tasks.get_task(config, pipeline.cond_channels(config.data))
  abstract = jax.eval_shape(task.init_state, jax.random.key(0))
  manager = checkpointing.create_manager(str(wd), async_save=False, with_data=False)
  for step, seed in seeds_by_step.items():
    rng = np.random.default_rng(seed)
    state = jax.tree.map(
        lambda s: (rng.normal(0.0, 0.05, s.shape).astype(s.dtype)
                   if np.issubdtype(s.dtype, np.floating) else np.zeros(s.shape, s.dtype)),
        abstract)
    checkpointing.save(manager, step, state, None)
  manager.wait_until_finished()
  manager.close()
  return wd


@pytest.fixture(scope="module")
def workdir(data) -> pathlib.Path:
  """A valid checkpoint of the smoke model (random weights, see the module docstring)."""
  return write_random_checkpoints(data["root"] / "workdir", make_config(data["tfds"]), {0: 0})


@pytest.fixture(scope="module")
def two_step_workdir(data) -> pathlib.Path:
  """Steps 0 (the weights of `workdir`) and 7 (other weights; the latest)."""
  return write_random_checkpoints(data["root"] / "workdir_two_steps",
                                  make_config(data["tfds"]), {0: 0, 7: 1})


@pytest.fixture(scope="module")
def inpainter(data, workdir):
  """One Inpainter (one sampler compile) shared by the tests."""
  return runner.load_inpainter(make_config(data["tfds"]), str(workdir))


@pytest.fixture(scope="module")
def organ_export(data, inpainter):
  """The organ scenario with every exporter; more samples than test slices (cycling)."""
  config = make_config(data["tfds"])
  n_test = naming.read_dataset_metadata(data["tfds"], "kidney_tumor_32px_12mm")[
      "splits"]["test"]
  out = data["root"] / "organ_export"
  spec = runner.GenerateSpec("organ", num_samples=n_test + 3, seed=0, tfds=True, volumes=True)
  summary = runner.generate(config, inpainter, spec, str(out), progress=False)
  with open(out / "manifest.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  return {"summary": summary, "out": out, "rows": rows, "n_test": n_test, "config": config}


def source_records(config, split):
  source, _ = sources.open_split(config, split)
  return source


def find_record(config, case_id: str, slice_index: int):
  """The record of case/slice in whichever split holds it (a case is in one split)."""
  for split in ("train", "validation", "test"):
    source = source_records(config, split)
    for i in range(len(source)):
      rec = source[i]
      if (rec[records.CASE_ID].decode(), int(rec[records.SLICE_INDEX])) == (case_id,
                                                                           slice_index):
        return rec
  raise AssertionError(f"no record {case_id}/{slice_index} in any split")


def load_slice(path) -> tuple[np.ndarray, nib.Nifti1Image]:
  img = nib.load(str(path))
  arr = np.asarray(img.dataobj)
  assert arr.shape == (SIZE, SIZE, 1), path
  return export.from_ras(arr[..., 0]), img


# ---------------------------------------------------------------------------- organ + export


def test_manifest_rows_cycle_over_source_slices(organ_export):
  rows, n_test, out = organ_export["rows"], organ_export["n_test"], organ_export["out"]
  summary = organ_export["summary"]
  assert len(rows) == n_test + 3 == summary["num_samples"]
  assert list(rows[0]) == list(export.MANIFEST_COLUMNS)
  assert [int(r["index"]) for r in rows] == list(range(n_test + 3))
  assert {r["scenario"] for r in rows} == {"organ"}
  assert {r["source_split"] for r in rows} == {"test"}
  assert {int(r["checkpoint_step"]) for r in rows} == {0}
  # Every test slice has kidney: all are used once, then the cycle restarts at the first.
  assert len({r["source_index"] for r in rows[:n_test]}) == n_test
  assert [r["source_index"] for r in rows[n_test:]] == [r["source_index"] for r in rows[:3]]
  assert [int(r["round"]) for r in rows] == [0] * n_test + [1] * 3
  for r in rows:
    assert int(r["mask_pixels"]) > 0
    for key in ("ct_file", "seg_file", "mask_file", "png_file"):
      assert (out / r[key]).exists(), r[key]
  assert summary["skipped_count"] == 0


def test_nifti_outside_mask_is_source_hu_bit_for_bit(organ_export):
  config, rows, out = organ_export["config"], organ_export["rows"], organ_export["out"]
  source = source_records(config, "test")
  lo, hi = config.data.intensity_hu[0], config.data.intensity_hu[-1]  # The model's HU range.
  inside_changed = 0
  for r in rows:
    rec = source[int(r["source_index"])]
    ct, img = load_slice(out / r["ct_file"])
    seg, _ = load_slice(out / r["seg_file"])
    mask, _ = load_slice(out / r["mask_file"])
    assert img.get_data_dtype() == np.int16 and ct.dtype == np.int16
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_allclose(img.header.get_zooms(), rec[records.SPACING_MM], rtol=1e-6)
    src_hu = rec[records.IMAGE][..., 0]
    src_lab = rec[records.LABELS][..., 0]
    m = mask.astype(bool)
    # Organ scenario: the mask is the organ union, recomputed here independently.
    np.testing.assert_array_equal(m, src_lab > 0)
    assert int(r["mask_pixels"]) == m.sum()
    np.testing.assert_array_equal(ct[~m], src_hu[~m])
    np.testing.assert_array_equal(seg, src_lab)
    assert ct[m].min() >= lo and ct[m].max() <= hi
    inside_changed += int(np.sum(ct[m] != src_hu[m]))
  assert inside_changed > 0, "the model's output must replace the organ pixels"


def test_nifti_world_coordinates_match_the_raw_phantom(organ_export, data):
  """Exported labels sit at the same RAS world (x, y) as in the source volume."""
  rows, out = organ_export["rows"], organ_export["out"]
  matched = flipped = total = 0
  for r in rows[:organ_export["n_test"]]:
    seg_img = nib.load(str(out / r["seg_file"]))
    seg = np.asarray(seg_img.dataobj)[..., 0]
    raw = nib.load(str(data["raw"] / f"{r['source_case']}_seg.nii.gz"))
    raw_lab = np.asarray(raw.dataobj)
    lut = np.zeros(256, np.uint8)
    for k, v in PHANTOM_TO_DATASET.items():
      lut[k] = v
    z = int(r["slice_index"])
    ii, jj = np.nonzero(seg > 0)
    world = seg_img.affine @ np.stack([ii, jj, np.zeros_like(ii), np.ones_like(ii)])
    vox = np.linalg.solve(raw.affine, world)[:2]
    flip = vox.copy()
    flip[0] = raw_lab.shape[0] - 1 - flip[0]  # the mirror image (a left-right swap)
    for v, counter in ((vox, "ok"), (flip, "flip")):
      # Output pixel centres fall half-way between source voxels: accept either neighbour.
      hits = np.zeros(len(ii), bool)
      for fx in (np.floor, np.ceil):
        for fy in (np.floor, np.ceil):
          x = np.clip(fx(v[0]).astype(int), 0, raw_lab.shape[0] - 1)
          y = np.clip(fy(v[1]).astype(int), 0, raw_lab.shape[1] - 1)
          hits |= lut[raw_lab[x, y, z]] == seg[ii, jj]
      if counter == "ok":
        matched += hits.sum()
      else:
        flipped += hits.sum()
    total += len(ii)
  assert total > 0
  assert matched == total
  assert flipped < 0.9 * total, "the check must be able to tell a left-right flip"


def windowed_u8(hu, window) -> np.ndarray:
  """HU -> the uint8 grey of a PNG in the display window (computed here, not by export)."""
  lo, hi = window
  return np.rint(np.clip((np.asarray(hu, np.float64) - lo) / (hi - lo), 0, 1) * 255)


def test_figure4_and_previews(organ_export):
  out, rows, config = organ_export["out"], organ_export["rows"], organ_export["config"]
  window = tuple(config.eval.fid_window)
  fig = np.asarray(Image.open(out / "figure4.png")).astype(np.int32)
  scale = -(-export.FIGURE_TILE_PX // SIZE)
  tile, pad, header = SIZE * scale, 2, 16
  n = min(export.FIGURE_ROWS, len(rows))
  assert fig.shape == (header + n * (tile + pad) + pad, 3 * (tile + pad) + pad, 3)
  source = source_records(config, "test")
  up = lambda x: np.repeat(np.repeat(x, scale, axis=0), scale, axis=1)
  # Pixels of the masked-input column inside the mask but off its red outline.
  for i, r in enumerate(rows[:n]):
    y = header + pad + i * (tile + pad)
    col = lambda j: fig[y:y + tile, pad + j * (tile + pad):pad + j * (tile + pad) + tile]
    real, gen = source[int(r["source_index"])][records.IMAGE][..., 0], load_slice(
        out / r["ct_file"])[0]
    m = up(load_slice(out / r["mask_file"])[0] > 0)
    inner = ndimage.binary_erosion(m)
    want_real, want_gen = up(windowed_u8(real, window)), up(windowed_u8(gen, window))
    for j, want in ((0, want_real), (2, want_gen)):
      assert np.all(col(j) == col(j)[..., :1]), "grey columns"
      assert np.abs(col(j)[..., 0] - want).max() <= 1, (i, j)
    masked = col(1)
    assert np.abs(masked[~m][:, 0] - want_real[~m]).max() <= 1, i
    assert np.all(np.abs(masked[inner] - 128) <= 1), "inside the mask: mid-grey"
    edge = m & ~inner
    assert np.all((masked[edge][:, 0] > 200) & (masked[edge][:, 1] < 80)), "red outline"
    # The generated column is the model's slice, not the ground truth.
    assert np.any(want_gen[m] != want_real[m]), i
  png = np.asarray(Image.open(out / rows[0]["png_file"]))
  assert png.shape == (SIZE, SIZE) and png.dtype == np.uint8
  assert np.abs(png - windowed_u8(load_slice(out / rows[0]["ct_file"])[0], window)).max() <= 1


def test_volumes_stack_each_case_and_round(organ_export):
  out, rows, config = organ_export["out"], organ_export["rows"], organ_export["config"]
  source = source_records(config, "test")
  by_group: dict[tuple[str, str], list[dict]] = {}
  for r in rows:
    by_group.setdefault((r["source_case"], r["round"]), []).append(r)
  files = sorted(os.listdir(out / "volumes"))
  assert len(files) == 3 * len(by_group)
  for (case, rnd), group in by_group.items():
    by_z = {int(r["slice_index"]): r for r in group}
    z0, nz = min(by_z), max(by_z) - min(by_z) + 1
    for kind, pad_value in (("ct", export.PAD_HU), ("seg", 0), ("mask", 0)):
      vol = nib.load(str(out / "volumes" / f"{case}_r{rnd}_{kind}.nii.gz"))
      assert vol.shape == (SIZE, SIZE, nz)
      assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
      data = np.asarray(vol.dataobj)
      for k in range(nz):
        got = export.from_ras(data[..., k])
        r = by_z.get(z0 + k)
        if r is None:  # A z gap between the case's generated slices.
          assert np.all(got == pad_value), (case, rnd, kind, k)
          continue
        ref, img = load_slice(out / r[f"{kind}_file"])
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_allclose(vol.affine @ [0, 0, k, 1], img.affine @ [0, 0, 0, 1])
        src_lab = source[int(r["source_index"])][records.LABELS][..., 0]
        if kind == "seg":  # Organ scenario: the labels are the source's.
          np.testing.assert_array_equal(got, src_lab)
        elif kind == "mask":
          np.testing.assert_array_equal(got, src_lab > 0)


def fake_samples(case_ids, slice_indices, rounds, seed=0) -> runner.Samples:
  """Random Samples (labels independent of the mask) to export without a model."""
  n, rng = len(case_ids), np.random.default_rng(seed)
  shape = (n, SIZE, SIZE, 1)
  hu = lambda: rng.integers(-1000, 1000, shape).astype(np.int16)
  labels = rng.integers(0, 3, shape).astype(np.uint8)
  return runner.Samples(
      index=np.arange(n), source_index=np.arange(n), round=np.asarray(rounds),
      case_id=list(case_ids), slice_index=np.asarray(slice_indices, np.int32),
      spacing_mm=np.tile(np.float32([SPACING, SPACING, 5.0]), (n, 1)), image_hu=hu(),
      prev_hu=hu(), next_hu=hu(), source_labels=labels, labels=labels,
      mask=(rng.random(shape) < 0.3).astype(np.uint8), generated=np.zeros(shape, np.float32),
      generated_hu=hu(), info=[{} for _ in range(n)])


def test_volumes_pad_z_gaps_and_stack_every_kind(tmp_path):
  samples = fake_samples(["a", "b", "a", "a"], [3, 0, 6, 3], [0, 0, 0, 1])
  exporter = export.Exporter(str(tmp_path), {"image_size": SIZE}, len(samples), formats=(),
                             volumes=True)
  exporter.add(samples)
  written = exporter.finish()
  members = {("a", 0): {3: 0, 6: 2}, ("b", 0): {0: 1}, ("a", 1): {3: 3}}
  kinds = {"ct": ("generated_hu", np.int16, -1024), "seg": ("labels", np.uint8, 0),
           "mask": ("mask", np.uint8, 0)}
  assert sorted(written["volumes"]) == sorted(
      str(tmp_path / "volumes" / f"{c}_r{r}_{k}.nii.gz") for c, r in members for k in kinds)
  for (case, rnd), by_z in members.items():
    z0, nz = min(by_z), max(by_z) - min(by_z) + 1
    for kind, (field, dtype, fill) in kinds.items():
      img = nib.load(str(tmp_path / "volumes" / f"{case}_r{rnd}_{kind}.nii.gz"))
      data = np.asarray(img.dataobj)
      assert data.shape == (SIZE, SIZE, nz) and img.get_data_dtype() == dtype
      np.testing.assert_allclose(img.header.get_zooms(), (SPACING, SPACING, 5.0))
      assert img.affine[2, 3] == z0 * 5.0
      for k in range(nz):
        j = by_z.get(z0 + k)
        want = (getattr(samples, field)[j, ..., 0] if j is not None
                else np.full((SIZE, SIZE), fill))
        np.testing.assert_array_equal(export.from_ras(data[..., k]), want, err_msg=f"{kind} {k}")
  assert not (tmp_path / ".spool").exists()


def test_tfds_export_loads_without_tensorflow(organ_export, data):
  out, rows = organ_export["out"], organ_export["rows"]
  summary = organ_export["summary"]
  assert summary["tfds_name"] == "ct_slices/kidney_tumor_32px_12mm"
  proc = run_python(f"""
      import sys, numpy as np, nibabel as nib
      import tensorflow_datasets as tfds
      from ctdiff_jax.data import sources
      from ctdiff_jax.generation import export
      from configs import kidney_tumor
      rows = {[(r["ct_file"], r["seg_file"], r["source_case"], int(r["slice_index"]),
                int(r["source_index"])) for r in rows]!r}
      out = {str(out)!r}
      src = tfds.data_source("ct_slices/kidney_tumor_32px_12mm", data_dir=out + "/tfds",
                             split="test")
      b = tfds.builder_from_directory({summary["tfds_dir"]!r})
      assert b.info.metadata["synthetic"]["scenario"] == "organ"
      assert b.info.features.keys() == src[0].keys()
      # Read like real data: the run config pointed at the export's data dir.
      config = kidney_tumor.get_config("smoke")
      config.data_dir, config.image_size, config.spacing_mm = out + "/tfds", 32, 12.0
      real_like, meta = sources.open_split(config, "test")
      config.data_dir = {str(data["tfds"])!r}
      source, _ = sources.open_split(config, "test")
      assert len(src) == len(rows) == len(real_like), (len(src), len(rows))
      for i, (ct, seg, case, z, source_index) in enumerate(rows):
        rec, orig = real_like[i], source[source_index]
        assert set(rec) == set(orig), i
        assert rec["image"].dtype == np.int16 and rec["labels"].dtype == np.uint8
        ct_arr = export.from_ras(np.asarray(nib.load(out + "/" + ct).dataobj)[..., 0])
        seg_arr = export.from_ras(np.asarray(nib.load(out + "/" + seg).dataobj)[..., 0])
        assert np.array_equal(rec["image"][..., 0], ct_arr), i
        assert np.array_equal(rec["labels"][..., 0], seg_arr), i
        # Everything but the image and labels is the source record's, feature by feature.
        for key in ("prev_image", "next_image", "spacing_mm", "case_id", "slice_index"):
          got, want = np.asarray(rec[key]), np.asarray(orig[key])
          assert got.dtype == want.dtype and np.array_equal(got, want), (i, key)
        assert rec["case_id"].decode() == case and int(rec["slice_index"]) == z
      assert "tensorflow" not in sys.modules
      print("TFDS_OK", len(src))
  """)
  assert f"TFDS_OK {len(rows)}" in proc.stdout


def test_synthetic_neighbours_are_the_source_neighbours(data, inpainter):
  config = make_config(data["tfds"])
  samples = runner.generate_samples(config, inpainter,
                                    runner.GenerateSpec("organ", num_samples=4, seed=1),
                                    progress=False)
  source = source_records(config, "test")
  for j in range(len(samples)):
    rec = source[int(samples.source_index[j])]
    np.testing.assert_array_equal(samples.prev_hu[j], rec[records.PREV_IMAGE])
    np.testing.assert_array_equal(samples.next_hu[j], rec[records.NEXT_IMAGE])
    np.testing.assert_array_equal(samples.image_hu[j], rec[records.IMAGE])


# ---------------------------------------------------------------------------- determinism


def test_ddim_same_seed_same_slices_and_paste_back_numerics(data, inpainter):
  config = make_config(data["tfds"])
  assert config.sampling.sampler == "ddim" and config.sampling.eta == 0.0
  run = lambda seed: runner.generate_samples(
      config, inpainter, runner.GenerateSpec("context", num_samples=10, seed=seed),
      progress=False)
  a, b, c = run(5), run(5), run(6)
  np.testing.assert_array_equal(a.generated, b.generated)
  np.testing.assert_array_equal(a.generated_hu, b.generated_hu)
  assert not np.array_equal(a.generated, c.generated)
  # Samples 8, 9 are in the second chunk (batch of 8 on 2 devices x 4): their own noise.
  assert not np.array_equal(a.generated[0], a.generated[8])
  m = a.mask.astype(bool)
  np.testing.assert_array_equal(a.generated_hu[~m], a.image_hu[~m])
  # Inside: rint of the HU of the model output, against a float64 reference (exact: the
  # paste-back maps in float64 too).
  ref = np.rint(np.interp(a.generated.astype(np.float64), config.data.intensity_unit,
                          config.data.intensity_hu))
  np.testing.assert_array_equal(a.generated_hu[m], ref[m].astype(np.int16))
  # The context mask is the organs' bounding box plus the margin (10 mm -> 1 px at 12 mm).
  for j in range(len(a)):
    expect = masks.bbox_mask(a.source_labels[j], (), config.data.bbox_margin_mm,
                             (SPACING, SPACING))
    np.testing.assert_array_equal(m[j, ..., 0], expect)
  assert a.run["checkpoint_step"] == 0 and a.run["scenario"] == "context"


def test_slices_do_not_depend_on_device_count_or_batch_size(data, workdir):
  """Noise is drawn per slice from (seed, the slice's index in the request), like training."""
  spec = runner.GenerateSpec("context", num_samples=7, seed=2)
  outs = {}
  for num_devices, batch_size in ((2, 4), (1, 4), (1, 3)):
    config = make_config(data["tfds"])
    config.num_devices, config.sampling.batch_size = num_devices, batch_size
    config.sampling.eta = 1.0  # DDIM with fresh noise at every step, not only at the start.
    inp = runner.load_inpainter(config, str(workdir))
    assert inp.parallel.num_devices == num_devices
    outs[num_devices, batch_size] = runner.generate_samples(config, inp, spec,
                                                            progress=False).generated
  for (nd, bs), out in outs.items():
    # Same slices up to float rounding of batch-size dependent kernels.
    np.testing.assert_allclose(out, outs[2, 4], rtol=0, atol=1e-5, err_msg=f"{nd} dev x {bs}")
  a = outs[2, 4]
  assert min(np.abs(a[i] - a[j]).max() for i in range(7) for j in range(i)) > 1e-3


# ---------------------------------------------------------------------------- tumour


def test_tumor_is_placed_inside_host_organ_and_labelled(tmp_path, data, inpainter):
  config = make_config(data["tfds"])
  out = tmp_path / "tumor"
  spec = runner.GenerateSpec("tumor", num_samples=8, seed=3, split="train", formats=("nifti",))
  summary = runner.generate(config, inpainter, spec, str(out), progress=False)
  assert summary["num_samples"] == 8 and "figure" in summary
  with open(out / "manifest.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  source = source_records(config, "train")
  rim_pixels = 0
  for r in rows:
    rec = source[int(r["source_index"])]
    src_lab = rec[records.LABELS][..., 0]
    seg, _ = load_slice(out / r["seg_file"])
    mask, _ = load_slice(out / r["mask_file"])
    ct, _ = load_slice(out / r["ct_file"])
    placed = (seg == LESION) & (src_lab != LESION)
    host = src_lab == 1
    assert placed.any() and int(r["lesion_pixels"]) == placed.sum()
    assert np.all(host[placed]), "the new tumour must lie inside the host organ"
    assert np.all(host[mask > 0]) and np.all(mask[placed] > 0)
    # The regenerated region is the placed tumour grown by blend_px (1 px: the 4-neighbours,
    # every pixel within 1 px), clipped to the host organ.
    rim = ndimage.binary_dilation(placed, structure=ndimage.generate_binary_structure(2, 1))
    assert scenarios.BLEND_PX == 1 and spec.blend_px == 1
    np.testing.assert_array_equal(mask > 0, rim & host)
    rim_pixels += int(np.sum((mask > 0) & ~placed))
    # A's own lesion and every other label are kept.
    np.testing.assert_array_equal(seg[~placed], src_lab[~placed])
    np.testing.assert_array_equal(ct[mask == 0], rec[records.IMAGE][..., 0][mask == 0])
    # Every split has tumours: the donor is another case (of any split).
    assert r["donor_case"] and r["donor_case"] != r["source_case"]
    # The placed tumour is the donor's tumour component, translated by the offset.
    donor = find_record(config, r["donor_case"], int(r["donor_slice"]))
    dy, dx = int(r["offset_dy"]), int(r["offset_dx"])
    moved = np.zeros_like(placed)
    rr, cc = np.nonzero(placed)
    moved[rr - dy, cc - dx] = True
    assert np.all(donor[records.LABELS][..., 0][moved] == LESION)
  assert rim_pixels > 0, "the rim around the placed tumours must be regenerated too"


def test_tumor_offset_given_and_nothing_fits(data):
  config = make_config(data["tfds"])
  planner, _, _ = runner.make_planner(config, runner.GenerateSpec("tumor", split="train"),
                                      progress=False)
  job = next(planner.jobs(1))
  dy, dx = job.info["offset"]
  given, _, _ = runner.make_planner(
      config, runner.GenerateSpec("tumor", split="train", offset=f"{dy},{dx}"), progress=False)
  job2 = next(given.jobs(1))
  assert job2.info["offset"] == (dy, dx)
  np.testing.assert_array_equal(job2.labels == LESION, job.labels == LESION)
  far, _, _ = runner.make_planner(
      config, runner.GenerateSpec("tumor", split="train", offset="200,200"), progress=False)
  with pytest.raises(scenarios.ScenarioError, match=r"no tumour mask fits .*offset \(200, 200\)"
                     r".*phantom_\d+/\d+"):
    next(far.jobs(1))


class _NoLesion:
  """A split's records with the lesion relabelled as host organ (a split without tumours)."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    rec = dict(self.source[i])
    rec[records.LABELS] = np.where(rec[records.LABELS] == LESION, 1, rec[records.LABELS])
    return rec


def test_tumor_donors_come_from_any_split(data):
  """Hosts from --split, donor tumour masks from every split (or --donor_split)."""
  config = make_config(data["tfds"])
  meta = sources.metadata(config)
  splits = {s: source_records(config, s) for s in ("train", "validation", "test")}
  cases = {s: {src[i][records.CASE_ID].decode() for i in range(len(src))}
           for s, src in splits.items()}
  test = _NoLesion(splits["test"])  # hosts without any tumour, as in a healthy test split
  open_split = lambda s: test if s == "test" else splits[s]

  def planner(open_split=open_split, **kw):
    spec = scenarios.ScenarioSpec("tumor", seed=1, **kw)
    return scenarios.Planner(test, meta, config.data, spec, split="test", progress=False,
                             open_split=open_split)

  jobs = list(planner().jobs(12))
  donor_splits = {j.info["donor_split"] for j in jobs}
  assert donor_splits <= {"train", "validation"} and len(donor_splits) == 2, donor_splits
  for j in jobs:
    assert j.info["donor_case"] in cases[j.info["donor_split"]]
    assert j.case_id in cases["test"] and np.any(j.labels == LESION)
  jobs = list(planner(donor_split="train").jobs(6))
  assert {j.info["donor_case"] for j in jobs} <= cases["train"]
  assert {j.info["donor_split"] for j in jobs} == {"train"}
  # Only the tumour-free split as donors (or no way to open the others): a clear error.
  for kw in ({"donor_split": "test"}, {"open_split": None}):
    with pytest.raises(scenarios.ScenarioError, match=r"nothing to take a tumour mask from"
                       r".*--donor_split"):
      planner(**kw)
  with pytest.raises(scenarios.ScenarioError, match=r"'nope' is not a split"):
    planner(donor_split="nope")
  with pytest.raises(scenarios.ScenarioError, match="only used by --scenario=tumor"):
    scenarios.ScenarioSpec("organ", donor_split="train")
  # Through the runner, the donors of a test-split run come from every split by default.
  run_planner, _, _ = runner.make_planner(config, runner.GenerateSpec("tumor", split="test"),
                                          progress=False)
  assert {d.split for d in run_planner.scenario.donors} == {None, "train", "validation"}


def test_tumor_host_labels_drop_the_configs_lesion_id(data):
  """Lesion training may list the lesion in config.data.mask_labels; the host never has it."""
  config = make_config(data["tfds"])
  config.data.mask_labels = (1, LESION)
  planner, _, _ = runner.make_planner(config, runner.GenerateSpec("tumor", split="train"),
                                      progress=False)
  assert planner.label_ids == (1,)
  with pytest.raises(scenarios.ScenarioError, match="must not include the lesion"):
    runner.make_planner(config, runner.GenerateSpec("tumor", split="train", labels=(1, LESION)),
                        progress=False)


# ---------------------------------------------------------------------------- mask files


def test_context_mask_file(tmp_path, data, inpainter):
  config = make_config(data["tfds"])
  user = np.zeros((SIZE, SIZE), bool)
  user[10:20, 5:12] = True
  path = tmp_path / "mask.npy"
  np.save(path, user.astype(np.uint8))
  samples = runner.generate_samples(
      config, inpainter, runner.GenerateSpec("context", num_samples=3, mask_file=str(path)),
      progress=False)
  for j in range(3):
    np.testing.assert_array_equal(samples.mask[j, ..., 0], user)
    np.testing.assert_array_equal(samples.generated_hu[j][~user], samples.image_hu[j][~user])
  # The same mask as PNG and as an exported (RAS) NIfTI reads back identically.
  Image.fromarray(user.astype(np.uint8) * 255).save(tmp_path / "mask.png")
  export.save_nifti(str(tmp_path / "mask.nii.gz"), user[None].astype(np.uint8),
                    (SPACING, SPACING, 5.0), 0, np.uint8)
  for name in ("mask.png", "mask.nii.gz"):
    np.testing.assert_array_equal(scenarios.load_mask_file(str(tmp_path / name),
                                                           (SIZE, SIZE)), user)


# ---------------------------------------------------------------------------- bad input


def test_bad_inputs_give_clear_errors(tmp_path, data, workdir):
  config = make_config(data["tfds"])
  out = str(tmp_path / "out")

  def gen(checkpoint, scenario="organ", run_config=config, **kw):
    spec = runner.GenerateSpec(scenario, num_samples=1, **kw)
    return runner.generate(run_config, checkpoint, spec, out, progress=False)

  with pytest.raises(runner.CheckpointError, match=r"checkpoint .*nowhere.*does not exist"):
    gen(str(tmp_path / "nowhere"))
  (tmp_path / "empty_workdir").mkdir()
  with pytest.raises(runner.CheckpointError, match="empty_workdir"):
    gen(str(tmp_path / "empty_workdir"))
  with pytest.raises(scenarios.ScenarioError, match=r"needs a dataset with a lesion.*kidneys"):
    gen(str(workdir), "tumor", run_config=make_config(data["tfds"], kidneys))
  np.save(tmp_path / "empty.npy", np.zeros((SIZE, SIZE), np.uint8))
  with pytest.raises(scenarios.ScenarioError, match=r"empty\.npy is empty"):
    gen(str(workdir), "context", mask_file=str(tmp_path / "empty.npy"))
  np.save(tmp_path / "small.npy", np.ones((8, 8), np.uint8))
  with pytest.raises(scenarios.ScenarioError, match=r"small\.npy has shape \(8, 8\)"):
    gen(str(workdir), "context", mask_file=str(tmp_path / "small.npy"))
  with pytest.raises(scenarios.ScenarioError, match="only used by --scenario=context"):
    gen(str(workdir), "organ", mask_file=str(tmp_path / "small.npy"))
  with pytest.raises(scenarios.ScenarioError, match=r"label ids \[7\] are not organs"):
    gen(str(workdir), "organ", labels=[7])
  with pytest.raises(scenarios.ScenarioError, match="unknown scenario"):
    gen(str(workdir), "lungs")
  assert not os.path.exists(os.path.join(out, "manifest.csv"))


def test_planner_skips_slices_with_an_empty_mask(data):
  """A host-organ subset absent from every slice: nothing usable -> a clear error."""
  config = make_config(data["tfds"])
  planner, _, _ = runner.make_planner(config, runner.GenerateSpec("organ", labels=[LESION]),
                                      progress=False)
  # Test-split slices without tumour are skipped and counted.
  assert planner.skipped and all("empty mask" in v for v in planner.skipped.values())
  assert len(planner.usable) + len(planner.skipped) == len(planner.source)
  source = planner.source
  src = pipeline.ListSource([{**source[i], records.LABELS: np.zeros((SIZE, SIZE, 1), np.uint8)}
                             for i in range(3)])
  meta = naming.read_dataset_metadata(data["tfds"], "kidney_tumor_32px_12mm")
  with pytest.raises(scenarios.ScenarioError, match="no usable slice.*all 3 slices"):
    scenarios.Planner(src, meta, config.data, scenarios.ScenarioSpec("organ"), progress=False)


# ---------------------------------------------------------------------------- CLI


def _cli(args, timeout=300) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  return subprocess.run([sys.executable, "-m", "ctdiff_jax.generate", *args], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_tumor_run_and_missing_checkpoint(tmp_path, data, workdir):
  common = ["--config=configs/kidney_tumor.py:smoke", f"--config.data_dir={data['tfds']}",
            f"--config.image_size={SIZE}", f"--config.spacing_mm={SPACING}"]
  out = tmp_path / "cli"
  proc = _cli(common + [f"--workdir={workdir}", "--scenario=tumor", "--split=test",
                        "--donor_split=train", "--num_samples=3", "--steps=2", "--sampler=ddim",
                        f"--output_dir={out}", "--formats=png"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "generated 3 slices (tumor)" in proc.stdout and "figure4.png" in proc.stdout
  with open(out / "manifest.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 3 and all(r["png_file"] and not r["ct_file"] for r in rows)
  # Hosts from the test split, donor tumours from --donor_split=train.
  train = source_records(make_config(data["tfds"]), "train")
  train_cases = {train[i][records.CASE_ID].decode() for i in range(len(train))}
  assert all(r["donor_case"] in train_cases and r["source_case"] not in train_cases
             for r in rows)
  bad = _cli(common + [f"--workdir={tmp_path / 'missing'}", f"--output_dir={tmp_path / 'x'}"])
  assert bad.returncode == 1
  assert "error" in bad.stderr and "missing" in bad.stderr and "Traceback" not in bad.stderr


def read_manifest(out) -> list[dict[str, str]]:
  with open(out / "manifest.csv", newline="") as f:
    return list(csv.DictReader(f))


def test_cli_reproducible_across_processes_checkpoint_step_and_overwrite(tmp_path, data,
                                                                         two_step_workdir):
  args = ["--config=configs/kidney_tumor.py:smoke", f"--config.data_dir={data['tfds']}",
          f"--config.image_size={SIZE}", f"--config.spacing_mm={SPACING}",
          "--config.sampling.num_steps=3", f"--workdir={two_step_workdir}", "--scenario=context",
          "--num_samples=3", "--seed=4", "--formats=nifti"]
  first, second = tmp_path / "first", tmp_path / "second"
  for out in (first, second):  # Two processes, each restoring and compiling on its own.
    proc = _cli(args + ["--checkpoint_step=0", f"--output_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with checkpoint step 0 " in proc.stdout
  rows = read_manifest(first)
  assert len(rows) == 3 and {r["checkpoint_step"] for r in rows} == {"0"}
  step0 = {}
  for r, r2 in zip(rows, read_manifest(second)):
    for key in ("ct_file", "seg_file", "mask_file"):
      a, b = nib.load(str(first / r[key])), nib.load(str(second / r2[key]))
      assert a.get_data_dtype() == b.get_data_dtype()
      np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
      step0[r[key]] = np.asarray(a.dataobj)
  # An export is never overwritten by accident: refused before the model loads.
  manifest = (first / "manifest.csv").read_bytes()
  proc = _cli(args + [f"--output_dir={first}"])
  assert proc.returncode == 1 and "already holds an export" in proc.stderr
  assert "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
  config = make_config(data["tfds"])
  spec = runner.GenerateSpec("context", num_samples=3, seed=4, formats=("nifti",))
  with pytest.raises(FileExistsError, match="already holds an export"):
    runner.generate(config, str(two_step_workdir), spec, str(first), progress=False)
  assert (first / "manifest.csv").read_bytes() == manifest
  # --overwrite with the latest checkpoint (step 7): recorded, and other slices inside the mask.
  spec = dataclasses.replace(spec, overwrite=True)
  summary = runner.generate(config, str(two_step_workdir), spec, str(first), progress=False)
  assert summary["checkpoint_step"] == 7
  rows7 = read_manifest(first)
  assert [r["ct_file"] for r in rows7] == [r["ct_file"] for r in rows]
  assert {r["checkpoint_step"] for r in rows7} == {"7"}
  for r in rows7:
    ct7 = np.asarray(nib.load(str(first / r["ct_file"])).dataobj)
    m = step0[r["mask_file"]] > 0
    np.testing.assert_array_equal(ct7[~m], step0[r["ct_file"]][~m])
    assert np.any(ct7[m] != step0[r["ct_file"]][m]), r["ct_file"]
