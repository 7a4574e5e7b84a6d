"""Every default in one place: configs/default.py. The library keeps no second literal.

Configs are plain ml_collections values that import no library code; library functions and
modules that take a config setting either have no default for it or the config's (a drifted
second default, like `prediction="eps"` against the config's "v", fails here).
"""

import ast
import dataclasses
import inspect
import pathlib

import pytest

from configs import default
from ctdiff_jax.data import transforms
from ctdiff_jax.diffusion import sampling
from ctdiff_jax.diffusion import schedule
from ctdiff_jax.models import pix2pix
from ctdiff_jax.models import unet

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))
ALLOWED_CONFIG_IMPORTS = {"os", "ml_collections", "configs"}


def _imported_modules(path: pathlib.Path) -> set[str]:
  tree = ast.parse(path.read_text(), filename=str(path))
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      names.add(node.module or "")
  return names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_files_import_no_library_code(path):
  imported = _imported_modules(path)
  assert not {m for m in imported if m.split(".")[0] == "ctdiff_jax"}, imported
  assert {m.split(".")[0] for m in imported} <= ALLOWED_CONFIG_IMPORTS, imported


def test_library_has_no_default_config_functions():
  """The defaults of config sections live in configs/default.py, not in `default_*_config()`."""
  found = []
  for path in sorted((REPO / "ctdiff_jax").rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      # A zero-argument `default_*config()` / `smoke_*config()` builds a section's defaults.
      if isinstance(node, ast.FunctionDef) and node.name.endswith("config") and (
          node.name.startswith(("default", "smoke", "reference"))) and not node.args.args:
        found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
  assert not found


def test_example_config_defaults_equal_config_data():
  data = default.get_config().data
  defaults = transforms.ExampleConfig()
  for field in dataclasses.fields(transforms.ExampleConfig):
    assert field.name in data, f"config.data lacks ExampleConfig.{field.name}"
    value = data[field.name]
    value = tuple(value) if isinstance(value, (list, tuple)) else value
    assert getattr(defaults, field.name) == value, field.name
  assert transforms.ExampleConfig.from_data_config(data) == defaults


def _check_defaults(fn, section: dict, names=None):
  """Each parameter of `fn` named like a field of `section` has no default or the config's."""
  params = inspect.signature(fn).parameters
  names = [n for n in (names or section) if n in params]
  assert names, f"{fn.__qualname__} takes none of {sorted(section)}"
  for name in names:
    default_value = params[name].default
    assert default_value is inspect.Parameter.empty or default_value == section[name], (
        f"{fn.__module__}.{fn.__qualname__}({name}={default_value!r}) but the config says "
        f"{section[name]!r}")


def _diffusion_fields(config) -> dict:
  return {**config.sampling.to_dict(), **config.diffusion.to_dict(),
          "kind": config.diffusion.schedule}


@pytest.mark.parametrize("fn", [
    sampling.sample, sampling.make_sampler, schedule.loss_at, schedule.diffusion_loss,
    schedule.target, schedule.predict_x0, schedule.predict_eps, schedule.make_schedule,
], ids=lambda f: f.__qualname__)
def test_diffusion_function_defaults_are_the_configs(fn):
  _check_defaults(fn, _diffusion_fields(default.get_config()))


def test_prediction_and_sampler_options_have_no_second_default():
  """The drift this file exists for: the library said 'eps' while the config said 'v'."""
  for fn in (sampling.sample, sampling.make_sampler, schedule.loss_at):
    params = inspect.signature(fn).parameters
    assert params["prediction"].default in (inspect.Parameter.empty,
                                            default.get_config().diffusion.prediction)


def _module_defaults(module_cls) -> dict:
  return {f.name: f.default for f in dataclasses.fields(module_cls)
          if f.name not in ("parent", "name") and f.default is not dataclasses.MISSING}


def test_unet_fields_have_no_defaults():
  fields = {f.name for f in dataclasses.fields(unet.UNet)} - {"parent", "name"}
  assert fields == set(default.get_config().model), "config.model and UNet fields differ"
  assert not _module_defaults(unet.UNet)


@pytest.mark.parametrize("module_cls", [pix2pix.UNetGenerator, pix2pix.PatchDiscriminator])
def test_pix2pix_network_fields_have_no_defaults(module_cls):
  assert not _module_defaults(module_cls)


def test_data_fields_are_the_top_level_ones():
  """dataset, data_dir, image_size and spacing_mm are set once, at the top of the config."""
  for variant in ("", "smoke", "reference"):
    config = default.get_config(variant)
    for field in ("dataset", "data_dir", "image_size", "spacing_mm"):
      assert config.data[field] == config[field], (variant, field)
    config.spacing_mm = 3.0
    assert config.data.spacing_mm == 3.0
