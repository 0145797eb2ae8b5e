"""Images -> model inputs -> teacher features, and the cache of the training images' features.

With no augmentation (the paper's protocol) the frozen teacher's features are identical
in every epoch, so they are computed once and the teacher leaves the training loop.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rdjax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from rdjax.sharding import map_global_batches

Features = tuple[jax.Array, ...]


def normalize(images: jax.Array, imagenet: bool = True) -> jax.Array:
    """uint8 NHWC -> float32 as ToTensor + Normalize(ImageNet mean, std); ToTensor alone
    with ``imagenet=False`` (the official MNIST/Fashion-MNIST helpers skip Normalize)."""
    x = images.astype(jnp.float32) / 255.0
    if not imagenet:
        return x
    return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def cache_teacher_features(model: Any, teacher_vars: Any, images: np.ndarray, batch_size: int,
                           put: Callable[[Any], Any], imagenet_normalize: bool = True) -> list[np.ndarray]:
    """The teacher's features of every image, in the compute dtype (bfloat16 halves the cache)."""

    @jax.jit
    def features(x: jax.Array) -> Features:
        return tuple(f.astype(model.dtype) for f in model.teacher_features(teacher_vars, normalize(x, imagenet_normalize)))

    return map_global_batches(features, images, batch_size, put, desc="teacher features")
