"""Benchmarks of ctdiff-jax against its PyTorch/MONAI peer (`python -m benchmarks.run`).

Not part of the installed package. `run` drives one worker process per side (ours in this
venv, the peer in a torch + MONAI venv) through `worker`'s line protocol, alternating the
two sides repeat by repeat; `ours` and `peer` hold the measured items, `suites` their sizes,
`report` the markdown table. Importing this package imports nothing heavy (the peer venv
imports it too).
"""
