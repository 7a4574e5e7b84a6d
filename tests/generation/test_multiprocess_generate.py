"""generate over several processes (export/parts.py, generation/hosts.py) equals one process.

Two `python -m ctdiff_jax.generate --distributed` processes on localhost (jax.distributed,
coordinator on 127.0.0.1, 2 CPU devices each, like the pytest process) write the same export
as one process: manifest.csv byte for byte, every per-slice NIfTI, the TFDS records and the
volumes bit for bit. A part cut short like a kill would leave it (last record chunk and files
gone, manifest truncated mid-row, run.json incomplete) resumes, generating only what is missing,
and the merge gives again exactly the one-process export.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from ctdiff_jax import phantom
from ctdiff_jax.generation import export
from ctdiff_jax.generation import runner
from ctdiff_jax.ingest import build as ingest_build
from test_generate import SIZE, SPACING, make_config, write_random_checkpoints

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 600  # a guard against a hung worker (a busy 2-core machine needs minutes)
NUM_SAMPLES = 11  # parts of 5 and 6 slices; 2 chunks each with CHUNK_BATCHES = 1 (resume test)
SPEC = runner.GenerateSpec("organ", num_samples=NUM_SAMPLES, seed=3, formats=("nifti",),
                           tfds=True, volumes=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, pathlib.Path]:
  root = tmp_path_factory.mktemp("multiprocess_generate")
  phantom.write_cohort(root / "raw", 4, seed=0, lesions=True, progress=False)
  ingest_build.build("kidney_tumor", root / "raw", root / "tfds", image_size=SIZE,
                     spacing_mm=SPACING)
  config = make_config(root / "tfds")
  config.sampling.batch_size = 2  # per device: chunks of 2 x 2 devices x CHUNK_BATCHES
  workdir = write_random_checkpoints(root / "workdir", config, {0: 0})
  return {"root": root, "config": config, "workdir": workdir}


@pytest.fixture(scope="module")
def reference(data) -> pathlib.Path:
  """The one-process export (in this process: 2 devices, like each worker)."""
  out = data["root"] / "one_process"
  runner.generate(data["config"], str(data["workdir"]), SPEC, str(out), progress=False)
  return out


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def cli_args(data, out) -> list[str]:
  return [sys.executable, "-m", "ctdiff_jax.generate",
          "--config=configs/kidney_tumor.py:smoke", f"--config.data_dir={data['root'] / 'tfds'}",
          f"--config.image_size={SIZE}", f"--config.spacing_mm={SPACING}",
          "--config.sampling.num_steps=3", "--config.sampling.batch_size=2",
          f"--workdir={data['workdir']}", "--scenario=organ", f"--num_samples={NUM_SAMPLES}",
          "--seed=3", "--formats=nifti", "--tfds", "--volumes", f"--output_dir={out}"]


def cli_env() -> dict[str, str]:
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  cache = jax.config.jax_compilation_cache_dir  # the suite's cache (conftest.py), if any
  if cache:  # the workers compile what the reference compiled
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def run_two_processes(data, out) -> list[subprocess.CompletedProcess]:
  port = free_port()
  procs = [subprocess.Popen(
      cli_args(data, out) + ["--distributed", f"--coordinator_address=127.0.0.1:{port}",
                             "--num_processes=2", f"--process_id={p}"],
      cwd=REPO_ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for p in range(2)]
  results = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=TIMEOUT_S)
      results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return results


def nifti_arrays(out: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
  return {f.name: (np.asarray(nib.load(str(f)).dataobj), nib.load(str(f)).affine,
                   str(nib.load(str(f)).get_data_dtype()))
          for f in sorted(out.rglob("*.nii.gz"))}


def tfds_records(out: pathlib.Path) -> list[dict[str, np.ndarray]]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  (version_dir,) = (out / "tfds" / "ct_slices").glob("*/1.0.0")
  builder = tfds.builder_from_directory(str(version_dir))
  split = json.loads((out / "run.json").read_text())["provenance"]["source_split"]
  source = builder.as_data_source(split=split)
  return [source[i] for i in range(len(source))]


def assert_same_export(out: pathlib.Path, ref: pathlib.Path) -> None:
  assert (out / "manifest.csv").read_bytes() == (ref / "manifest.csv").read_bytes()
  got, want = nifti_arrays(out), nifti_arrays(ref)
  assert sorted(got) == sorted(want) and len(want) == 3 * NUM_SAMPLES + 3 * len(
      list((ref / "volumes").glob("*_ct.nii.gz")))
  for name, (arr, affine, dtype) in want.items():
    np.testing.assert_array_equal(got[name][0], arr, err_msg=name)
    np.testing.assert_array_equal(got[name][1], affine, err_msg=name)
    assert got[name][2] == dtype, name
  records, ref_records = tfds_records(out), tfds_records(ref)
  assert len(records) == len(ref_records) == NUM_SAMPLES
  for i, (a, b) in enumerate(zip(records, ref_records)):
    assert sorted(a) == sorted(b)
    for key in b:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"record {i} {key}")
  np.testing.assert_array_equal(np.asarray(Image.open(out / "figure4.png")),
                                np.asarray(Image.open(ref / "figure4.png")))
  run, ref_run = (json.loads((d / "run.json").read_text()) for d in (out, ref))
  assert run["complete"] and run["merged_parts"] == 2
  assert (run["request"], run["provenance"]) == (ref_run["request"], ref_run["provenance"])
  assert not (out / "parts").exists() and not (out / ".spool").exists()


def test_two_processes_write_what_one_process_writes(data, reference):
  out = data["root"] / "two_processes"
  results = run_two_processes(data, out)
  for p, r in enumerate(results):
    assert r.returncode == 0, f"process {p}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
  assert "merged 2 parts: 11 slices" in results[0].stdout, results[0].stdout
  assert "generated 6 slices" in results[1].stdout and "merged" not in results[1].stdout
  assert_same_export(out, reference)
  # The same run again: refused, the merged export is complete.
  with pytest.raises(FileExistsError, match="already holds an export .the same run, complete"):
    runner.generate(data["config"], str(data["workdir"]), SPEC, str(out), progress=False,
                    shard=export.Shard(1, 2))


def cut_short(part: pathlib.Path) -> np.ndarray:
  """Leaves `part` as a kill in its last chunk would; returns that chunk's sample indices.

  The chunk's record file not renamed yet, its first slice's files written and its manifest
  row cut mid-line, the other slices' files not written; run.json incomplete.
  """
  chunks = sorted((part / "records").glob("*.npz"))
  last = np.load(chunks[-1])["index"]
  chunks[-1].rename(chunks[-1].with_suffix(".npz.tmp"))
  lines = (part / "manifest.csv").read_text().splitlines(keepends=True)
  kept = [ln for ln in lines[1:] if int(ln.split(",")[0]) not in set(last)]
  cut = [ln for ln in lines[1:] if int(ln.split(",")[0]) == last[0]][0][:20]
  (part / "manifest.csv").write_text(lines[0] + "".join(kept) + cut)
  for i in last[1:]:
    for f in part.glob(f"{int(i):06d}_*"):
      f.unlink()
  run = json.loads((part / "run.json").read_text())
  (part / "run.json").write_text(json.dumps({**run, "complete": False}))
  return last


def test_interrupted_part_resumes_without_duplicates(data, reference, monkeypatch):
  monkeypatch.setattr(runner, "CHUNK_BATCHES", 1)  # several chunks per part
  inpainter = runner.load_inpainter(data["config"], str(data["workdir"]))
  out = data["root"] / "independent_jobs"
  shards = [export.Shard(p, 2) for p in range(2)]
  for shard in shards:  # independent jobs: no barrier, nothing merged
    summary = runner.generate(data["config"], inpainter, SPEC, str(out), progress=False,
                              shard=shard)
    assert summary["num_samples"] == shard.range(NUM_SAMPLES)[1] - shard.range(NUM_SAMPLES)[0]
  assert not (out / "manifest.csv").exists()
  part = pathlib.Path(shards[1].part_dir(str(out)))
  lost = cut_short(part)
  assert 0 < len(lost) < 6
  with pytest.raises(export.MergeError, match="part-00001-of-00002 is not a complete part"):
    export.merge(str(out))
  generated = []
  summary = runner.generate(data["config"], inpainter, SPEC, str(out), progress=False,
                            shard=shards[1], on_part=lambda s: generated.extend(s.index))
  # Only the lost chunk is generated again; the complete one is kept.
  assert summary["resumed_slices"] == 6 - len(lost)
  assert generated == list(lost)
  assert len(list((part / "records").glob("*.npz"))) == 2
  assert not list(part.rglob("*.tmp"))
  # A merge killed midway (run.json not complete, a file moved up, the manifest begun) is
  # taken up again by the same run; a complete part is not generated again.
  export.resume.write_run(str(out), {"request": export.request_of(SPEC, data["config"]),
                                     "complete": False})
  (ct_file,) = pathlib.Path(shards[0].part_dir(str(out))).glob("000000_*_ct.nii.gz")
  ct_file.rename(out / ct_file.name)
  (out / "manifest.csv").write_text((part / "manifest.csv").read_text().splitlines()[0] + "\n")
  summary = runner.generate(data["config"], inpainter, SPEC, str(out), progress=False,
                            shard=shards[0])
  assert "scenario" not in summary and "was complete already" in runner.format_summary(summary)
  merge = subprocess.run([sys.executable, "-m", "ctdiff_jax.generate", "--merge",
                          f"--output_dir={out}"], cwd=REPO_ROOT, env=cli_env(),
                         capture_output=True, text=True, timeout=TIMEOUT_S)
  assert merge.returncode == 0, merge.stderr[-3000:]
  assert "merged 2 parts: 11 slices" in merge.stdout
  assert_same_export(out, reference)
  with pytest.raises(export.MergeError, match="no parts/part-. folders to merge .its export is"):
    export.merge(str(out))
