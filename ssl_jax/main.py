"""Entry point: `python -m ssl_jax.main --config=configs/byol.py[:variant] --workdir=DIR`.

Any config field can be overridden: `--config.train.batch_size=256`. Rerunning the same command
on the same workdir resumes from its latest checkpoint with the exact next batch.
"""
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/byol.py:demo",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None,
                                  "Stop after this many steps (the schedule still spans "
                                  "config.train.total_steps); for smoke tests.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ssl_jax import train  # pylint: disable=import-outside-toplevel
  result = train.run(_CONFIG.value, _WORKDIR.value, max_steps=_MAX_STEPS.value)
  summary = {k: v for k, v in result.items() if k != "state"}
  logging.info("done: %s", summary)
  print("final:", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in summary.items()))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
