"""The data package has no import cycle, and every source name resolves.

A cycle between modules shows up as an ImportError or AttributeError (a class body using a name of
a module that is still half-initialised) for *some* import orders only. Whether importing module
m succeeds depends only on which data modules are already fully loaded, so trying every order is
trying, from every set of loaded modules some order reaches, every module not yet loaded: the
test walks those states (each rebuilt from a fresh `ssl_jax`: every `ssl_jax*` module dropped
from `sys.modules`; third-party modules stay loaded, which a cycle between our modules cannot
depend on) in one fresh interpreter. That covers all 720 orders of the six modules.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from ssl_jax import registry
from ssl_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The modules of ssl_jax/data below the view stack (transforms, views, augment, pipeline import
# none of these, so no cycle can pass through them).
MODULES = ("records", "sources", "tfrecord", "tfds_source", "imagenet", "fh_masks")

# Runs in a fresh interpreter; prints {"failures": [...], "states": N, "tried": N} as JSON.
_WALK = """
import importlib, json, sys

def fresh(order):
  for name in [m for m in sys.modules if m == "ssl_jax" or m.startswith("ssl_jax.")]:
    del sys.modules[name]
  for m in order:
    importlib.import_module("ssl_jax.data." + m)
  return frozenset(m for m in MODULES if "ssl_jax.data." + m in sys.modules)

seen = {frozenset(): ()}  # set of loaded modules -> an import order that reaches it
todo, failures, tried = [frozenset()], [], 0
while todo:
  state = todo.pop()
  for m in MODULES:
    if m in state:
      continue
    order = seen[state] + (m,)
    tried += 1
    try:
      reached = fresh(order)
    except (ImportError, AttributeError) as e:
      failures.append([list(order), type(e).__name__, str(e)])
      continue
    if reached not in seen:
      seen[reached] = order
      todo.append(reached)
print(json.dumps({"failures": failures, "states": len(seen), "tried": tried,
                  "all_loaded": frozenset(MODULES) in seen}))
"""


def _run(code: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)


def test_every_import_order_of_the_data_modules():
  run = _run(f"MODULES = {MODULES!r}\n" + _WALK)
  assert run.returncode == 0, run.stderr[-3000:]
  out = json.loads(run.stdout)
  assert out["failures"] == [], out["failures"][:3]
  assert out["all_loaded"] and out["tried"] >= len(MODULES), out


def test_base_module_imports_none_of_the_others():
  # `sources` is the base every other data module builds on: importing it (as a grain worker
  # unpickling a built-in source does) loads no other data module.
  run = _run("import sys; import ssl_jax.data.sources; "
             "print(sorted(m for m in sys.modules if m.startswith('ssl_jax.data.')))")
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.strip() == "['ssl_jax.data.sources']"


def test_every_source_name_resolves():
  for name, target in sources.SOURCES.items():
    make = sources.source_constructor(name)
    module, attr = target.split(":")
    assert callable(make) and make.__name__ == attr and make.__module__ == module, name
  src = registry.get_source("builtin_photos", split="probe", num_per_photo=1, crop_size=8)
  assert isinstance(src, sources.BuiltinPhotos) and len(src) == len(sources.BUILTIN_PHOTOS)
