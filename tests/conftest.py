"""Test setup: 8 fake CPU devices, cheap XLA compiles, a shared compilation cache, absl flags parsed.

Tests are dominated by XLA:CPU compile time (tiny models run in milliseconds), so compiles use
optimisation level 0, and identical programs compiled by several tests (or both xdist workers)
are reused through JAX's persistent cache in `.cache/jax` (gitignored).
"""
import os

_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
