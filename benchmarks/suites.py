"""What each suite measures: items, sizes, the rows of the table and their targets.

An item is run on our side and on zero or more peer sides ("peer" = MONAI eager, "peer
compiled" = torch.compile); a row compares one metric of ours with one metric of a side and
states the issue's target (#15). Sizes: `cpu` is what a 2-core CPU runs in ~20 min; `gpu` is the
issue's 256 px, batch 32, bf16 (the `:reference` config's dtype); `dry_run` shrinks everything
(a tiny UNet, 32 px, a few images) so the whole suite runs start to finish on a CPU in seconds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SMOKE_NET = {"channels": [16, 32, 32], "attention_levels": [False, False, True],
             "num_res_blocks": 1, "head_dim": 16}  # configs/default.py's smoke UNet


@dataclasses.dataclass
class Target:
  """`ratio`: speed ratio ours/side >= value; `max_s`: ours <= value seconds; `min`: ours >=
  value; `le_side`: ours <= the side's value (memory)."""
  kind: str
  value: float = 0.0
  text: str = ""


@dataclasses.dataclass
class Row:
  item: str
  label: str
  ours: str  # metric key in our run results
  side: str | None  # "peer", "peer compiled", "ours" (an internal reference) or None
  side_metric: str | None
  side_label: str = ""
  higher_better: bool = True
  target: Target | None = None


@dataclasses.dataclass
class Item:
  name: str
  title: str
  params: dict[str, Any]
  peers: dict[str, dict[str, Any]]  # side name -> peer params
  repeats: int | None = None  # None: the suite's --repeats
  fresh: bool = False  # each repeat in a fresh process (cold compile)
  timeout_s: float = 900.0


def _unet_params(suite: str, dry: bool) -> dict[str, Any]:
  if dry:
    return {"variant": "reference", "image_size": 32, "batch": 2, "dtype": "bfloat16",
            "attention_impl": "cudnn", "model": SMOKE_NET, "steps": 2}
  if suite == "gpu":
    return {"variant": "reference", "image_size": 256, "batch": 32, "dtype": "bfloat16",
            "attention_impl": "cudnn", "steps": 20}
  # The CPU comparison: fp32, 64 px, batch 4 (cuDNN attention needs a GPU).
  return {"variant": "reference", "image_size": 64, "batch": 4, "dtype": "float32",
          "attention_impl": None, "steps": 3}


def items(suite: str, dry: bool, manual_dir: str, organ_names: list[list[str]],
          fid_torchscript: str | None, torch_compile: bool) -> list[Item]:
  """The items of `suite` (`dry`: the shrunk sizes)."""
  unet = _unet_params(suite, dry)
  gpu = suite == "gpu"
  peers = {"peer": dict(unet)}
  if torch_compile:
    peers["peer compiled"] = dict(unet, compiled=True)
  # DDIM-50 is 50 forwards: on a CPU, half the UNet item's batch keeps a repeat under ~1 min.
  ddim = dict(unet, ddim_steps=2 if dry else 50, batch=unet["batch"] if gpu or dry else 2)
  fid_n, fid_b = (2, 2) if dry else ((1024, 256) if gpu else (32, 16))
  fid = {"n": fid_n, "batch": fid_b}
  size, mm = (32, 12.0) if dry else (256, 1.5)
  records = {"manual_dir": manual_dir, "dataset": "abdomen", "organ_names": organ_names,
             "image_size": size, "spacing_mm": mm}
  loader = {"manual_dir": manual_dir, "dataset": "abdomen", "image_size": 32 if dry else 64,
            "spacing_mm": 12.0 if dry else 6.0, "batch": 2 if dry else 4,
            "workers": [0, 2], "batches": 3 if dry else 60, "steps": 2 if dry else 10,
            "dtype": "float32"}
  if dry:
    loader["model"] = SMOKE_NET
  smoke = {"variant": "smoke", "image_size": 32 if dry else 64, "batch": 2 if dry else 4,
           "dtype": "float32", "model": SMOKE_NET}
  compile_steps = {"smoke": smoke, "reference": dict(unet)}
  return [
      Item("unet", "(1) reference UNet train step / forward", unet, peers),
      Item("ddim", f"(2) DDIM-{ddim['ddim_steps']} generation", ddim, {"peer": ddim},
           repeats=None if (dry or gpu) else 2),
      Item("fid", "(3) FID Inception features, 299 px", fid,
           {"peer": dict(fid, torchscript=fid_torchscript)}),
      Item("records", "(4) NIfTI -> slice records", records, {"peer": records}),
      Item("loader", "(5) input pipeline with masks", loader, {}),
      Item("compile", "(6) cold compile of the train step", {"steps": compile_steps},
           {"peer": {"steps": compile_steps}}, fresh=True, repeats=None if dry else 2),
  ]


def rows(suite: str) -> list[Row]:
  """The table's rows with the issue's targets for this suite."""
  gpu = suite == "gpu"
  if gpu:
    train_t = Target("ratio", 2.0, ">= 2x compiled peer (>= 390 img/s on H100)")
    fwd_t, fid_t = Target("min", 1500, ">= 1500 img/s"), Target("ratio", 1.5, ">= 1.5x")
    ddim_t = Target("min", 28, ">= 28 slices/s")
  else:
    train_t, fwd_t = Target("ratio", 1.0, ">= 1.0x"), Target("ratio", 1.0, ">= 1.0x")
    fid_t, ddim_t = Target("ratio", 1.0, ">= 1.0x"), None
  out = [
      Row("unet", "train step, img/s", "train_img_s", "peer", "train_img_s", "MONAI eager",
          target=None if gpu else train_t),
      Row("unet", "forward, img/s", "fwd_img_s", "peer", "fwd_img_s", "MONAI eager",
          target=None if gpu else fwd_t),
      Row("unet", "train step, img/s", "train_img_s", "peer compiled", "train_img_s",
          "MONAI torch.compile", target=train_t if gpu else None),
      Row("unet", "forward, img/s", "fwd_img_s", "peer compiled", "fwd_img_s",
          "MONAI torch.compile", target=fwd_t if gpu else None),
      Row("ddim", "generation, slices/s", "slices_s", "peer", "slices_s",
          "MONAI DDIMScheduler", target=ddim_t),
      Row("fid", "features, img/s", "img_s", "peer", "img_s", "torch network",
          target=fid_t),
      Row("records", "volumes/s", "volumes_s", "peer", "volumes_s", "MONAI transform chain",
          target=Target("ratio", 3.0, ">= 3x per volume")),
      Row("records", "slices/s", "slices_s", "peer", "slices_s", "MONAI transform chain"),
      Row("loader", "examples/s, 0 workers", "loader_w0_ex_s", "ours", "smoke_step_ex_s",
          "smoke train step's consumption", target=Target("ratio", 2.0, ">= 2x consumption")),
      Row("loader", "examples/s, 2 workers", "loader_w2_ex_s", "ours", "smoke_step_ex_s",
          "smoke train step's consumption", target=Target("ratio", 2.0, ">= 2x consumption")),
      Row("compile", "smoke step: cold compile, s", "smoke_compile_s", "peer",
          "smoke_compile_s", "first eager step", higher_better=False,
          target=Target("max_s", 10.0, "< 10 s")),
      Row("compile", "reference step: cold compile, s", "reference_compile_s", "peer",
          "reference_compile_s", "first eager step", higher_better=False),
  ]
  if gpu:
    out.append(Row("unet", "peak memory, GiB", "peak_GiB", "peer compiled", "peak_GiB",
                   "MONAI torch.compile", higher_better=False,
                   target=Target("le_side", 0, "<= the peer's")))
  return out
