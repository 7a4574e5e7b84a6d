"""Our side of the benchmark items: the project's own code paths, timed in this process.

Each item is built by `setup()` (compiles and warms up; returns one-off numbers such as the
first step's time) and timed by `run()` (one repeat; returns throughputs). The driver
(`benchmarks.run`) alternates our `run()` with the peer's. What is timed is what the project
runs: `DiffusionTask.train_step` mapped like the trainer does (clip, Adam, EMA, finite check
included), `DiffusionTask.generate` (DDIM), `evaluation.fid.features`, the NIfTI -> record
functions of `ingest.volumes`, and the Grain loader of `data.pipeline` over a built dataset.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks import common


def _jax():
  from ctdiff_jax import xla_options  # pylint: disable=g-import-not-at-top
  xla_options.apply()  # the CLIs' compile options (before the first computation)
  import jax  # pylint: disable=g-import-not-at-top
  if not os.environ.get("BENCH_JAX_CACHE"):
    # Cold numbers: no persistent compilation cache unless asked (BENCH_JAX_CACHE=<dir>).
    jax.config.update("jax_enable_compilation_cache", False)
  else:
    jax.config.update("jax_compilation_cache_dir", os.environ["BENCH_JAX_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return jax


def info() -> dict[str, Any]:
  jax = _jax()
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  return {"side": "ctdiff-jax", "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "flax": flax.__version__, "platform": dev.platform,
          "device": f"{len(jax.devices())} x {dev.device_kind}"}


def _timed(fn, n: int) -> float:
  """Median seconds of `n` calls of `fn` (each call blocks until its result is ready)."""
  times = []
  for _ in range(max(1, n)):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def make_config(p: dict[str, Any]):
  """The `:reference` (or `:smoke`) kidneys config at the item's size, dtype and kernel."""
  from configs import kidneys  # pylint: disable=g-import-not-at-top
  cfg = kidneys.get_config(p.get("variant", "reference"))
  cfg.image_size = int(p["image_size"])
  cfg.per_device_batch_size = int(p["batch"])
  if "dtype" in p:
    cfg.model.dtype = p["dtype"]
  if "attention_impl" in p:
    cfg.model.attention_impl = p["attention_impl"]
  import jax  # pylint: disable=g-import-not-at-top
  if cfg.model.attention_impl == "cudnn" and jax.default_backend() != "gpu":
    cfg.model.attention_impl = None  # cuDNN attention needs a GPU (dry runs on CPU)
  for key, value in p.get("model", {}).items():  # dry runs shrink the network
    cfg.model[key] = tuple(value) if isinstance(value, list) else value
  if "ddim_steps" in p:
    cfg.sampling.num_steps = int(p["ddim_steps"])
  return cfg


