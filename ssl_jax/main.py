"""Entry point: `python -m ssl_jax.main --config=configs/byol.py[:variant] --workdir=DIR`.

Any config field can be overridden: `--config.train.batch_size=256`. Rerunning the same command
on the same workdir resumes from its latest checkpoint with the exact next batch. Mistakes in
the command (config values, variants, data paths) print one line and exit with status 2.
"""
from absl import flags
from ml_collections import config_flags

from ssl_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/byol.py:demo",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None,
                                  "Stop after this many steps (the schedule still spans "
                                  "config.train.total_steps); for smoke tests.")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  # pylint: disable=import-outside-toplevel
  import time
  import jax
  from ssl_jax import metrics, train
  start = time.time()
  result = train.run(cli.loaded_config(_CONFIG), _WORKDIR.value, max_steps=_MAX_STEPS.value)
  if jax.process_index() == 0:
    for line in metrics.summary_lines(_WORKDIR.value, result, time.time() - start):
      print(line, flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
