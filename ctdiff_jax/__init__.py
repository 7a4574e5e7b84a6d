"""ctdiff_jax: endless labelled synthetic CT slices with conditional diffusion (JAX/Flax).

Subpackages: `data` (input pipeline, mask modes), `models` (UNet, Pix2Pix), `fid`
(Inception FID). Entry points: `python -m ctdiff_jax.{phantom,build_dataset,train,generate,
evaluate,quickstart}`.
"""

__version__ = "0.1.0"
