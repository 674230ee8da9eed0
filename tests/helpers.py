"""Shared test fixtures: tiny in-memory sources and config loading."""
from __future__ import annotations

import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = "test"):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


class BlockSource:
  """`n` synthetic RGB images of 4x4 coloured blocks with matching segment ids and labels.

  Each block is one segment (ids offset by 300 so ids above 255 are exercised); the label is
  the dominant colour index, so a probe can learn it.
  """

  def __init__(self, n: int = 64, size: int = 48, num_classes: int = 4, seed: int = 0):
    self.n, self.size, self.num_classes, self.seed = n, size, num_classes, seed

  def __len__(self):
    return self.n

  def __getitem__(self, i: int) -> dict:
    rng = np.random.default_rng((self.seed, i))
    label = int(i % self.num_classes)
    palette = rng.integers(0, 256, (16, 3))
    palette[::2] = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]])[label]
    cells = np.arange(16).reshape(4, 4)
    cell = self.size // 4
    ids = np.kron(cells, np.ones((cell, cell), np.int64))
    image = palette[ids].astype(np.uint8)
    image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
    return {"image": image, "masks": (ids + 300).astype(np.int32), "label": label,
            "id": f"block_{i}"}
