"""Test setup: 8 fake CPU devices for sharding tests, absl flags parsed for grain workers."""
import os

os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
