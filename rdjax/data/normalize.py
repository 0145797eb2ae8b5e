"""Model inputs as their recipe gives them -> the model's input: the one place that
scales and normalizes images, shared by training, the maps, the router and the
predictor."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rdjax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD


def to_unit(images: jax.Array) -> jax.Array:
    """Model inputs as their recipe (rdjax.data.preprocess.Recipe) gives them -> float32
    in [0, 1]: uint8 over 255, as ToTensor; float32 (OpenCV's recipe) as it is."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def normalize(images: jax.Array, imagenet: bool = True) -> jax.Array:
    """Model inputs (NHWC) -> float32 as ToTensor + Normalize(ImageNet mean, std); ToTensor
    alone with ``imagenet=False`` (the official MNIST/Fashion-MNIST helpers skip Normalize)."""
    return standardize(to_unit(images), imagenet)


def standardize(x: jax.Array, imagenet: bool = True) -> jax.Array:
    """[0, 1] float images -> the model's input (Normalize with ImageNet's mean and std)."""
    if not imagenet:
        return x
    return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
