"""Pictures a person reads: the decision picture's header, marks and colour bar, mask
outlines, and outcome labels."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps

from rdjax import outputs


def test_outline_is_the_masks_edge():
    mask = np.zeros((6, 6), bool)
    mask[1:4, 1:5] = True
    edge = outputs.outline(mask)
    inner = np.zeros((6, 6), bool)
    inner[2, 2:4] = True
    np.testing.assert_array_equal(edge, mask & ~inner)
    full = np.ones((4, 4), bool)
    assert not outputs.outline(full).any()  # the image border does not count as an edge


@pytest.mark.parametrize(
    "label,anomalous,want",
    [
        (1, True, "true positive"),
        (0, True, "false positive"),
        (0, False, "true negative"),
        (1, False, "false negative"),
        (0, None, "good"),
        (1, None, "defective"),
    ],
)
def test_outcome(label, anomalous, want):
    assert outputs.outcome(label, anomalous) == want


def test_decision_picture_shows_decision_peak_mask_and_scale():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    amap = np.zeros((64, 48), np.float32)
    amap[40, 10] = 2.0  # the peak
    mask = np.zeros((64, 48), bool)
    mask[5:15, 20:30] = True
    ng = outputs.decision_picture(image, amap, 0.0, 2.0, score=2.0, anomalous=True, normalized=0.9, mask=mask)
    ok = outputs.decision_picture(image, amap, 0.0, 2.0, score=2.0, anomalous=False, normalized=0.4)
    assert ng.shape == ok.shape and ng.dtype == np.uint8
    assert tuple(ng[1, -1]) == outputs.DECISION_COLOURS[True] and tuple(ok[1, -1]) == outputs.DECISION_COLOURS[False]
    header, scale = 2 * 16 + 6, 4  # 64 px is enlarged 4x to reach 256
    assert ng.shape[0] == header + 64 * scale
    # The mask's outline is white; the same pixel without a mask is the plain overlay.
    y, x = header + 5 * scale, 25 * scale
    assert tuple(ng[y, x]) == (255, 255, 255)
    plain = outputs.overlay(image, amap, 0.0, 2.0)[5, 25]
    assert tuple(ok[y, x]) == tuple(plain)
    # A white ring around the peak (radius 3 pixels of the map, at 4x).
    cy, cx, r = header + int(40.5 * scale), int(10.5 * scale), 3 * scale
    assert tuple(ng[cy - r, cx]) == (255, 255, 255)
    # The colour bar: the top of the scale (hi) at the top, lo at the bottom.
    bar_x = 48 * scale + 4 + 7
    top, bottom = ng[header, bar_x], ng[header + 64 * scale - 1, bar_x]
    np.testing.assert_allclose(top, np.asarray(colormaps["jet"](1.0)[:3]) * 255, atol=1)
    np.testing.assert_allclose(bottom, np.asarray(colormaps["jet"](0.0)[:3]) * 255, atol=1)
