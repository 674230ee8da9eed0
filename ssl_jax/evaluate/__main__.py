"""Evaluation CLI: linear evaluation or fine-tuning of a pretrained backbone (resumable).

  python -m ssl_jax.evaluate --config=configs/linear_eval.py[:vit|:mae|:multilayer|:demo] \\
      --config.backbone.workdir=PRETRAIN_WORKDIR --workdir=OUT
  python -m ssl_jax.evaluate --config=configs/finetune.py[:simmim|:mimco|:demo] \\
      --config.backbone.workdir=PRETRAIN_WORKDIR --workdir=OUT

`config.protocol` ("linear" or "finetune") picks the protocol; both train through
`ssl_jax.evaluate.supervised`. Rerunning the same command resumes from OUT/checkpoints (SIGTERM
saves one and exits). Writes OUT/config.json, OUT/metrics.jsonl and, once complete,
OUT/linear_eval_summary.json (or finetune_summary.json), and prints the final top-1/top-5.
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
  if not summary["complete"]:
    print(f"{protocol_lib.NAME}: stopped at step {summary['step']} of {summary['total_steps']}; "
          "rerun the same command to resume")
    return
  for key in sorted(summary):
    if key.endswith("/top1"):
      print(f"{key[:-len('/top1')]}: top1={summary[key]:.4f} "
            f"top5={summary[key[:-1] + '5']:.4f} after {summary['step']} steps")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
