"""Executes a notebook of colabs/ headless (nbclient), as a user would run it top to bottom.

Shared by tests/test_colabs.py (main venv) and tests/test_torch_colab_export.py (export venv).
The kernel is a fresh process of the running interpreter (jupyter_client maps the kernelspec's
`python` to sys.executable), so it imports this checkout's ssl_jax (the notebook's setup cell
finds the repository root and puts it first on sys.path). It gets the tests' cheap XLA compiles
and compile cache through the environment (conftest.py sets them in-process only), one CPU
device (as a 2-core CPU user has), and writes its runs under a temporary SSL_JAX_WORKDIRS.
"""
from __future__ import annotations

import os
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, "colabs")
NOTEBOOKS = ("masks_and_views", "pretrain_and_probe", "export_to_pytorch")


def read(name: str):
  import nbformat  # pylint: disable=import-outside-toplevel
  return nbformat.read(os.path.join(COLABS, f"{name}.ipynb"), as_version=4)


def run_notebook(name: str, workdirs: str, timeout: int = 900):
  """Runs colabs/<name>.ipynb at its committed settings (SMALL = True) from colabs/.

  Returns (executed notebook, seconds). A cell that raises fails with nbclient's
  CellExecutionError, whose message holds the cell's source and traceback.
  """
  from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel
  nb = read(name)
  env_keys = {
      "SSL_JAX_WORKDIRS": workdirs,
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") if "xla_backend_optimization_level" in
                   os.environ.get("XLA_FLAGS", "") else
                   (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                    " --xla_llvm_disable_expensive_passes=true").strip(),
      "JAX_COMPILATION_CACHE_DIR": os.path.join(REPO, ".cache", "jax"),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1.0",
      "JAX_PLATFORMS": "cpu",
      "MPLBACKEND": "Agg",
  }
  saved = {k: os.environ.get(k) for k in env_keys}
  os.environ.update(env_keys)  # the kernel process inherits the environment at its start
  try:
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": COLABS}})
    start = time.perf_counter()
    client.execute()
    return nb, time.perf_counter() - start
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def outputs_text(nb) -> str:
  """All stream and text/plain outputs of an executed notebook, in order."""
  parts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.output_type == "stream":
        parts.append(out.text)
      elif "data" in out and "text/plain" in out.data:
        parts.append(out.data["text/plain"])
  return "\n".join(parts)


def images_shown(nb) -> int:
  """How many PNG figures the notebook displayed."""
  return sum("image/png" in out.get("data", {}) for cell in nb.cells
             for out in cell.get("outputs", []))
