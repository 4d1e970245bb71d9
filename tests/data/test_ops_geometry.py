"""Decode, inception crop, resize, resize_small, central_crop, flip, value_range vs PIPELINE.md 2.

References are float64 numpy written from the spec's formulas, not from the code under test.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from visionmoe.data.ops import (
    CentralCrop,
    FlipLR,
    InceptionCrop,
    Resize,
    ResizeSmall,
    Transform,
    central_crop,
    decode,
    eval_ops,
    flip_lr,
    resize,
    resize_small,
    sample_inception_box,
    value_range,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image(h: int, w: int, c: int = 3, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (h, w, c), dtype=np.uint8))


def _bilinear_half_pixel_ref(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF2 bilinear, half-pixel centres, no antialias: src = (i + 0.5) * in / out - 0.5."""

    def axis_weights(n_in: int, n_out: int) -> np.ndarray:
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            src = (i + 0.5) * n_in / n_out - 0.5
            lo = math.floor(src)
            frac = src - lo
            m[i, min(max(lo, 0), n_in - 1)] += 1 - frac
            m[i, min(max(lo + 1, 0), n_in - 1)] += frac
        return m

    mh, mw = axis_weights(x.shape[0], out_h), axis_weights(x.shape[1], out_w)
    return np.einsum("ih,hwc,jw->ijc", mh, x.astype(np.float64), mw, optimize=True)


