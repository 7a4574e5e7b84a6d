"""The `Task` interface: the registry, explicit generate options, no model_family branches."""

import ast
import inspect
import pathlib

import pytest

from configs import kidneys, pix2pix_kidneys
from ctdiff_jax.training import tasks
from ctdiff_jax.training.tasks import base

REPO = pathlib.Path(__file__).resolve().parents[2]
# Files allowed to compare config.model_family: the registry, and Table 1's column labels.
MODEL_FAMILY_READERS = {"ctdiff_jax/training/tasks/__init__.py",
                        "ctdiff_jax/evaluation/table1.py"}


def test_registry_builds_each_family():
  assert set(tasks.TASKS) == {"diffusion", "pix2pix", "segmentation"}
  for module in (kidneys, pix2pix_kidneys):
    config = module.get_config("smoke")
    task = tasks.get_task(config)
    assert isinstance(task, base.Task) and type(task) is tasks.TASKS[config.model_family]
  config = kidneys.get_config("smoke")
  config.model_family = "vae"
  with pytest.raises(ValueError, match="model_family must be one of"):
    tasks.get_task(config)


@pytest.mark.parametrize("family", ["diffusion", "pix2pix"])
def test_generate_takes_exactly_its_named_options(family):
  cls = tasks.TASKS[family]
  assert not inspect.isabstract(cls)
  params = inspect.signature(cls.generate).parameters
  assert not any(p.kind is p.VAR_KEYWORD for p in params.values()), "no **ignored options"
  module = kidneys if family == "diffusion" else pix2pix_kidneys
  task = tasks.get_task(module.get_config("smoke"))
  options = task.generate_options(num_steps=7, sampler="ddpm")
  named = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
  assert set(options) == named


def test_generate_options_and_sampler_info():
  config = kidneys.get_config("smoke")
  task = tasks.get_task(config)
  assert task.generate_options() == {"num_steps": config.sampling.num_steps,
                                     "sampler": config.sampling.sampler}
  assert task.generate_options(7, "ddpm") == {"num_steps": 7, "sampler": "ddpm"}
  assert task.sampler_info(7, None) == {"sampler": config.sampling.sampler, "steps": 7}
  gan = tasks.get_task(pix2pix_kidneys.get_config("smoke"))
  assert gan.generate_options(7, "ddpm") == {}
  assert gan.sampler_info(7, "ddpm") == {"sampler": None, "steps": None}


def _compares_model_family(tree: ast.AST) -> bool:
  for node in ast.walk(tree):
    if isinstance(node, ast.Compare):
      for side in (node.left, *node.comparators):
        if isinstance(side, ast.Attribute) and side.attr == "model_family":
          return True
  return False


def test_only_the_registry_branches_on_model_family():
  found = set()
  for path in sorted((REPO / "ctdiff_jax").rglob("*.py")):
    if _compares_model_family(ast.parse(path.read_text(), filename=str(path))):
      found.add(str(path.relative_to(REPO)))
  assert found <= MODEL_FAMILY_READERS, found - MODEL_FAMILY_READERS
