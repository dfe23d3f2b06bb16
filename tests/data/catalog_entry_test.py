"""Catalogue entries: what a trainer reads of a dataset instead of knowing it by name."""
import numpy as np
import pytest

from lowrank_jax import data


@pytest.mark.parametrize("name,max_pixel", [("digits", 16), ("fashion_mnist", 255)])
def test_image_scale_maps_the_stored_pixels_to_unit_range(name, max_pixel, request):
  if name == "fashion_mnist":
    request.getfixturevalue("fashion")
  entry = data.dataset_entry(name)
  assert (entry.modality, entry.input_key) == ("image", "image")
  src = data.load(name, "test[:200]")
  assert max(int(src[i]["image"].max()) for i in range(len(src))) == max_pixel
  out = data.example_transform(name)(src[0])
  np.testing.assert_allclose(out["image"], src[0]["image"].astype(np.float64) / max_pixel,
                             rtol=1e-6)
  assert out["image"].dtype == np.float32 and out["label"] == src[0]["label"]


def test_text_entry():
  entry = data.dataset_entry("wordnet_supersense")
  assert (entry.modality, entry.input_key) == ("text", "gloss")
  assert entry.splits == ("train", "validation", "test")
  with pytest.raises(ValueError, match="dataset 'wordnet_supersense' is text; use a text model"):
    data.example_transform("wordnet_supersense")


@pytest.mark.parametrize("name,modality,key", [("mnist", "image", "image"),
                                               ("tfds:mnist", "image", "image"),
                                               ("imdb_reviews", "text", "text")])
def test_standard_tfds_names_are_described_from_their_features(name, modality, key, tmp_path):
  entry = data.dataset_entry(name, tmp_path)   # nothing is downloaded
  assert (entry.modality, entry.input_key, entry.label_key) == (modality, key, "label")


def test_standard_tfds_num_classes(tmp_path):
  assert data.num_classes("mnist", tmp_path) == 10


def test_unknown_name_is_the_error_load_gives():
  with pytest.raises(ValueError, match=r"Unknown dataset 'mnistt'; valid names: \[.*'digits'"):
    data.dataset_entry("mnistt")
