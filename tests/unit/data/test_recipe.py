"""The input recipe (rdjax.data.preprocess.Recipe) against OpenCV and torchvision, how old
and new configs read it (rdjax.config), and the centre crop undone on maps (rdjax.scoring.tiling)."""

import json
import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from rdjax import config as rdconfig
from rdjax.data import preprocess
from rdjax.data.preprocess import Recipe
from rdjax.errors import ConfigError
from rdjax.models.rd4ad import RD4AD
from rdjax.models.rdpp import RDPP
from rdjax.runtime import workdir as workdir_lib
from rdjax.scoring import tiling

# (height, width) of a source image. Both sides >= 2 px: with a 1 px side OpenCV takes
# another path (float32 weights), which resize_cv2 does not claim to follow.
LARGER = [(1024, 1024), (700, 700)]
SMALLER = [(60, 100), (47, 31)]
ODD = [(257, 333), (99, 101), (3, 2)]

# (source (h, w), target (w, h)) for resize_cv2, larger, smaller, odd, non-square.
CV2_CASES = [
    ((1024, 1024), (256, 256)),
    ((700, 700), (256, 256)),
    ((1024, 1024), (392, 392)),
    ((60, 100), (256, 256)),
    ((47, 31), (392, 392)),
    ((257, 333), (100, 37)),
    ((1100, 900), (999, 512)),
    ((99, 101), (255, 17)),
    ((2, 3), (7, 5)),
]


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _to_hwc(tensor):
    return tensor.permute(1, 2, 0).numpy()


@pytest.fixture
def opencv_ipp():
    """OpenCV's IPP setting, restored after the test."""
    before = cv2.ipp.useIPP()
    yield
    cv2.ipp.setUseIPP(before)


@pytest.mark.parametrize("source,target", CV2_CASES)
def test_resize_cv2_matches_opencv(source, target, opencv_ipp):
    """OpenCV resizes a float64 image by one of two paths. With IPP (its x86 wheels, which
    RD++'s official code ran on) it forms the convex combination in float64 with float64
    weights, as resize_cv2 does: both round once to float32, and a different order of the
    float64 operations can move that rounding by at most one float32 ulp, 2**-24 below 1
    (values are <= 1), so 2**-23 bounds it on any CPU (measured: 0 on these sizes).
    Without IPP (ARM wheels, or IPP off) OpenCV rounds each source coordinate to float32:
    a weight moves by at most half an ulp of the coordinate, 2**-24 * 2**ceil(log2(side)),
    and the output, a convex combination of [0, 1] values along each of two axes, by at
    most twice that, plus the same 2**-23."""
    img = _image(*source)
    got = preprocess.resize_cv2(img, *target)
    assert got.dtype == np.float32 and got.shape == (target[1], target[0], 3)
    if cv2.ipp.useIPP():
        np.testing.assert_allclose(got, cv2.resize(img / 255.0, target).astype(np.float32), rtol=0, atol=2**-23)
    cv2.ipp.setUseIPP(False)
    generic = 2 * 2**-24 * 2 ** math.ceil(math.log2(max(source))) + 2**-23
    np.testing.assert_allclose(got, cv2.resize(img / 255.0, target).astype(np.float32), rtol=0, atol=generic)


@pytest.mark.parametrize("source", LARGER + SMALLER + ODD + [(333, 257)])
@pytest.mark.parametrize("size", [256, 392, 31])
def test_pil_recipe_matches_torchvision(source, size):
    img = _image(*source, seed=size)
    got = Recipe("pil_bilinear", size=size).image(img)
    reference = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    want = _to_hwc(reference(Image.fromarray(img)))
    assert got.dtype == np.uint8 and got.shape == (size, size, 3)
    np.testing.assert_array_equal(got.astype(np.float32) / 255.0, want)


@pytest.mark.parametrize("source", [(1024, 1024), (300, 200), (257, 333)])
def test_pil_recipe_centre_crop_matches_torchvision(source):
    img = _image(*source, seed=1)
    got = Recipe("pil_bilinear", size=392, resize=448).image(img)
    reference = transforms.Compose([transforms.Resize((448, 448)), transforms.CenterCrop(392), transforms.ToTensor()])
    want = _to_hwc(reference(Image.fromarray(img)))
    assert got.shape == (392, 392, 3)
    np.testing.assert_array_equal(got.astype(np.float32) / 255.0, want)


@pytest.mark.parametrize("size,resize", [(256, 256), (224, 256), (392, 448), (31, 40), (30, 41)])
@pytest.mark.parametrize("source", [(700, 700), (257, 333)])
def test_cv2_recipe_centre_crop_matches_opencv_and_torchvision(source, size, resize):
    img = _image(*source, seed=2)
    got = Recipe("cv2_bilinear", size=size, resize=resize).image(img)
    resized = cv2.resize(img / 255.0, (resize, resize)).astype(np.float32)
    want = _to_hwc(TF.center_crop(torch.from_numpy(resized).permute(2, 0, 1), [size, size]))
    assert got.dtype == np.float32 and got.shape == (size, size, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=2**-23)  # the bound argued above


