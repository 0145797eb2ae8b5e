"""Anomaly maps against an independent numpy/scipy/torch reference of the official
test.py (float64). Tolerance 1e-5 of the largest map value: the map is float32 cosines
of 8-32-channel vectors (rounding ~1e-7 relative) passed through two linear filters at
HIGHEST precision whose rows sum to 1, so rounding stays near 1e-6 on any CPU."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from rdjax.data import normalize
from rdjax.scoring import maps


def reference_map(teacher, student, size, mode):
    """Per image, as the official cal_anomaly_map + gaussian_filter(sigma=4), in float64."""
    out = []
    for b in range(teacher[0].shape[0]):
        total = np.ones(size) if mode == "mul" else np.zeros(size)
        for t, s in zip(teacher, student):
            t64, s64 = t[b].astype(np.float64), s[b].astype(np.float64)
            cos = np.sum(t64 * s64, -1) / np.maximum(np.linalg.norm(t64, axis=-1) * np.linalg.norm(s64, axis=-1), 1e-8)
            dist = torch.from_numpy(1 - cos)[None, None]
            up = torch.nn.functional.interpolate(dist, size=size, mode="bilinear", align_corners=True)[0, 0].numpy()
            total = total * up if mode == "mul" else total + up
        out.append(gaussian_filter(total, sigma=4))
    return np.stack(out)


@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("size", [(64, 64), (96, 64), (32, 32)])
def test_map_matches_scipy_reference(mode, size):
    rng = np.random.default_rng(0)
    h, w = size
    shapes = [(2, h // 4, w // 4, 8), (2, h // 8, w // 8, 16), (2, h // 16, w // 16, 32)]
    teacher = [rng.normal(size=s).astype(np.float32) for s in shapes]
    student = [t + rng.normal(scale=0.8, size=t.shape).astype(np.float32) for t in teacher]
    ours = np.asarray(maps.anomaly_map(tuple(map(jnp.asarray, teacher)), tuple(map(jnp.asarray, student)), size, mode))
    want = reference_map(teacher, student, size, mode)
    assert ours.shape == want.shape
    assert np.max(np.abs(ours - want)) / np.max(np.abs(want)) < 1e-5


@pytest.mark.parametrize("size", [5, 17, 40, 256])
def test_blur_matrix_equals_scipy_reflect(size):
    """Including sizes below the kernel radius, where the reflection folds several times.
    rtol 1e-5: the matrix is stored in float32 (weights rounded to 2^-24 relative) and
    each output is a 33-tap weighted mean; the rest is float64."""
    x = np.random.default_rng(1).normal(size=(size, 7))
    ours = maps.blur_matrix(size, 4.0).astype(np.float64) @ x
    want = gaussian_filter(x, sigma=(4, 0))  # axis 0 only, scipy defaults: truncate 4, 'reflect'
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_normalize_is_imagenet():
    """1e-6: one float32 subtraction and division of values below 3 (rounding ~2e-7)."""
    x = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    want = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(np.asarray(normalize.normalize(jnp.asarray(x))), want, rtol=1e-6, atol=1e-6)


def top_ratio_reference(amaps: np.ndarray, max_ratio: float) -> np.ndarray:
    """Dinomaly's rule by hand, in float64: the mean of the int(H * W * r) largest pixels
    of each map (at least one), by np.sort."""
    flat = amaps.reshape(len(amaps), -1).astype(np.float64)
    k = max(1, int(flat.shape[1] * max_ratio))
    return np.sort(flat, axis=1)[:, ::-1][:, :k].mean(axis=1)


@pytest.mark.parametrize("max_ratio", [0.01, 0.1, 0.37, 1.0])
def test_image_scores_are_the_top_ratio_mean(max_ratio):
    """Maps of multiples of 1/8 in [0, 2] (ties everywhere, the top value on several
    pixels): every sum of at most 17 * 23 such values is exact in float32, and jnp.mean
    multiplies it by a rounded 1 / k: two roundings of at most 2^-24 relative each, so
    rtol 2^-23 against the float64 reference. Eager on a host array and jitted agree bit
    for bit (one program, one order)."""
    import jax

    amaps = (np.random.default_rng(2).integers(0, 17, size=(3, 17, 23)) / 8).astype(np.float32)
    ours = np.asarray(maps.image_scores(amaps, max_ratio))
    np.testing.assert_allclose(ours, top_ratio_reference(amaps, max_ratio), rtol=2.0**-23)
    jitted = jax.jit(maps.image_scores, static_argnums=1)(jnp.asarray(amaps), max_ratio)
    np.testing.assert_array_equal(np.asarray(jitted), ours)


def test_image_scores_count_and_the_max():
    """r = 0 is the maximum, exactly; k is int(H * W * r) with Python's float product,
    truncated (100 * 0.29 = 28.999999999999996 -> 28: the top 28 of 0..99, mean 85.5,
    where k = 29 would give 85; rel 2^-23: the sum of integers is exact, then two
    roundings as above); a ratio too small for one pixel takes the maximum."""
    amaps = np.random.default_rng(3).normal(size=(4, 9, 7)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(maps.image_scores(amaps)), amaps.max(axis=(1, 2)))
    ramp = np.arange(100, dtype=np.float32).reshape(1, 10, 10)
    assert float(maps.image_scores(ramp, 0.29)[0]) == pytest.approx(85.5, rel=2.0**-23)
    np.testing.assert_array_equal(np.asarray(maps.image_scores(amaps, 0.01)), amaps.max(axis=(1, 2)))
    with pytest.raises(ValueError, match="max_ratio=1.5"):
        maps.image_scores(amaps, 1.5)


@pytest.mark.parametrize(("out", "inp"), [(256, 392), (256, 112), (64, 64)])
def test_dinomaly_map_resize_blur_and_masks_equal_torch(out, inp):
    """Dinomaly's evaluation recipe against torch's own ops, float64: a 28 x 28 distance map
    upsampled (align_corners=True) to the input size, then resized to the map size
    (bilinear, align_corners=False: down from 392 as the official 392 px inputs, up from
    112, and no resize), then the 5 x 5 Gaussian (sigma 4) by a zero-padded conv2d; the
    masks by 'nearest'. The matrices are formed in float64 and stored in float32, so 1e-6
    relative (float32 rounding of the weights) bounds the map; the masks are exact."""
    rng = np.random.default_rng(out + inp)
    dist = rng.random((2, 28, 28))
    want = torch.nn.functional.interpolate(torch.tensor(dist)[:, None], size=inp, mode="bilinear", align_corners=True)
    if out != inp:
        want = torch.nn.functional.interpolate(want, size=out, mode="bilinear", align_corners=False)
    g = np.arange(5) - 2.0
    kernel = np.exp(-(g[:, None] ** 2 + g[None, :] ** 2) / (2 * 16.0))
    want = torch.nn.functional.conv2d(want, torch.tensor(kernel / kernel.sum())[None, None], padding=2)[:, 0]
    rows = maps.scale_matrix(out, inp, 28).astype(np.float64)
    blur = maps.kernel_blur_matrix(out, 5, 4.0).astype(np.float64)
    ours = blur @ (rows @ dist @ rows.T) @ blur.T
    assert np.max(np.abs(ours - want.numpy())) / np.max(np.abs(want.numpy())) < 1e-6
    masks = rng.random((2, inp, inp)) > 0.7
    nearest = torch.nn.functional.interpolate(
        torch.tensor(masks, dtype=torch.float64)[:, None], size=out, mode="nearest"
    )
    np.testing.assert_array_equal(maps.map_masks(masks, out), nearest[:, 0].numpy() > 0)
