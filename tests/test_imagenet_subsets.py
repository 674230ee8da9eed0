"""ImageNet split slices (tfds syntax) and class subsets (ImageNet-100) on every reader."""
from __future__ import annotations

import os

import numpy as np
import pytest

from ssl_jax.data import imagenet, sources, tfds_source
from tests.fixtures_imagenet import VAL_WNIDS, WNIDS, make_imagenet_fixture


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagenet")
  out = make_imagenet_fixture(str(root))
  out["cache"] = str(root / "cache")
  # Two of the three training classes, listed out of order with a comment and a blank line.
  out["classes"] = str(root / "classes.txt")
  with open(out["classes"], "w", encoding="utf-8") as f:
    f.write(f"{WNIDS[2]}  # the third class\n\n{WNIDS[1]}\n")
  return out


def _ids(source):
  return [source[i]["id"] for i in range(len(source))]


def _labelled(source):
  return {r["id"]: r["label"] for r in (source[i] for i in range(len(source))) if "error" not in r}


# ---------------------------------------------------------------------------------------------
# Slices: tfds's arithmetic

@pytest.mark.parametrize("spec, sizes, expected", [
    ("train[:10%]", {"train": 1281167}, (0, 128117)),        # round(128116.7)
    ("train[10%:20%]", {"train": 1281167}, (128117, 256233)),  # round(256233.4)
    ("train[:50%]", {"train": 9}, (0, 4)),                  # tfds rounds 4.5 half to even
    ("train[1000:2000]", {"train": 5000}, (1000, 2000)),
    ("train[-5:]", {"train": 12}, (7, 12)),
    ("validation[:2]", {"train": 10, "validation": 4}, (10, 12)),  # after the train records
])
def test_split_indices(spec, sizes, expected):
  got = sources.split_indices(spec, sizes)
  np.testing.assert_array_equal(got, np.arange(*expected))


def test_split_indices_sums_shards_and_errors():
  got = sources.split_indices("train[:1shard]+validation[-1:]", {"train": 10, "validation": 4},
                              {"train": [3, 7]})
  np.testing.assert_array_equal(got, [0, 1, 2, 13])
  with pytest.raises(ValueError, match="config.x='test'.*splits here: \\['train'\\]"):
    sources.split_indices("test", {"train": 10}, where="config.x")
  with pytest.raises(ValueError, match="config.x='train\\[:10%%\\]'"):
    sources.split_indices("train[:10%%]", {"train": 10}, where="config.x")


def test_tfrecord_slices_equal_tfds_own_slicing(fx):
  """Our slices of the tfrecord copy hold the records tfds's own data_source gives for the same
  expression on the array_record copy (same examples, same order of preparation)."""
  full = _ids(tfds_source.tfds_tfrecord_source(data_dir=fx["tfds_tfrecord"],
                                               cache_dir=fx["cache"]))
  assert len(full) == 9
  for spec in ("train[2:5]", "train[:50%]", "train[-2:]", "train[1:3]+validation[:1]"):
    ours = _ids(tfds_source.tfds_tfrecord_source(split=spec, data_dir=fx["tfds_tfrecord"],
                                                 cache_dir=fx["cache"]))
    theirs = _ids(tfds_source.TfdsSource("imagenet2012", split=spec,
                                         data_dir=fx["tfds_array_record"]))
    assert ours == theirs, spec
  assert _ids(tfds_source.tfds_tfrecord_source(split="train[2:5]", data_dir=fx["tfds_tfrecord"],
                                               cache_dir=fx["cache"])) == full[2:5]
  with pytest.raises(ValueError, match="tfds_tfrecord split='train\\[20:30\\]'"):
    tfds_source.tfds_tfrecord_source(split="train[20:30]", data_dir=fx["tfds_tfrecord"],
                                     cache_dir=fx["cache"])


def test_folder_slices_are_class_balanced(fx):
  parent = os.path.dirname(fx["train_dir"])
  three = imagenet.ImageNetFolder(parent, split="train[:3]")
  assert sorted(r["label"] for r in (three[i] for i in range(3))) == [0, 1, 2]
  assert _ids(three) == [f"{w}_1.JPEG" for w in WNIDS]  # the first image of every class
  half = imagenet.ImageNetFolder(parent, split="train[:50%]")  # round(4.5) = 4 images
  assert _ids(half) == [f"{w}_1.JPEG" for w in WNIDS] + [f"{WNIDS[0]}_2.JPEG"]
  rest = imagenet.ImageNetFolder(fx["train_dir"], split="[50%:]")  # the folder itself
  assert sorted(_ids(half) + _ids(rest)) == sorted(_ids(imagenet.ImageNetFolder(
      fx["train_dir"])))
  assert imagenet.ImageNetFolder(fx["train_dir"])[0]["id"] == f"{WNIDS[0]}_1.JPEG"  # unsliced
  val = imagenet.ImageNetFolder(parent, split="val[:2]", labels_file=fx["wnid_txt"])
  assert len(val) == 2
  with pytest.raises(FileNotFoundError, match="split='test\\[:2\\]'"):
    imagenet.ImageNetFolder(parent, split="test[:2]")
  with pytest.raises(ValueError, match="imagenet_folder split='train\\[:x\\]'"):
    imagenet.ImageNetFolder(parent, split="train[:x]")