def _area_ref(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Exact fractional-coverage box averaging via overlap-length matrices."""

    def coverage(n_in: int, n_out: int) -> np.ndarray:
        s = n_in / n_out
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            a, b = i * s, (i + 1) * s
            for k in range(n_in):
                m[i, k] = max(0.0, min(b, k + 1) - max(a, k)) / s
        return m

    return np.einsum(
        "ih,hwc,jw->ijc", coverage(x.shape[0], out_h), x.astype(np.float64),
        coverage(x.shape[1], out_w), optimize=True,
    )  # fmt: skip


@pytest.mark.parametrize("shape,size", [((37, 53), (24, 24)), ((16, 20), (40, 31)), ((9, 9), 9)])
def test_resize_is_half_pixel_bilinear_truncated(shape, size):
    image = _image(*shape)
    out = resize(image, size)
    oh, ow = (size, size) if isinstance(size, int) else size
    assert out.shape == (oh, ow, 3) and out.dtype == torch.uint8
    ref = _bilinear_half_pixel_ref(image.numpy(), oh, ow)
    # uint8 output is floor(ref), allowing float32 rounding right at an integer.
    got = out.numpy().astype(np.int64)
    assert np.all((got == np.floor(ref - 1e-3)) | (got == np.floor(ref + 1e-3)))
    out_f = resize(image.float(), size)
    assert out_f.dtype == torch.float32
    np.testing.assert_allclose(out_f.numpy(), ref, atol=2e-3)


def test_resize_small_is_exact_area_average_with_float32_out():
    image = _image(30, 47)
    out = resize_small(image, 12)
    # factor 12/30 = 0.4; 47 * 0.4 = 18.8 -> 19.
    assert out.shape == (12, 19, 3) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _area_ref(image.numpy(), 12, 19), atol=1e-3)
    up = resize_small(_image(5, 7), 8)  # upscaling: 7 * 8/5 = 11.2 -> 11
    np.testing.assert_allclose(up.numpy(), _area_ref(_image(5, 7).numpy(), 8, 11), atol=1e-3)


def test_resize_small_rounds_half_to_even():
    # 10 * (1/4) = 2.5 -> 2 (half to even) and 14 * (1/4) = 3.5 -> 4.
    assert resize_small(_image(4, 10), 1).shape == (1, 2, 3)
    assert resize_small(_image(4, 14), 1).shape == (1, 4, 3)
    assert resize_small(_image(10, 4), 1).shape == (2, 1, 3)
    # A constant image stays exactly constant.
    flat = torch.full((33, 50, 3), 77, dtype=torch.uint8)
    assert torch.all(resize_small(flat, 20) == 77)


def test_central_crop_offsets_round_down():
    image = torch.arange(5 * 8).reshape(5, 8, 1).to(torch.uint8)
    out = central_crop(image, 2)
    # top = (5 - 2) // 2 = 1, left = (8 - 2) // 2 = 3: rows 1-2, columns 3-4.
    assert out[..., 0].tolist() == [[11, 12], [19, 20]]
    with pytest.raises(ValueError, match="larger than the image"):
        central_crop(image, 6)


def test_eval_ops_resize_small_then_crop_and_plain_resize():
    image = _image(300, 400)
    out = Transform(ops=eval_ops(224, resize_small=256))(image, _gen(0))
    assert out.shape == (224, 224, 3) and out.dtype == torch.uint8
    small = _area_ref(image.numpy(), 256, 341)  # 400 * 256/300 = 341.33 -> 341
    # (256-224)//2 = 16, (341-224)//2 = 58; rounded to nearest level at the end.
    expected = np.rint(small[16:240, 58:282])
    assert np.abs(out.numpy() - expected).max() <= 1
    assert np.mean(out.numpy() == expected) > 0.999
    assert eval_ops(384) == (Resize(size=384),)
    assert eval_ops(224, 256) == (ResizeSmall(size=256), CentralCrop(size=224))
    with pytest.raises(ValueError, match="resize_small"):
        eval_ops(224, 200)


def test_flip_lr_mirrors_about_half_the_time():
    image = _image(4, 6)
    flipped = sum(
        not torch.equal(flip_lr(image, _gen(seed)), image) for seed in range(400)
    )  # fmt: skip
    assert 160 < flipped < 240  # Binomial(400, 0.5): mean 200, sd 10
    out = FlipLR(p=1.0)(image, _gen(0))
    assert torch.equal(out, torch.from_numpy(image.numpy()[:, ::-1].copy()))
    assert torch.equal(FlipLR(p=0.0)(image, _gen(0)), image)


def test_value_range_maps_0_255_to_minus1_1():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    # -1 + 2 * 51 / 255 = -0.6
    torch.testing.assert_close(value_range(x), torch.tensor([-1.0, -0.6, 1.0]))


def test_inception_box_area_aspect_and_offset_bounds_over_many_draws():
    height, width = 120, 200
    g = _gen(0)
    areas, aspects = [], []
    for _ in range(3000):
        top, left, h, w = sample_inception_box(height, width, g)
        assert 0 < h <= height and 0 < w <= width
        # Offsets are UniformInt[0, H - h - 1] (exclusive bound) when the crop is smaller.
        assert 0 <= top <= max(height - h - 1, 0) and 0 <= left <= max(width - w - 1, 0)
        areas.append(h * w / (height * width))
        aspects.append(w / h)
    areas, aspects = np.array(areas), np.array(aspects)
    assert areas.min() >= 0.05 and areas.max() <= 1.0
    # w = rint(h * ar) with ar in [0.75, 1.33]: w/h is within 0.5/h of that range.
    assert aspects.min() >= 0.75 - 0.5 / 25 and aspects.max() <= 1.33 + 0.5 / 25
    assert areas.min() < 0.08 and areas.max() > 0.6  # the whole range is reached
    assert aspects.min() < 0.8 and aspects.max() > 1.25


def test_inception_box_height_is_integer_uniform_not_area_uniform():
    # Square aspect on 100x100: h_min = rint(sqrt(500)) = 22, h_max = 100, h ~ U{22..100};
    # h = 22 gives area 484 < 500 and is retried as 23. Expected mean height:
    # (sum(22..100) + 1) / 79 = (4819 + 1) / 79 = 61.01; area-uniform would give ~69.
    g = _gen(1)
    heights = []
    for _ in range(4000):
        _, _, h, w = sample_inception_box(100, 100, g, aspect_range=(1.0, 1.0))
        assert h == w and 23 <= h <= 100
        heights.append(h)
    assert abs(np.mean(heights) - 4820 / 79) < 1.0  # sd of the mean ~ 22.8 / sqrt(4000) = 0.36


def test_inception_box_falls_back_to_the_whole_image():
    # A 2x200 strip cannot hold any crop with aspect <= 1.33 and >= 50 % of its area.
    box = sample_inception_box(2, 200, _gen(0), area_range=(0.5, 1.0))
    assert box == (0, 0, 2, 200)


def _jpeg(h: int, w: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:h, 0:w]
    smooth = np.stack([ys * 255 // h, xs * 255 // w, (ys + xs) * 127 // (h + w)], -1)
    noise = rng.integers(0, 8, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray((smooth + noise).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_transform_on_jpeg_bytes_matches_decode_then_crop_and_is_deterministic():
    data = _jpeg(90, 130)
    crop = InceptionCrop(size=32)
    transform = Transform(ops=(crop, FlipLR()))
    a = transform(data, _gen(5))
    assert a.shape == (32, 32, 3) and a.dtype == torch.uint8 and a.is_contiguous()
    # Same seed, decoded array input: the same box and flip draws give the same pixels.
    decoded = decode(data)
    assert decoded.shape == (90, 130, 3)
    assert torch.equal(Transform(ops=(crop, FlipLR()))(decoded.numpy(), _gen(5)), a)
    assert torch.equal(transform(data, _gen(5)), a)
    assert not torch.equal(transform(data, _gen(6)), a)


def test_op_configs_reject_bad_values():
    with pytest.raises(ValueError, match="InceptionCrop.size"):
        InceptionCrop(size=0)
    with pytest.raises(ValueError, match="area range"):
        InceptionCrop(size=8, area_min=0.5, area_max=0.2)
    with pytest.raises(ValueError, match="FlipLR.p"):
        FlipLR(p=1.5)
    with pytest.raises(ValueError, match="Transform ops"):
        Transform(ops=("resize",))
    with pytest.raises(ValueError, match="uint8"):
        Transform(ops=())(np.zeros((4, 4, 3), np.float32), _gen(0))
