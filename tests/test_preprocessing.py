"""The handler's Compose, built from archive metadata, equals each weights' own transforms()."""

import pytest
import torch
from PIL import Image
from torchvision.models import get_model_weights

from conftest import PHOTOS
from handlers.preprocessing import build_transform
from tvserve.archiving.zoo import classification_models, preset_of


def make_images():
    """Real photos plus synthetic ones of awkward sizes and aspect ratios."""
    images = [Image.open(path).convert("RGB") for path in PHOTOS]
    generator = torch.Generator().manual_seed(0)
    for width, height in [(97, 333), (1001, 250), (224, 224)]:
        pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
        images.append(Image.fromarray(pixels.numpy()))
    return images


IMAGES = make_images()
ALL_WEIGHTS = [weights for name in classification_models() for weights in get_model_weights(name)]


@pytest.mark.parametrize("weights", ALL_WEIGHTS, ids=str)
def test_preset_compose_matches_weights_transforms(weights):
    ours, theirs = build_transform(preset_of(weights)), weights.transforms()
    for image in IMAGES:
        expected = theirs(image)
        actual = ours(image)
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_zoo_is_complete():
    assert len(classification_models()) >= 80
    assert {"inception_v3", "efficientnet_b0", "vit_b_16", "mobilenet_v3_small"} <= set(classification_models())
