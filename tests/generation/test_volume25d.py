"""2.5D volume generation (generation/volume25d.py) and its metrics (evaluation/volume_metrics.py).

A 3-case phantom cohort with tumours is built as kidney_tumor at 32 px x 12 mm; the model is
a random-weight neighbour-conditioned smoke model (as in test_generate.py: the tests check the
mechanics — 3D masks, order, paste-back, geometry, determinism — not image quality).
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
import shutil

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from configs import kidney_tumor
from ctdiff_jax import phantom
from ctdiff_jax.data import sources
from ctdiff_jax.data import transforms
from ctdiff_jax.evaluation import volume_metrics
from ctdiff_jax.generation import runner
from ctdiff_jax.generation import volume25d
from ctdiff_jax.ingest import build as ingest_build
from ctdiff_jax.ingest import layouts
from ctdiff_jax.ingest import volumes
from test_generate import write_random_checkpoints

SIZE, SPACING = 32, 12.0
ORGANS = ("kidney", "kidney_tumor")


def make_config(data_dir):
  config = kidney_tumor.get_config("smoke")
  config.data_dir = str(data_dir)
  config.image_size = SIZE
  config.spacing_mm = SPACING
  config.sampling.num_steps = 2
  config.data.neighbours = True
  config.data.neighbour_hide_prob = 0.5
  return config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("volume25d")
  phantom.write_cohort(root / "raw", 3, seed=0, lesions=True, progress=False)
  ingest_build.build("kidney_tumor", root / "raw", root / "tfds", image_size=SIZE,
                     spacing_mm=SPACING)
  config = make_config(root / "tfds")
  workdir = write_random_checkpoints(root / "workdir", config, {0: 0})
  return {"root": root, "raw": root / "raw", "config": config,
          "inpainter": runner.load_inpainter(config, str(workdir))}


def run(data, out, scenario="tumor", seed=0, split="train", num=1, manual_dir=None,
        lesions="donor", **kw):
  spec = runner.GenerateSpec(scenario, num_samples=num, seed=seed, split=split, **kw)
  summary = volume25d.generate(data["config"], data["inpainter"], spec, str(out),
                               manual_dir=manual_dir, lesions=lesions, progress=False)
  with open(pathlib.Path(out) / "manifest.csv", newline="") as f:
    return summary, list(csv.DictReader(f))


def case_of(raw, case_id):
  return {c.case_id: c for c in layouts.read_layout(raw).cases}[case_id]


def first_plan(data, scenario):
  """(VolumePlan 0 of `scenario` on the train split, the model's ExampleConfig)."""
  config = data["config"]
  meta = sources.metadata(config)
  cases, hosts, donors = volume25d.open_cases(meta, "train", None, None)
  spec = runner.GenerateSpec(scenario, seed=0)
  planner = volume25d.VolumePlanner(meta, config.data, spec, cases, hosts, donors, SIZE,
                                    SPACING)
  return next(planner.plans(1, 0)), transforms.ExampleConfig.from_data_config(config.data)


def test_tumour_spans_the_donor_slices_inside_the_host_organ(data, tmp_path):
  summary, rows = run(data, tmp_path / "tumor", num=3)
  assert len(rows) == 3 and len(summary["previews"]) == 3
  spans = []
  for row in rows:
    seg = np.asarray(nib.load(tmp_path / "tumor" / row["seg_file"]).dataobj)
    source = volumes.load_case(case_of(data["raw"], row["source_case"]), ORGANS).organ_map
    assert seg.shape == source.shape
    new = (seg == 2) & (source != 2)
    zs = np.flatnonzero(new.any(axis=(0, 1)))
    assert len(zs) and np.array_equal(zs, np.arange(zs[0], zs[-1] + 1))  # one z run
    spans.append(len(zs))
    # Every placed voxel lies in the host kidney, on every slice.
    assert np.all(source[new] == 1)
    # Its slice count is one of the donor's own 3D tumours (same 5 mm slices in the cohort).
    donor = volume25d.load_volume(case_of(data["raw"], row["donor_case"]), ORGANS, SIZE,
                                  SPACING)
    comps, k = ndimage.label(donor.grid_labels == 2, np.ones((3, 3, 3), bool))
    extents = {int(np.ptp(np.flatnonzero((comps == c).any(axis=(1, 2))))) + 1
               for c in range(1, k + 1)}
    assert len(zs) == int(row["donor_slices"]) and len(zs) in extents
    assert row["donor_case"] != row["source_case"]
  assert max(spans) > 1  # 3D tumours, not one-slice stamps


def lps_copy(raw, dest, case_id):
  """The cohort with `case_id` stored LPS (x and y flipped, same world geometry)."""
  shutil.copytree(raw, dest)
  for kind in ("ct", "seg"):
    path = dest / f"{case_id}_{kind}.nii.gz"
    img = nib.load(path)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [img.shape[0] - 1, img.shape[1] - 1]
    arr = np.ascontiguousarray(np.asarray(img.dataobj)[::-1, ::-1])
    out = nib.Nifti1Image(arr, img.affine @ flip)
    out.set_data_dtype(img.get_data_dtype())
    nib.save(out, path)
  return dest


def test_lps_source_round_trip_and_outside_mask_equality(data, tmp_path):
  _, hosts, _ = volume25d.open_cases(sources.metadata(data["config"]), "train", None, None)
  case_id = hosts[0]
  raw = lps_copy(data["raw"], tmp_path / "raw_lps", case_id)
  _, rows = run(data, tmp_path / "ctx", scenario="context", manual_dir=str(raw))
  row = next(r for r in rows if r["source_case"] == case_id)
  src = nib.load(raw / f"{case_id}_ct.nii.gz")
  assert nib.aff2axcodes(src.affine) == ("L", "P", "S")
  for kind in ("ct", "seg", "mask"):
    out = nib.load(tmp_path / "ctx" / row[f"{kind}_file"])
    assert out.shape == src.shape and np.allclose(out.affine, src.affine, atol=1e-5)
    assert nib.aff2axcodes(out.affine) == ("L", "P", "S")
  ct = np.asanyarray(nib.load(tmp_path / "ctx" / row["ct_file"]).dataobj)
  mask = np.asanyarray(nib.load(tmp_path / "ctx" / row["mask_file"]).dataobj) > 0
  source = np.asanyarray(src.dataobj)
  assert ct.dtype == source.dtype and mask.sum() == int(row["mask_voxels"]) > 0
  assert np.array_equal(ct[~mask], source[~mask])  # bit for bit outside the 3D mask
  assert np.any(ct[mask] != source[mask])
  # The LPS copy gives the same volume as the RAS original, flipped back.
  _, rows_ras = run(data, tmp_path / "ctx_ras", scenario="context")
  row_ras = next(r for r in rows_ras if r["source_case"] == case_id)
  ras = np.asanyarray(nib.load(tmp_path / "ctx_ras" / row_ras["ct_file"]).dataobj)
  assert np.array_equal(ras[::-1, ::-1], ct)


def test_same_seed_same_volume_other_seed_differs(data, tmp_path):
  arrays = {}
  for name, seed in (("a", 3), ("b", 3), ("c", 4)):
    _, rows = run(data, tmp_path / name, scenario="organ", seed=seed)
    arrays[name] = np.asanyarray(nib.load(tmp_path / name / rows[0]["ct_file"]).dataobj)
  assert np.array_equal(arrays["a"], arrays["b"])
  assert not np.array_equal(arrays["a"], arrays["c"])


def test_2p5d_conditions_on_generated_neighbours(data):
  """First step (no generated neighbour): same inputs and noise in both arms; every later
  slice differs in 2.5D. Checked for the default order (inward) and outward."""
  plan, ecfg = first_plan(data, "organ")
  both = [volume25d.generate_grids(data["inpainter"], ecfg, [plan], 0, independent=i,
                                   progress=False)[0] for i in (True, False)]
  outward = volume25d.generate_grids(data["inpainter"], ecfg, [plan], 0, order="outward",
                                     progress=False)[0]
  outside = ~plan.mask
  for kind, grid in ((volume25d.DEFAULT_ORDER, both[1]), ("outward", outward)):
    steps = plan.order(kind)
    first, rest = steps[0], [z for s in steps[1:] for z in s]
    assert len(rest) >= 2 and sorted(rest + first) == list(
        np.flatnonzero(plan.mask.any(axis=(1, 2))))
    assert all(np.array_equal(both[0][z], grid[z]) for z in first), kind
    assert all(not np.array_equal(both[0][z], grid[z]) for z in rest), kind
    assert np.array_equal(grid[outside], plan.host.grid_hu[outside])
  # Interleaved: every other slice sees hidden neighbours (= independent), the rest generated.
  inter = volume25d.generate_grids(data["inpainter"], ecfg, [plan], 0, order="interleaved",
                                   progress=False)[0]
  first, second = plan.order("interleaved")
  assert all(np.array_equal(inter[z], both[0][z]) for z in first)
  assert all(not np.array_equal(inter[z], both[0][z]) for z in second)
  # A second pass regenerates every mask slice (new noise, generated neighbours on both sides).
  two = volume25d.generate_grids(data["inpainter"], ecfg, [plan], 0, passes=2,
                                 progress=False)[0]
  assert all(not np.array_equal(two[z], both[1][z])
             for z in np.flatnonzero(plan.mask.any(axis=(1, 2))))
  assert np.array_equal(two[outside], plan.host.grid_hu[outside])


class Recording:
  """An inpainter that records the `cond` and noise index of every slice it is asked for."""

  def __init__(self, inner):
    self.inner, self.calls = inner, []

  def inpaint(self, batch, seed, *, indices, progress=False):
    self.calls.append((np.array(batch["cond"]), list(indices)))
    return self.inner.inpaint(batch, seed, indices=indices, progress=progress)


@pytest.mark.parametrize("independent", [True, False])
def test_no_real_content_inside_the_3d_mask_reaches_the_model(data, independent):
  """A neighbour not generated yet is hidden inside its own slice of the 3D mask (its real
  content there is what the volume replaces); a generated one is known everywhere."""
  plan, ecfg = first_plan(data, "context")
  rec = Recording(data["inpainter"])
  out = volume25d.generate_grids(rec, ecfg, [plan], 0, independent=independent,
                                 progress=False)[0]
  real, mask, nz = plan.host.grid_hu, plan.mask, len(plan.mask)
  steps = [[] for _ in rec.calls]
  for k, (cond, indices) in enumerate(rec.calls):
    steps[k] = [i % volume25d.Z_STRIDE for i in indices]
  done_before = {}
  for k, zs in enumerate(steps):
    for z in zs:
      done_before[z] = {w for s in steps[:k] for w in s}
  assert sorted(done_before) == list(np.flatnonzero(mask.any(axis=(1, 2))))
  if independent:
    assert len(steps) == 1
  else:
    assert steps == plan.order() and len(steps) > 2
  hidden_seen = generated_seen = 0
  for (cond, _), zs in zip(rec.calls, steps):
    for c, z in zip(cond, zs):
      for ch, zn in ((2, z - 1), (3, z + 1)):
        known = c[..., ch + 2] > 0
        if not 0 <= zn < nz:  # past the volume end: missing
          assert not known.any()
        elif zn in done_before[z]:  # generated: known everywhere, the generated slice
          generated_seen += 1
          assert known.all()
          np.testing.assert_allclose(
              c[..., ch], transforms.hu_to_unit(out[zn], ecfg.intensity), atol=1e-6)
        else:  # real: hidden inside its mask, the source outside it
          hidden_seen += mask[zn].any()
          np.testing.assert_array_equal(known, ~mask[zn])
          np.testing.assert_array_equal(c[..., ch][mask[zn]], 0.0)
          np.testing.assert_allclose(c[..., ch][~mask[zn]], transforms.hu_to_unit(
              real[zn], ecfg.intensity)[~mask[zn]], atol=1e-6)
  assert hidden_seen > 0
  assert (generated_seen > 0) != independent


def test_volume_mode_refuses_models_without_neighbours_and_2d_options(data, tmp_path):
  config = make_config(data["config"].data_dir)
  config.data.neighbours = False
  spec = runner.GenerateSpec("tumor", num_samples=1)
  with pytest.raises(volume25d.VolumeModeError, match="neighbours"):
    volume25d.generate(config, data["inpainter"], spec, str(tmp_path / "x"))
  config = make_config(data["config"].data_dir)
  config.data.neighbour_hide_prob = 0.0  # neighbours, but never hidden in training
  with pytest.raises(volume25d.VolumeModeError, match="neighbour_hide_prob=0"):
    volume25d.generate(config, data["inpainter"], spec, str(tmp_path / "h"))
  assert not (tmp_path / "h").exists()
  spec = dataclasses.replace(spec, offset="1,2")
  with pytest.raises(volume25d.VolumeModeError, match="offset"):
    volume25d.generate(data["config"], data["inpainter"], spec, str(tmp_path / "y"))


def test_interslice_difference_and_plane_images():
  vol = np.zeros((4, 6, 5))
  vol[2] = 10.0  # one bright slice: |diff| 10 across z=1|2 and z=2|3
  mask = np.zeros(vol.shape, bool)
  mask[1:3, 2:4, 1:3] = True  # 4 pixels per slice on z = 1, 2
  total, n = volume_metrics.interslice_difference(vol, mask)
  assert n == 3 * 4 and total == 2 * 4 * 10.0
  box = volume_metrics.bounding_box(mask, margin=(1, 1, 0))
  planes = volume_metrics.plane_images(vol, box)
  assert [len(planes[p]) for p in volume_metrics.PLANES] == [4, 4, 2]
  assert planes["coronal"][0].shape == (4, 2) and planes["sagittal"][0].shape == (4, 4)
  res = volume_metrics.compare([vol], {"flat": [np.zeros_like(vol)]}, [mask], (-10, 10),
                               fid=False)
  assert res["arms"]["real"]["interslice_hu"] == pytest.approx(80 / 12)
  assert res["arms"]["flat"]["interslice_hu"] == 0.0


def test_paired_comparison_of_two_arms():
  """delta > 0 when the arm is closer to real than the base; identical arms differ by exactly
  0 in every resample (one index for real, base and arm); swapping them negates the delta."""
  rng = np.random.default_rng(0)
  real = [rng.normal(0, 10, (8, 12, 12)) for _ in range(2)]
  masks = [np.zeros((8, 12, 12), bool) for _ in range(2)]
  for m in masks:
    m[2:6, 3:9, 3:9] = True
  noisy = [v + rng.normal(0, 40, v.shape) for v in real]
  close = [v + rng.normal(0, 2, v.shape) for v in real]
  # Features of a plane image: its 4 quadrant means (a stand-in for Inception: any fixed map).
  features = lambda x: x[:, :298, :298].reshape(len(x), 2, 149, 2, 149, 3).mean(
      axis=(2, 4, 5)).reshape(len(x), 4).astype(np.float64)
  res = volume_metrics.compare(real, {"independent": noisy, "2.5D": close}, masks,
                               (-60, 60), features=features)
  comp = res["comparisons"]["2.5D vs independent"]
  arms = res["arms"]
  assert comp["interslice_hu"]["delta"] == pytest.approx(
      abs(arms["independent"]["interslice_hu"] - arms["real"]["interslice_hu"]) -
      abs(arms["2.5D"]["interslice_hu"] - arms["real"]["interslice_hu"]))
  assert comp["interslice_hu"]["delta"] > 0 and comp["interslice_hu"]["closer_fraction"] == 1.0
  for p in volume_metrics.PLANES:
    c = comp[f"fid_{p}"]
    assert c["delta"] == pytest.approx(arms["independent"][f"fid_{p}"]["fid"] -
                                       arms["2.5D"][f"fid_{p}"]["fid"])
    assert c["ci95"][0] <= c["ci95"][1] and c["resamples"] == volume_metrics.DELTA_BOOTSTRAP
  same = volume_metrics.compare(real, {"a": noisy, "b": noisy}, masks, (-60, 60),
                                features=features)["comparisons"]["b vs a"]
  assert all(c["delta"] == 0.0 and c["std"] == 0.0 for c in same.values())
  swapped = volume_metrics.compare(real, {"2.5D": close, "independent": noisy}, masks,
                                   (-60, 60), features=features)["comparisons"]
  back = swapped["independent vs 2.5D"]
  for key, c in comp.items():
    assert back[key]["delta"] == pytest.approx(-c["delta"])
  assert "How much closer to real 2.5D is than independent" in volume_metrics.markdown(res)
  assert "real = the hosts." in volume_metrics.markdown({**res, "reference": "the hosts"})
  assert "real = " not in volume_metrics.markdown(res)


@pytest.mark.parametrize("zs", [[2, 3, 4, 5, 6], [1, 2, 3, 4], [5]])
def test_orders_cover_every_mask_slice_once(zs):
  mask = np.zeros((9, 4, 4), bool)
  for z in zs:
    mask[z, 1:3, 1:1 + (z % 3) + 1] = True
  plan = volume25d.VolumePlan(0, 0, None, mask, mask.astype(np.uint8), {})
  for kind in volume25d.ORDERS:
    steps = plan.order(kind)
    assert sorted(z for s in steps for z in s) == zs, kind
  inward = plan.order("inward")
  assert inward[0] == sorted({zs[0], zs[-1]})  # the ends first: they read the real slices
  depth = [[min(z - zs[0], zs[-1] - z) for z in s] for s in inward]
  assert all(d == [k] * len(d) for k, d in enumerate(depth))  # step k: k slices in from an end
  outward = plan.order("outward")
  assert len(outward[0]) == 1 and mask[outward[0][0]].sum() == mask.sum(axis=(1, 2)).max()


def test_volume_order_is_recorded_and_checked(data, tmp_path):
  spec = runner.GenerateSpec("context", num_samples=1, seed=0, split="train")
  summary = volume25d.generate(data["config"], data["inpainter"], spec, str(tmp_path / "in"),
                               order="inward", progress=False)
  row = summary["rows"][0]
  assert row["order"] == "inward"
  assert row["seed_slice"] == f"{row['z_first']} {row['z_last']}"
  with open(tmp_path / "in" / "manifest.csv", newline="") as f:
    assert next(csv.DictReader(f))["order"] == "inward"
  with pytest.raises(volume25d.VolumeModeError, match="unknown volume order 'sideways'"):
    volume25d.generate(data["config"], data["inpainter"], spec, str(tmp_path / "x"),
                       order="sideways", progress=False)


def test_own_lesion_is_regenerated_in_place_with_its_labels(data, tmp_path):
  """lesions=own: the mask covers one whole lesion of the host's own, within the host organ
  and that lesion; no label changes, so the real volume is a reference with a real lesion."""
  _, rows = run(data, tmp_path / "own", num=3, lesions="own")
  assert {r["lesions"] for r in rows} == {"own"}
  for row in rows:
    assert row["donor_case"] == row["source_case"]
    source = volumes.load_case(case_of(data["raw"], row["source_case"]), ORGANS)
    out = {k: np.asanyarray(nib.load(tmp_path / "own" / row[f"{k}_file"]).dataobj)
           for k in ("ct", "seg", "mask")}
    mask = out["mask"] > 0
    src_ct = np.asanyarray(nib.load(row["source_image"]).dataobj)
    assert mask.sum() == int(row["mask_voxels"]) > 0
    assert np.array_equal(out["ct"][~mask], src_ct[~mask])  # bit for bit outside
    assert np.array_equal(out["seg"], source.organ_map)  # not one label changed
    assert set(np.unique(source.organ_map[mask])) <= {1, 2}  # kidney and lesion only
    # One lesion, on every slice it spans (the z grid is the source's).
    comps, _ = ndimage.label(source.organ_map == 2, np.ones((3, 3, 3), bool))
    hit = set(np.unique(comps[mask])) - {0}
    assert len(hit) == 1
    lesion_zs = np.flatnonzero((comps == hit.pop()).any(axis=(0, 1)))
    assert np.array_equal(np.flatnonzero((mask & (source.organ_map == 2)).any(axis=(0, 1))),
                          lesion_zs) and int(row["tumour_slices"]) == len(lesion_zs)
  # On the model grid the regenerated lesion is whole (the source's edge voxels that fall
  # on grid pixels outside the organ keep their HU when pasted back).
  meta = sources.metadata(data["config"])
  cases, hosts, donors = volume25d.open_cases(meta, "train", None, None)
  planner = volume25d.VolumePlanner(meta, data["config"].data, runner.GenerateSpec("tumor"),
                                    cases, hosts, donors, SIZE, SPACING, lesions="own")
  for plan in planner.plans(3, 0):
    comps, _ = ndimage.label(plan.labels == 2, np.ones((3, 3, 3), bool))
    hit = set(np.unique(comps[plan.mask])) - {0}
    assert len(hit) == 1 and np.all(plan.mask[comps == hit.pop()])
    assert np.array_equal(plan.labels, plan.host.grid_labels)


def test_own_lesions_skip_hosts_without_one_and_other_scenarios_refuse(data, tmp_path):
  meta = sources.metadata(data["config"])
  cases, hosts, donors = volume25d.open_cases(meta, "train+validation+test", None, None)
  assert hosts == sorted(c for ids in meta["build"]["cases"].values() for c in ids)
  spec = runner.GenerateSpec("tumor", seed=0)
  # A host whose lesions were relabelled kidney has none of its own: a counted skip.
  planner = volume25d.VolumePlanner(meta, data["config"].data, spec, cases, hosts, donors,
                                    SIZE, SPACING, lesions="own")
  bare = planner.load(hosts[0])
  bare.grid_labels[bare.grid_labels == 2] = 1
  planner.load = lambda case_id: bare if case_id == hosts[0] else volume25d.load_volume(
      cases[case_id], ORGANS, SIZE, SPACING)
  plans = list(planner.plans(2, 0))
  assert hosts[0] in planner.skipped and "no lesion" in planner.skipped[hosts[0]]
  assert {p.host.case_id for p in plans} <= set(hosts[1:])
  with pytest.raises(volume25d.VolumeModeError, match="tumor-scenario option"):
    volume25d.VolumePlanner(meta, data["config"].data, runner.GenerateSpec("context"), cases,
                            hosts, donors, SIZE, SPACING, lesions="own")
  with pytest.raises(volume25d.VolumeModeError, match="split 'nope'"):
    volume25d.open_cases(meta, "train+nope", None, None)


def test_only_the_chosen_cases_are_hosts(data, tmp_path):
  meta = sources.metadata(data["config"])
  _, hosts, _ = volume25d.open_cases(meta, "train+validation+test", None, None)
  spec = runner.GenerateSpec("context", num_samples=2, seed=0, split="train+validation+test")
  summary = volume25d.generate(data["config"], data["inpainter"], spec, str(tmp_path / "one"),
                               only=[hosts[-1]], progress=False)
  assert [r["source_case"] for r in summary["rows"]] == [hosts[-1]] * 2
  with pytest.raises(volume25d.VolumeModeError, match=r"cases \['nope'\] are not in split"):
    volume25d.generate(data["config"], data["inpainter"], spec, str(tmp_path / "x"),
                       only=["nope"], progress=False)