def synthetic_batch(batch: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """[1, B, ...] image/mask/cond/index like the loader's (a centred box mask)."""
  rng = np.random.default_rng(seed)
  image = rng.uniform(-1, 1, (1, batch, size, size, 1)).astype(np.float32)
  mask = np.zeros_like(image)
  lo, hi = size // 4, 3 * size // 4
  mask[:, :, lo:hi, lo:hi] = 1.0
  cond = np.concatenate([image * (1 - mask), mask], axis=-1)
  index = np.arange(batch, dtype=np.int32)[None]
  return {"image": image, "mask": mask, "cond": cond, "index": index}


class _Step:
  """The trainer's mapped diffusion train step on one device, plus a jitted forward."""

  def __init__(self, p: dict[str, Any]):
    jax = _jax()
    from ctdiff_jax.training import parallel, tasks  # pylint: disable=g-import-not-at-top
    self.jax, self.p = jax, p
    self.cfg = make_config(p)
    self.task = tasks.get_task(self.cfg)
    self.par = parallel.create(self.cfg.parallel, jax.local_devices()[:1])
    key = jax.random.key(0)
    state = jax.jit(self.task.init_state)(key)
    self.params = state.nets["unet"].params
    self.state_r = self.par.replicate(jax.device_get(state))
    self.batch_np = synthetic_batch(int(p["batch"]), int(p["image_size"]))
    self.batch = self.par.shard({k: v for k, v in self.batch_np.items() if k != "index"})
    self.key_r = self.par.replicate(jax.random.key_data(key))
    self.lr_r = self.par.replicate(np.float32(1e-4))
    self.p_train = self.par.map(self.task.train_step, donate_argnums=(0,))

  def compile_train(self) -> float:
    """Seconds to trace, lower and compile the train step (cold in a fresh process)."""
    t0 = time.perf_counter()
    self.p_train = self.p_train.lower(self.state_r, self.batch, self.key_r, self.lr_r).compile()
    return time.perf_counter() - t0

  def train(self) -> None:
    self.state_r, metrics = self.p_train(self.state_r, self.batch, self.key_r, self.lr_r)
    self.jax.block_until_ready(metrics["loss"])

  def peak_bytes(self) -> int | None:
    stats = self.jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


class UNetItem:
  """(1) train step (fwd+bwd+clip+Adam+EMA) and forward of the UNet, images/s."""

  def __init__(self, p):
    self.p = p

  def setup(self):
    self.step = _Step(self.p)
    jax, task = self.step.jax, self.step.task
    b = self.step.batch_np
    x, cond = jax.numpy.asarray(b["image"][0]), jax.numpy.asarray(b["cond"][0])
    t = jax.numpy.full((x.shape[0],), 500, jax.numpy.int32)
    fwd = jax.jit(lambda params: task.model.apply({"params": params}, x, t, cond))
    self.fwd = lambda: jax.block_until_ready(fwd(self.step.params))
    t0 = time.perf_counter()
    self.step.train()
    first_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    self.fwd()
    first_fwd = time.perf_counter() - t0
    from ctdiff_jax.models import unet  # pylint: disable=g-import-not-at-top
    return {"params_M": round(unet.count_params(self.step.params) / 1e6, 2),
            "first_train_s": first_train, "first_fwd_s": first_fwd}

  def run(self):
    n, bsz = int(self.p["steps"]), int(self.p["batch"])
    out = {"train_img_s": bsz / _timed(self.step.train, n),
           "fwd_img_s": bsz / _timed(self.fwd, n)}
    peak = self.step.peak_bytes()
    if peak is not None:
      out["peak_GiB"] = peak / 2**30
    return out


class DDIMItem:
  """(2) DDIM generation (inpainting, `task.generate` as the generate CLI maps it), slices/s."""

  def __init__(self, p):
    self.p = p

  def setup(self):
    self.step = _Step(self.p)
    jax, task, par = self.step.jax, self.step.task, self.step.par
    gen = par.map(lambda s, b, k: task.generate(task.sampling_variables(s), b, k))
    batch = par.shard(self.step.batch_np)
    args = (self.step.state_r, batch, self.step.key_r)
    t0 = time.perf_counter()
    gen = gen.lower(*args).compile()  # compile only: a warm-up run would cost a whole sample
    self.gen = lambda: jax.block_until_ready(gen(*args))
    return {"steps": int(self.step.cfg.sampling.num_steps),
            "compile_s": time.perf_counter() - t0}

  def run(self):
    return {"slices_s": int(self.p["batch"]) / _timed(self.gen, 1)}


class FIDItem:
  """(3) FID Inception pool3 features of uint8 299 px images, images/s."""

  def __init__(self, p):
    self.p = p

  def setup(self):
    _jax()
    from ctdiff_jax.evaluation import fid  # pylint: disable=g-import-not-at-top
    n, bs = int(self.p["n"]), int(self.p["batch"])
    rng = np.random.default_rng(0)
    self.images = rng.integers(0, 256, (n, 299, 299, 3), dtype=np.uint8)
    self.features = lambda imgs: fid.features(imgs, batch_size=bs, progress=False)
    t0 = time.perf_counter()
    feats = self.features(self.images[:bs])
    return {"first_call_s": time.perf_counter() - t0, "feat_mean": float(feats.mean())}

  def run(self):
    t0 = time.perf_counter()
    self.features(self.images)
    return {"img_s": len(self.images) / (time.perf_counter() - t0)}


def _cases(p):
  from ctdiff_jax.ingest import layouts  # pylint: disable=g-import-not-at-top
  return layouts.read_layout(p["manual_dir"], "auto").cases


class RecordsItem:
  """(4) NIfTI -> slice records (load, RAS, checks, organ map, resample, crop/pad), per s."""

  def __init__(self, p):
    self.p = p

  def setup(self):
    from ctdiff_jax.ingest import organs, volumes  # pylint: disable=g-import-not-at-top
    self.volumes = volumes
    self.cases = _cases(self.p)
    self.organs = organs.DATASET_CONFIGS[self.p["dataset"]][0]
    counts = self._build()  # warms the page cache like the peer's setup
    return {"volumes": len(self.cases), "slices": sum(counts),
            "slices_per_case": counts}

  def _build(self) -> list[int]:
    size, mm = int(self.p["image_size"]), float(self.p["spacing_mm"])
    counts = []
    for case in self.cases:
      loaded = self.volumes.load_case(case, self.organs)
      kept, _ = self.volumes.select_slices(loaded.organ_map, 0, 0.0, case.case_id)
      counts.append(len(list(self.volumes.slice_records(loaded, kept, size, mm))))
    return counts

  def run(self):
    return common.records_rates(self._build, len(self.cases))


class LoaderItem:
  """(5) the Grain loader with masks over a built dataset vs the smoke train step, examples/s."""

  def __init__(self, p):
    self.p = p

  def setup(self):
    _jax()
    from ctdiff_jax.data import pipeline, sources  # pylint: disable=g-import-not-at-top
    from ctdiff_jax.ingest import build, naming  # pylint: disable=g-import-not-at-top
    size, mm, dataset = int(self.p["image_size"]), float(self.p["spacing_mm"]), self.p["dataset"]
    self.tmp = tempfile.TemporaryDirectory(prefix="bench_loader_")
    opts = {"image_size": size, "spacing_mm": mm, "split_ratios": (1.0, 0.0, 0.0)}
    build.build(dataset, self.p["manual_dir"], self.tmp.name, **opts)  # every case in train
    source = sources.load_source(self.tmp.name, naming.config_name(dataset, **opts), "train")
    cfg = make_config(dict(self.p, variant="smoke"))
    cfg.data.image_size = size
    batch = int(self.p["batch"])
    self.iters = {w: iter(pipeline.create_loader(source, cfg.data, batch_shape=(1, batch),
                                                 seed=0, worker_count=w))
                  for w in self.p["workers"]}
    for it in self.iters.values():
      next(it)  # start the workers outside the timed region
    self.step = _Step(dict(self.p, variant="smoke"))
    self.step.train()
    return {"records": len(source), "mask_mode": cfg.data.mask_mode}

  def run(self):
    n, bsz = int(self.p["batches"]), int(self.p["batch"])
    out = {}
    for w, it in self.iters.items():
      t0 = time.perf_counter()
      for _ in range(n):
        next(it)
      out[f"loader_w{w}_ex_s"] = n * bsz / (time.perf_counter() - t0)
    out["smoke_step_ex_s"] = bsz / _timed(self.step.train, int(self.p["steps"]))
    return out


class CompileItem:
  """(6) cold compile of the train steps (the driver runs each repeat in a fresh process)."""

  def __init__(self, p):
    self.p = p

  def setup(self):
    _jax().config.update("jax_enable_compilation_cache", False)  # always cold
    return {}

  def run(self):
    out = {}
    for name, p in self.p["steps"].items():
      step = _Step(p)
      out[f"{name}_compile_s"] = step.compile_train()
      step.train()
    return out


ITEMS = {"unet": UNetItem, "ddim": DDIMItem, "fid": FIDItem, "records": RecordsItem,
         "loader": LoaderItem, "compile": CompileItem}
