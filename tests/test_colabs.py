"""The notebooks of colabs/ run headless, top to bottom, at their committed `SMALL = True`.

Each is executed by a fresh Jupyter kernel (nbclient, `tests/colab_runner.py`); any exception in
any cell fails the test with the cell and its traceback. export_to_pytorch needs torch and runs
under `make test-export` (tests/test_torch_colab_export.py). Runtime on 2 CPU cores: about
40 s (masks_and_views) and 90 s (pretrain_and_probe).
"""
import json

import pytest

from tests import colab_runner

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")


@pytest.mark.parametrize("name", colab_runner.NOTEBOOKS)
def test_committed_notebook_is_clean(name):
  """Outputs cleared, valid nbformat, the setup cell first (install from the repo, SMALL)."""
  nb = colab_runner.read(name)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, name
  for cell in code:
    assert not cell.get("outputs") and cell.get("execution_count") is None, (
        f"{name}.ipynb is committed with outputs: clear them (Edit > Clear all outputs)")
  setup = code[0].source
  assert "SMALL = True" in setup
  assert "pip" in setup and "requirements.txt" in setup and "git\", \"clone" in setup
  assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


def test_masks_and_views_runs(tmp_path):
  nb, seconds = colab_runner.run_notebook("masks_and_views", str(tmp_path))
  text = colab_runner.outputs_text(nb)
  assert "SMALL=True" in text and "segments dropped by max_segments" in text
  assert colab_runner.images_shown(nb) == 5, text
  print(f"masks_and_views: {seconds:.0f} s")


def test_pretrain_and_probe_runs(tmp_path):
  nb, seconds = colab_runner.run_notebook("pretrain_and_probe", str(tmp_path))
  text = colab_runner.outputs_text(nb)
  history = [json.loads(line) for line in
             (tmp_path / "colab_detcon_b" / "metrics.jsonl").read_text().splitlines()]
  assert max(m["step"] for m in history) == 16
  assert any("knn/top1" in m for m in history) and any("linear/top1" in m for m in history)
  assert "knn    top-1:" in text and "linear top-1:" in text, text
  assert colab_runner.images_shown(nb) == 3, text  # curves, PCA at init, PCA after training
  print(f"pretrain_and_probe: {seconds:.0f} s")