# ---------------------------------------------------------------------------------------------
# Class subsets

def test_imagenet100_is_cmc_list():
  wnids = imagenet.subset_wnids("imagenet100")
  assert len(wnids) == 100 == len(set(wnids))
  assert wnids[:3] == ("n02869837", "n01749939", "n02488291")  # CMC's file order
  labels = [imagenet.wnid_label(w) for w in wnids]  # all are ILSVRC2012 synsets
  label_map = imagenet.subset_label_map("imagenet100")
  assert sorted(label_map.values()) == list(range(100))
  # Sorted-wnid order: the smallest standard label gets 0, as a folder of those classes would.
  assert label_map[min(labels)] == 0 and label_map[max(labels)] == 99


def test_class_subset_errors(tmp_path):
  for content, match in (("n01440764\nn0144076X\n", "not one of the 1000"),
                         ("n01440764\nn01440764\n", "1 distinct"), ("\n", "0 wnids")):
    path = tmp_path / "c.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
      imagenet.subset_wnids(str(path))
  with pytest.raises(ValueError, match="imagenet1000"):
    imagenet.subset_wnids("imagenet1000")


def test_every_reader_gives_the_same_class_subset(fx):
  """The same two classes through all five readers: the same images, labels 0..1 in sorted-wnid
  order (WNIDS[1] -> 0, WNIDS[2] -> 1), the other class gone."""
  expected = {name: sorted(WNIDS[1:]).index(WNIDS[label])
              for name, (label, _) in fx["expected_train"].items() if label in (1, 2)}
  cls, cache = fx["classes"], fx["cache"]
  readers = {
      "folder": imagenet.ImageNetFolder(fx["train_dir"], classes=cls),
      "tar": imagenet.IlsvrcTar(fx["train_tar"], cache_dir=cache, classes=cls),
      "tfds": tfds_source.TfdsSource("imagenet2012", split="train",
                                     data_dir=fx["tfds_array_record"], classes=cls,
                                     cache_dir=cache),
      "tfds_tfrecord": tfds_source.tfds_tfrecord_source(data_dir=fx["tfds_tfrecord"],
                                                        classes=cls, cache_dir=cache),
      "detcon": imagenet.detcon_tfrecord_source(fx["detcon_dir"], cache_dir=cache, classes=cls),
  }
  for name, reader in readers.items():
    assert reader.num_classes == 2, name
    assert _labelled(reader) == expected, name
  # Slice and subset together: the subset of the slice.
  sliced = tfds_source.tfds_tfrecord_source(split="train[:4]", data_dir=fx["tfds_tfrecord"],
                                            classes=cls, cache_dir=cache)
  first4 = _ids(tfds_source.tfds_tfrecord_source(split="train[:4]", data_dir=fx["tfds_tfrecord"],
                                                 cache_dir=cache))
  assert _ids(sliced) == [i for i in first4 if i in expected]


def test_validation_subset_and_missing_classes(fx, tmp_path):
  """Flat validation images with a labels file: the subset keeps the images of listed classes
  only (the fixture's validation classes are VAL_WNIDS)."""
  path = tmp_path / "one.txt"
  path.write_text(VAL_WNIDS[2] + "\n")
  val = imagenet.ImageNetFolder(fx["val_dir"], labels_file=fx["wnid_txt"], classes=str(path))
  assert [(r["id"], r["label"]) for r in (val[i] for i in range(len(val)))] == [
      (imagenet.val_file_name(2), 0)]
  absent = tmp_path / "absent.txt"
  absent.write_text("n15075141\n")  # a real synset with no training image here
  with pytest.raises(ValueError, match="selects no image"):
    imagenet.ImageNetFolder(fx["train_dir"], classes=str(absent))


def test_label_cache_is_reused(fx, monkeypatch):
  source = tfds_source.tfds_tfrecord_source(data_dir=fx["tfds_tfrecord"], cache_dir=fx["cache"])
  first = imagenet.tfrecord_labels(source, fx["cache"])
  monkeypatch.setattr(imagenet.tfrecord, "parse_example",
                      lambda data: (_ for _ in ()).throw(AssertionError("re-read")))
  np.testing.assert_array_equal(imagenet.tfrecord_labels(source, fx["cache"]), first)
  assert sorted(first.tolist()) == sorted(label for label, _ in fx["expected_train"].values())


def test_supervised_refuses_a_class_count_mismatch(fx):
  from ssl_jax.evaluate import supervised  # pylint: disable=import-outside-toplevel
  from tests.helpers import load_config  # pylint: disable=import-outside-toplevel
  config = load_config("linear_eval", "test")
  subset = imagenet.ImageNetFolder(fx["train_dir"], classes=fx["classes"])
  with pytest.raises(supervised.ConfigError, match="config.data.num_classes=10 .* 2 classes .*"
                                                   "num_classes=2"):
    supervised.make_data(config, subset, subset)
