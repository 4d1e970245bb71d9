"""to_model_input normalisation/resizing and augment's crop/flip semantics and determinism."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from visionmoe.data import augment, to_model_input


def test_to_model_input_range_shape_and_exact_values():
    images = np.array([0, 127, 255, 64], dtype=np.uint8).reshape(1, 2, 2, 1)
    out = to_model_input(images, image_size=2, channels=1)
    assert out.dtype == torch.float32 and out.shape == (1, 1, 2, 2)
    expected = torch.tensor([[0, 127], [255, 64]], dtype=torch.float32) / 127.5 - 1
    torch.testing.assert_close(out[0, 0], expected)
    assert out.min() == -1.0 and out.max() == 1.0


def test_to_model_input_resize_and_channel_conversion():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    out = to_model_input(grey, image_size=16, channels=3)
    assert out.shape == (3, 3, 16, 16) and out.is_contiguous()
    assert out.min() >= -1.0 and out.max() <= 1.0
    torch.testing.assert_close(out[:, 0], out[:, 2])
    down = to_model_input(grey, image_size=4, channels=1)
    assert down.shape == (3, 1, 4, 4)
    # Antialiased 2x downscale of a constant image stays constant.
    flat = np.full((1, 8, 8, 1), 200, np.uint8)
    torch.testing.assert_close(
        to_model_input(flat, 4, 1), torch.full((1, 1, 4, 4), 200 / 127.5 - 1)
    )

    rgb = rng.integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    mono = to_model_input(torch.from_numpy(rgb), image_size=5, channels=1)
    expected = torch.from_numpy(rgb).float().mean(dim=3)[:, None] / 127.5 - 1
    torch.testing.assert_close(mono, expected)
    same = to_model_input(rgb, image_size=5, channels=3)
    torch.testing.assert_close(same, torch.from_numpy(rgb).permute(0, 3, 1, 2) / 127.5 - 1)


def test_to_model_input_read_only_array_does_not_warn():
    images = np.zeros((1, 4, 4, 1), np.uint8)
    images.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert to_model_input(images, 4, 3).shape == (1, 3, 4, 4)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((1, 4, 4, 1), np.float32),
        np.zeros((4, 4, 1), np.uint8),
        np.zeros((1, 4, 4, 2), np.uint8),
    ],
)
def test_to_model_input_rejects_bad_input(bad: np.ndarray):
    with pytest.raises(ValueError):
        to_model_input(bad, 4, 1)


def test_to_model_input_rejects_bad_channels():
    with pytest.raises(ValueError):
        to_model_input(np.zeros((1, 4, 4, 1), np.uint8), 4, 2)


def batch(n: int = 16, c: int = 2, h: int = 6, w: int = 7) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(123))


def test_augment_identity_when_disabled():
    x = batch()
    assert augment(x, torch.Generator().manual_seed(0)) is x


def test_augment_is_deterministic_given_generator():
    x = batch()
    a = augment(x, torch.Generator().manual_seed(7), crop_padding=2, hflip=True)
    b = augment(x, torch.Generator().manual_seed(7), crop_padding=2, hflip=True)
    c = augment(x, torch.Generator().manual_seed(8), crop_padding=2, hflip=True)
    assert a.shape == x.shape and a.dtype == x.dtype
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(("pad_mode", "torch_mode"), [("zero", "constant"), ("edge", "replicate")])
def test_augment_outputs_are_padded_crops_or_their_flips(pad_mode: str, torch_mode: str):
    p = 2
    x = batch()
    out = augment(
        x, torch.Generator().manual_seed(1), crop_padding=p, hflip=True, pad_mode=pad_mode
    )
    padded = F.pad(x, (p, p, p, p), mode=torch_mode)
    h, w = x.shape[2:]
    used_offsets, used_flips = set(), set()
    for i in range(len(x)):
        matches = [
            (dy, dx, flip)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            for flip in (False, True)
            if torch.equal(
                out[i],
                (lambda crop, f: crop.flip(-1) if f else crop)(
                    padded[i, :, dy : dy + h, dx : dx + w], flip
                ),
            )
        ]
        assert len(matches) == 1, f"image {i} is not a unique padded crop"
        used_offsets.add(matches[0][:2])
        used_flips.add(matches[0][2])
    assert len(used_offsets) > 1 and used_flips == {False, True}  # really random per image


def test_augment_flip_only_and_uint8():
    x = torch.randint(0, 256, (32, 1, 3, 4), dtype=torch.uint8)
    out = augment(x, torch.Generator().manual_seed(3), hflip=True)
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x, strict=True)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x, strict=True)])
    assert bool((flipped | kept).all()) and flipped.any() and kept.any()
    assert out.dtype == torch.uint8


def test_augment_rejects_bad_arguments():
    with pytest.raises(ValueError):
        augment(torch.zeros(2, 3, 4), torch.Generator(), crop_padding=1)
    with pytest.raises(ValueError):
        augment(batch(), torch.Generator(), crop_padding=-1)
    with pytest.raises(ValueError):
        augment(batch(), torch.Generator(), crop_padding=1, pad_mode="reflect")
