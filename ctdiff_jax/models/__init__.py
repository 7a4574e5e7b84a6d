"""Flax models: the conditional diffusion UNet and the Pix2Pix baseline."""
