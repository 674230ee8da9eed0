"""Run by tests/test_multiprocess.py in each of 2 processes (`launch/local_multiprocess.sh
--module=tests.multiprocess_eval_check 2 -- OUT`): evaluation features on several processes.

Each process reads its rows of every global batch; `features.source_features` must give every
process the features and labels of the whole set, in order, bad records left out, both when it
jits the encoder over the global mesh and when the encoder is the trainer's predict function
(local rows in, global rows out). Process 0 writes what it got to OUT (JSON).
"""
from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import parallel
from ssl_jax.evaluate import features


class Source:
  """11 records, 8x8 images whose value is the index; record 3 is unreadable."""

  def __len__(self):
    return 11

  def __getitem__(self, i):
    if i == 3:
      return {"id": "bad", "error": "corrupt"}
    return {"image": np.full((8, 8, 3), i, np.uint8), "label": i % 4, "id": str(i)}


def main(out_path: str) -> None:
  parallel.initialize_distributed()
  mesh = parallel.make_mesh()
  encode = lambda x: jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3))  # noqa: E731
  jitted_feats, jitted_labels = features.source_features(encode, Source(), image_size=8,
                                                         batch_size=8, mesh=mesh)
  jit_encode = jax.jit(encode)

  def predict(local_images):  # the trainer's contract: local rows in, global rows out
    x = parallel.global_batch({"x": np.asarray(local_images)}, mesh)["x"]
    return parallel.to_host(jit_encode(x))

  host_feats, host_labels = features.source_features(predict, Source(), image_size=8,
                                                     batch_size=8)
  if jax.process_index() == 0:
    with open(out_path, "w", encoding="utf-8") as f:
      json.dump({"processes": jax.process_count(), "devices": jax.device_count(),
                 "jitted": [np.asarray(jitted_feats).tolist(), jitted_labels.tolist()],
                 "predict": [np.asarray(host_feats).tolist(), host_labels.tolist()]}, f)


if __name__ == "__main__":
  main(sys.argv[1])
