"""RandAugment ops vs independent float64 references written from PIPELINE.md 2.6."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from visionmoe.data.ops import randaugment
from visionmoe.data.ops.randaugment import OPS, Layer, RandAugment, apply_op, sample_layers


def _image(h: int = 9, w: int = 11, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _apply(image: torch.Tensor, op: str, magnitude: float = 10, **kw) -> np.ndarray:
    layer = Layer(op, kw.pop("negate", False), kw.pop("centre", (0.5, 0.5)))
    out = apply_op(image, layer, RandAugment(magnitude=magnitude, **kw))
    assert out.dtype == torch.uint8 and out.shape == image.shape
    return out.numpy().astype(np.int64)


def _grey_ref(x: np.ndarray) -> np.ndarray:
    # tf.image.rgb_to_grayscale, rounded back to uint8 levels.
    return np.floor(x[..., 0] * 0.2989 + x[..., 1] * 0.5870 + x[..., 2] * 0.1140 + 0.5)[..., None]


def _blend_ref(a, b: np.ndarray, f: float) -> np.ndarray:
    return np.floor(np.clip(a + f * (b - a), 0, 255))


def _close_levels(got: np.ndarray, ref: np.ndarray) -> None:
    """Equal up to float32 rounding at level boundaries: off by at most 1, and rarely."""
    diff = np.abs(got - ref)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.97, (diff.max(), (diff == 0).mean())


def test_auto_contrast_equalize_invert():
    x = _image().numpy().astype(np.int64)
    x[..., 2] = 77  # a constant channel is left alone
    image = torch.from_numpy(x.astype(np.uint8))
    lo, hi = x.min(axis=(0, 1)), x.max(axis=(0, 1))
    ref = x.copy()
    for c in (0, 1):
        ref[..., c] = np.floor((x[..., c] - lo[c]) * 255 / (hi[c] - lo[c]))
    assert np.array_equal(_apply(image, "AutoContrast"), ref)
    assert np.array_equal(_apply(image, "Invert"), 255 - x)

    # Equalize needs >= 255 pixels below the top level for a non-zero step: repeat rows 30x.
    x_big = np.repeat(x, 30, 0)
    got = _apply(torch.from_numpy(x_big.astype(np.uint8)), "Equalize")
    ref_big = x_big.copy()
    for c in range(3):
        hist = np.bincount(x_big[..., c].ravel(), minlength=256)
        nonzero = hist[hist > 0]
        step = (nonzero.sum() - nonzero[-1]) // 255
        if step:
            # lut = (cumulative count below each level + step // 2) // step, clipped.
            lut = np.clip((np.cumsum(hist) - hist + step // 2) // step, 0, 255)
            ref_big[..., c] = lut[x_big[..., c]]
    assert np.array_equal(got, ref_big)
    # 99 pixels per channel: step = (99 - count of the top level) // 255 = 0, so unchanged.
    assert np.array_equal(_apply(image, "Equalize"), x)


@pytest.mark.parametrize("magnitude,bits", [(10, 4), (5, 2), (15, 6), (20, 8)])
def test_posterize_keeps_int_4_level_bits(magnitude, bits):
    x = _image().numpy().astype(np.int64)
    shift = 8 - bits
    assert np.array_equal(_apply(torch.from_numpy(x.astype(np.uint8)), "Posterize", magnitude),
                          (x >> shift) << shift)  # fmt: skip


def test_solarize_default_uses_threshold_as_is_and_quirk_wraps_mod_256():
    image = _image()
    x = image.numpy().astype(np.int64)
    # M=10: threshold 256 > every pixel -> unchanged; wrapped: 0 -> every pixel inverted.
    assert np.array_equal(_apply(image, "Solarize", 10), x)
    assert np.array_equal(_apply(image, "Solarize", 10, solarize_wraps=True), 255 - x)
    # M=15: 384 (unchanged) vs 384 mod 256 = 128 (the standard solarize at 128).
    assert np.array_equal(_apply(image, "Solarize", 15), x)
    ref = np.where(x < 128, x, 255 - x)
    assert np.array_equal(_apply(image, "Solarize", 15, solarize_wraps=True), ref)
    # M=5: threshold 128 either way.
    assert np.array_equal(_apply(image, "Solarize", 5), ref)
    assert np.array_equal(_apply(image, "Solarize", 20, solarize_wraps=True), 255 - x)


def test_solarize_add():
    image = _image()
    x = image.numpy().astype(np.int64)
    # int(110 * 1.0) = 110 added below 128, clipped at 255.
    ref = np.where(x < 128, np.minimum(x + 110, 255), x)
    assert np.array_equal(_apply(image, "SolarizeAdd", 10), ref)


@pytest.mark.parametrize("magnitude", [10, 15])
def test_enhance_ops_blend_with_factor_1_8_level_plus_0_1(magnitude):
    image = _image(12, 14)
    x = image.numpy().astype(np.float64)
    f = 1.8 * magnitude / 10 + 0.1  # 1.9 at M=10, 2.8 at M=15
    _close_levels(_apply(image, "Brightness", magnitude), _blend_ref(0.0, x, f))
    _close_levels(_apply(image, "Color", magnitude), _blend_ref(_grey_ref(x), x, f))
    mean_grey = math.floor(_grey_ref(x).mean() + 0.5)
    _close_levels(_apply(image, "Contrast", magnitude), _blend_ref(mean_grey, x, f))
    smooth = x.copy()
    kernel = np.ones((3, 3))
    kernel[1, 1] = 5
    for i in range(1, x.shape[0] - 1):
        for j in range(1, x.shape[1] - 1):
            window = x[i - 1 : i + 2, j - 1 : j + 2]
            smooth[i, j] = np.floor((window * kernel[..., None]).sum((0, 1)) / 13)
    _close_levels(_apply(image, "Sharpness", magnitude), _blend_ref(smooth, x, f))


def test_contrast_pixel_count_quirk_blends_toward_196_at_224():
    image = _image(224, 224)
    x = image.numpy().astype(np.float64)
    # 224 * 224 / 256 = 196 (the pixel count, not the mean grey).
    got = _apply(image, "Contrast", 10, contrast_pixel_count=True)
    _close_levels(got, _blend_ref(196.0, x, 1.9))


def _warp_ref(x: np.ndarray, src) -> np.ndarray:
    """out[y, x] = x[round(src_y), round(src_x)] (half away from zero), 128 outside."""
    h, w, _ = x.shape
    out = np.full_like(x, 128)
    for i in range(h):
        for j in range(w):
            sy, sx = src(i, j)
            yi = int(math.copysign(math.floor(abs(sy) + 0.5), sy))
            xi = int(math.copysign(math.floor(abs(sx) + 0.5), sx))
            if 0 <= yi < h and 0 <= xi < w:
                out[i, j] = x[yi, xi]
    return out


@pytest.mark.parametrize("negate", [False, True])
def test_geometric_ops_against_pixel_loop_reference(negate):
    image = _image(7, 9)
    x = image.numpy().astype(np.int64)
    s = -1.0 if negate else 1.0
    # ShearX / ShearY: x_in = x + 0.3 * level * y at M=10, origin top-left.
    ref = _warp_ref(x, lambda i, j: (i, j + s * 0.3 * i))
    assert np.array_equal(_apply(image, "ShearX", 10, negate=negate), ref)
    ref = _warp_ref(x, lambda i, j: (i + s * 0.3 * j, j))
    assert np.array_equal(_apply(image, "ShearY", 10, negate=negate), ref)
    # Translate 100 * level pixels: M=0.3 -> 3 px.
    ref = _warp_ref(x, lambda i, j: (i, j + s * 3))
    assert np.array_equal(_apply(image, "TranslateX", 0.3, negate=negate), ref)
    ref = _warp_ref(x, lambda i, j: (i + s * 3, j))
    assert np.array_equal(_apply(image, "TranslateY", 0.3, negate=negate), ref)
    assert np.all(_apply(image, "TranslateX", 10, negate=negate) == 128)  # 100 px > 9 px
    # A non-integer shift (M=0.36: 3.6 px) goes through the per-pixel nearest lookup.
    ref = _warp_ref(x, lambda i, j: (i, j + s * 3.6))
    assert np.array_equal(_apply(image, "TranslateX", 0.36, negate=negate), ref)
    wide = _image(5, 130)
    ref = _warp_ref(wide.numpy().astype(np.int64), lambda i, j: (i, j + s * 100))
    assert np.array_equal(_apply(wide, "TranslateX", 10, negate=negate), ref)
    # Rotate 30 * level degrees about the centre ((H-1)/2, (W-1)/2).
    t = math.radians(s * 30)
    cy, cx = 3.0, 4.0

    def rotate(i, j):
        return (
            math.sin(t) * (j - cx) + math.cos(t) * (i - cy) + cy,
            math.cos(t) * (j - cx) - math.sin(t) * (i - cy) + cx,
        )

    assert np.array_equal(_apply(image, "Rotate", 10, negate=negate), _warp_ref(x, rotate))


def test_cutout_square_of_half_side_40_level_clipped():
    image = _image(10, 12)
    x = image.numpy().astype(np.int64)
    # M=0.5: half side int(40 * 0.05) = 2; centre (int(0.25*10), int(0.95*12)) = (2, 11).
    ref = x.copy()
    ref[0:4, 9:12] = 128
    assert np.array_equal(_apply(image, "Cutout", 0.5, centre=(0.25, 0.95)), ref)


def test_randaugment_applies_exactly_num_layers_uniform_ops():
    config = RandAugment(num_layers=3, magnitude=10)
    g = torch.Generator().manual_seed(0)
    counts = dict.fromkeys(OPS, 0)
    for _ in range(800):
        layers = sample_layers(config, g)
        assert len(layers) == 3
        for layer in layers:
            counts[layer.op] += 1
    assert len(OPS) == 16 and "Identity" not in OPS
    # 2400 draws over 16 ops: expected 150 each; chi-square with 15 dof, 99.9 % point is 37.7.
    chi2 = sum((c - 150) ** 2 / 150 for c in counts.values())
    assert chi2 < 37.7, counts

    image = _image(16, 16)
    out = randaugment(image, torch.Generator().manual_seed(7), config)
    layers = sample_layers(config, torch.Generator().manual_seed(7))
    expected = image
    for layer in layers:
        expected = apply_op(expected, layer, config)
    assert torch.equal(out, expected)
    assert torch.equal(randaugment(image, torch.Generator().manual_seed(7), config), out)
    none = RandAugment(num_layers=0)
    assert torch.equal(randaugment(image, torch.Generator().manual_seed(7), none), image)


def test_randaugment_config_validation():
    with pytest.raises(ValueError, match="num_layers"):
        RandAugment(num_layers=-1)
    with pytest.raises(ValueError, match="magnitude"):
        RandAugment(magnitude=-2)
    with pytest.raises(ValueError, match="uint8"):
        randaugment(torch.zeros(4, 4, 3), torch.Generator(), RandAugment())
