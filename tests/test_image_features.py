"""The client's image-feature memo: one request may mix image sizes (real ScienceQA and
IconQA images come in every size); each image gets the encoder's features of itself."""

import pytest
import torch
from PIL import Image

from fednano.client.features import ImageFeatures
from fednano.client.vision import build_vision_encoder
from fednano.data.easyvqa import load_image, load_split


@pytest.fixture(scope="module")
def encoder():
    return build_vision_encoder({"type": "efficientnet-lite0"}, image_size=224, grid=3)


@pytest.fixture(scope="module")
def paths():
    return [s.image_path for s in load_split("train")[:2]]


def test_a_request_may_mix_image_sizes(encoder, paths, tmp_path):
    with Image.open(paths[0]) as im:
        im.convert("RGB").resize((100, 80)).save(tmp_path / "wide.png")
    wide = str(tmp_path / "wide.png")
    feats = ImageFeatures(encoder)([paths[1], wide, paths[1]])  # used to fail: "stack expects each tensor to be equal size"
    assert feats.shape == (3, 9, 1280) and torch.equal(feats[0], feats[2])
    assert torch.allclose(feats[1], encoder(load_image(wide).unsqueeze(0))[0], atol=1e-4)
    assert not torch.allclose(feats[0], feats[1], atol=1e-2)


def test_an_images_features_do_not_depend_on_what_it_was_encoded_with(encoder):
    """The client caches features per process, and which images a process encodes together
    depends on which clients it served before. With batched encoding, an image's features
    changed in the last bits with the batch (the kernels differ by batch size), and that was
    enough to make two runs with the same seed part ways (BENCHMARKS.md)."""
    paths = [s.image_path for s in load_split("train")[:17]]
    one_by_one = ImageFeatures(encoder)
    for p in paths:
        one_by_one([p])
    assert torch.equal(one_by_one(paths), ImageFeatures(encoder)(paths))
