"""The settings that take one of a few named values, defined once: the config checks, the
command-line flags and the code that branches on them all read these enums."""

from __future__ import annotations

import enum
from typing import TypeVar

from rdjax.errors import ConfigError

E = TypeVar("E", bound=enum.Enum)


class Dtype(str, enum.Enum):
    """Compute dtypes a run may use (float64 is a test-only reference precision)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class MapMode(str, enum.Enum):
    """How the per-scale maps combine (RD4AD's 'a' and 'mul'; Dinomaly's mean over its groups)."""

    ADD = "add"
    MUL = "mul"
    MEAN = "mean"


class ThresholdMethod(str, enum.Enum):
    F1 = "f1"  # best F1 on the labelled test images
    QUANTILE = "quantile"  # a quantile of held-out normal training images


class ResizeMode(str, enum.Enum):
    SQUEEZE = "squeeze"  # the whole image to image_size
    FIT = "fit"  # blended windows covering the image without distortion
    TILE = "tile"  # windows of tile_size native pixels


class ResizeFilter(str, enum.Enum):
    """How an image file becomes the model's input size (rdjax.data.preprocess.Recipe)."""

    PIL_BILINEAR = "pil_bilinear"  # torchvision's Resize on a PIL image (RD4AD's, Dinomaly's code)
    CV2_BILINEAR = "cv2_bilinear"  # OpenCV's INTER_LINEAR on the float image (RD++'s code)


class Setting(str, enum.Enum):
    """How a dataset's categories are trained."""

    PER_CATEGORY = "per_category"  # one model per category, each in its own workdir
    UNIFIED = "unified"  # one model on the union of every category (docs/usage.md)


class FeatureCache(str, enum.Enum):
    AUTO = "auto"
    MEMORY = "memory"
    DISK = "disk"
    OFF = "off"


# Whose thresholds decide a unified model's image (--category, ?category=, rdjax.load):
# a category's name, or one of these.
GLOBAL = "global"  # the thresholds fitted over every category (calibration.json's top level)
AUTO = "auto"  # each image's category chosen by the workdir's router (rdjax.scoring.router)
CATEGORY_HELP = (
    "A unified model's category whose thresholds decide; 'global': its thresholds over every category; "
    "'auto': each image's category recognised by the workdir's router. Default: a package's own, else global."
)


def values(kind: type[enum.Enum]) -> list[str]:
    return [m.value for m in kind]


def parse(kind: type[E], value: object, name: str) -> E:
    """``value`` as a member of ``kind``, or a one-line ConfigError naming the choices."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(repr(v) for v in values(kind))
        raise ConfigError(f"{name}={value!r} is not supported; choose one of {choices}") from None
