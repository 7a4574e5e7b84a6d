"""Training entry point: `python -m ctdiff_jax.train --config=configs/kidneys.py --workdir=W`.

Any config field can be overridden on the command line (`--config.num_train_steps=100`); a
variant is chosen after a colon (`--config=configs/kidneys.py:smoke`). Running again with the
same workdir resumes from the latest checkpoint (also after the run was killed: a checkpoint
counts once Orbax has finished it). A second run into a workdir that is in use is refused.
User errors (a bad config field, a missing dataset, a busy workdir) end with one
`ctdiff_jax.train: error: ...` line (ctdiff_jax/cli.py; --verbose shows the traceback).
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ctdiff_jax import cli
from ctdiff_jax.training import trainer

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and sample grids.")
config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/<x>.py[:variant]).", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.info("config:\n%s", FLAGS.config)
  trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main, "ctdiff_jax.train", uses_tfds=True)