def _stripe_mask(h, w):
    mask = np.zeros((h, w), np.uint8)
    mask[:, w // 3 : w // 3 + 3] = 255  # a thin vertical stripe: bilinear shrinking blurs it
    mask[h // 2 : h // 2 + 2, :] = 255  # and a thin horizontal one
    mask[10:40, 50:90] = 255
    return mask


@pytest.mark.parametrize("filter_", ["pil_bilinear", "cv2_bilinear"])
@pytest.mark.parametrize("size,resize", [(64, 0), (64, 80), (256, 0), (31, 0)])
@pytest.mark.parametrize("source", [(300, 300), (257, 333)])
def test_mask_matches_torchvision(filter_, size, resize, source):
    mask = _stripe_mask(*source)
    got = Recipe(filter_, size=size, resize=resize).mask(mask)
    steps = [transforms.Resize((resize or size, resize or size))]
    if resize:
        steps.append(transforms.CenterCrop(size))
    want = transforms.Compose(steps + [transforms.ToTensor()])(Image.fromarray(mask, "L"))[0].numpy() > 0.5
    assert got.dtype == bool and got.shape == (size, size)
    assert want.any() and not want.all()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("filter_,dtype", [("pil_bilinear", np.uint8), ("cv2_bilinear", np.float32)])
@pytest.mark.parametrize("size,resize", [(64, 0), (48, 64)])
def test_recipe_dtype_and_shape(filter_, dtype, size, resize):
    recipe = Recipe(filter_, size=size, resize=resize)
    assert recipe.dtype == np.dtype(dtype)
    out = recipe.image(_image(100, 130))
    assert out.dtype == np.dtype(dtype) and out.shape == (size, size, 3)
    config = rdconfig.defaults()
    config.input.filter, config.input.resize, config.image_size = filter_, resize, size
    assert Recipe.from_config(config) == recipe


def _legacy_rdpp_dict():
    saved = rdconfig.defaults().to_dict()
    del saved["input"]
    saved["model"]["name"] = "rdpp"
    return saved


def test_old_config_reads_as_pil_bilinear():
    assert RDPP.input_filter == "cv2_bilinear"  # rdpp's own filter today, yet the old workdir used PIL's
    config = rdconfig.from_dict(_legacy_rdpp_dict())
    assert config.model.name == "rdpp"
    assert config.input.filter == "pil_bilinear"
    assert config.input.resize == 0


def test_old_workdir_reads_as_the_recipe_it_was_trained_with(tmp_path):
    """A workdir written before config.input (0.5.0 and earlier): its model takes inputs by
    PIL's filter, as it was trained, although RD++'s own recipe is OpenCV's today."""
    (tmp_path / "config.json").write_text(json.dumps(_legacy_rdpp_dict()))
    recipe = Recipe.from_config(workdir_lib.load_config(tmp_path))
    assert recipe == Recipe("pil_bilinear", size=256, resize=0)
    image = _image(300, 200)
    np.testing.assert_array_equal(
        recipe.image(image), np.asarray(Image.fromarray(image).resize((256, 256), Image.Resampling.BILINEAR))
    )


def test_new_config_keeps_its_filter():
    saved = _legacy_rdpp_dict()
    saved["input"] = {"filter": "cv2_bilinear", "resize": 0}
    assert rdconfig.from_dict(saved).input.filter == "cv2_bilinear"


def test_resolve_input():
    config = rdconfig.defaults()
    assert config.input.filter == ""
    assert rdconfig.for_workdir(config, None, RDPP()).input.filter == "cv2_bilinear"
    assert config.input.filter == ""  # the caller's config is left as it was
    assert rdconfig.for_workdir(config, None, RD4AD()).input.filter == "pil_bilinear"

    saved = rdconfig.from_dict(_legacy_rdpp_dict())  # a workdir trained with PIL's filter
    assert rdconfig.for_workdir(config, saved, RDPP()).input.filter == "pil_bilinear"

    config.input.filter = "cv2_bilinear"
    assert rdconfig.for_workdir(config, saved, RD4AD()).input.filter == "cv2_bilinear"


def test_check_accepts_the_recipes():
    for filter_, resize, mode in [("", 0, "fit"), ("pil_bilinear", 256, "tile"), ("cv2_bilinear", 292, "squeeze")]:
        config = rdconfig.defaults()
        config.input.filter, config.input.resize, config.resize.mode = filter_, resize, mode
        rdconfig.check(config, 1)


def test_check_refuses_an_unknown_filter():
    config = rdconfig.defaults()
    config.input.filter = "cv2_bicubic"
    with pytest.raises(ConfigError, match="config.input.filter='cv2_bicubic' is not supported"):
        rdconfig.check(config, 1)


def test_check_refuses_a_resize_below_the_image_size():
    config = rdconfig.defaults()
    config.input.resize = config.image_size - 1
    with pytest.raises(ConfigError, match=r"config.input.resize=255 is smaller than config.image_size=256"):
        rdconfig.check(config, 1)


def test_check_refuses_a_crop_with_fit():
    config = rdconfig.defaults()
    config.input.resize, config.resize.mode = 292, "fit"
    with pytest.raises(ConfigError, match="centre-crops it; use 'squeeze'"):
        rdconfig.check(config, 1)


def test_uncrop_map_places_the_crop_back():
    # The crop of side 4 starts at round((8 - 4) / 2) = 2 of side 8, i.e. at 4 of 16, and
    # ends at (2 + 4) * 16 / 8 = 12.
    full = tiling.uncrop_map(np.ones((4, 4), np.float32), (16, 16), Recipe(size=4, resize=8))
    want = np.zeros((16, 16), np.float32)
    want[4:12, 4:12] = 1.0
    assert full.shape == (16, 16)
    np.testing.assert_array_equal(full, want)
