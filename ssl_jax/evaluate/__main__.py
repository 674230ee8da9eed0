"""Evaluation CLI: linear probe or fine-tune of a pretrained backbone.

  python -m ssl_jax.evaluate --config=configs/linear_eval.py[:vit|:mae|:demo] \\
      --config.backbone.workdir=PRETRAIN_WORKDIR --workdir=OUT
  python -m ssl_jax.evaluate --config=configs/finetune.py[:demo] \\
      --config.backbone.workdir=PRETRAIN_WORKDIR --workdir=OUT

`config.protocol` ("linear" or "finetune") picks the protocol. Writes OUT/metrics.jsonl and
OUT/linear_eval_summary.json (or finetune_summary.json) and prints the final top-1/top-5.
"""
from absl import flags
from ml_collections import config_flags

from ssl_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Evaluation config, e.g. configs/linear_eval.py:vit", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder for metrics and the summary.")

PROTOCOLS = ("linear", "finetune")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  config = cli.loaded_config(_CONFIG)
  protocol = config.get("protocol", "linear")
  if protocol not in PROTOCOLS:
    cli.fail(f"config.protocol={protocol!r} must be one of {PROTOCOLS}")
  # pylint: disable=import-outside-toplevel
  if protocol == "linear":
    from ssl_jax.evaluate import linear_eval as protocol_lib
  else:
    from ssl_jax.evaluate import finetune as protocol_lib
  summary = protocol_lib.run(config, _WORKDIR.value)
  summary = {k: v for k, v in summary.items() if k != "head"}
  print(f"{protocol}: top1={summary.get('top1', float('nan')):.4f} "
        f"top5={summary.get('top5', float('nan')):.4f} after {summary['step']} steps")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
