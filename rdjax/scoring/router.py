"""The category router: which product an image shows, so that a unified model decides
with that product's own thresholds when the caller does not know it (``category='auto'``).

The products of one line differ far more in what they are than any defect changes them,
and the frozen teacher already sees that: an image's embedding is each teacher scale's
features averaged over positions, each scale L2-normalised, concatenated and scaled to
unit length. The router keeps the embeddings of up to PER_CATEGORY training images per
category (router.npz in the workdir, written by the unified evaluation) and gives an
image the category of its nearest neighbour by cosine similarity. No extra training,
and its accuracy on the labelled test images is measured and reported with the metrics
(metrics.json's 'router_accuracy', the log), so a wrong router shows before the line
relies on it.
"""

from __future__ import annotations

import dataclasses
import functools
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rdjax.data.normalize import normalize
from rdjax.errors import WorkdirError
from rdjax.models import Model
from rdjax.pytrees import Variables
from rdjax.runtime import sharding
from rdjax.runtime.disk import atomic_path

ROUTER = "router.npz"
# Training images kept per category: the nearest neighbour needs a few views of each
# product, not all of them; 64 keeps router.npz small (64 x 1792 float32 = 0.5 MiB per
# category for WRN-50-2) whatever the training set's size.
PER_CATEGORY = 64


def embed(features: Sequence[jax.Array]) -> jax.Array:
    """(B, D) unit vectors: each scale's mean over positions, L2-normalised, concatenated
    and divided by sqrt(#scales)."""
    parts = []
    for f in features:
        pooled = jnp.mean(f.astype(jnp.float32), axis=tuple(range(1, f.ndim - 1)))
        parts.append(pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12))
    return jnp.concatenate(parts, axis=-1) / np.sqrt(len(parts))


@functools.cache
def embed_step(model: Model, imagenet_normalize: bool) -> Callable[[Variables, jax.Array], jax.Array]:
    """Jitted (teacher_vars, model inputs) -> embeddings."""

    @jax.jit
    def step(teacher_vars: Variables, images: jax.Array) -> jax.Array:
        return embed(model.teacher_features(teacher_vars, normalize(images, imagenet_normalize)))

    return step


def embeddings(
    model: Model, imagenet_normalize: bool, teacher_vars: Variables, inputs: np.ndarray, batch_size: int, put: Callable
) -> np.ndarray:
    """Model inputs -> embeddings, in global batches over every device (all processes call it)."""
    step = embed_step(model, imagenet_normalize)
    return sharding.map_global_batches(lambda x: (step(teacher_vars, x),), inputs, batch_size, put, "routing")[0]


def spread(n: int, k: int = PER_CATEGORY) -> np.ndarray:
    """``k`` row indices spread evenly over ``n`` rows (all of them when n <= k):
    deterministic, and covering the whole training set rather than its first files."""
    return np.arange(n) if n <= k else np.linspace(0, n - 1, k).round().astype(int)


@dataclasses.dataclass(frozen=True)
class Router:
    """Training embeddings (M, D), each row's category index, and the category names."""

    embeddings: np.ndarray
    labels: np.ndarray
    categories: tuple[str, ...]

    def route(self, embeddings: np.ndarray) -> list[str]:
        """The category of each embedding's nearest training embedding (cosine; the
        first of equals on a tie)."""
        similarity = np.asarray(embeddings, np.float32) @ self.embeddings.T
        return [self.categories[self.labels[j]] for j in np.argmax(similarity, axis=1)]

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, embeddings=self.embeddings, labels=self.labels, categories=np.array(self.categories))


def load_router(path: Path) -> Router | None:
    """router.npz, or None where the workdir has none; a damaged file is one line."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            router = Router(data["embeddings"], data["labels"], tuple(str(c) for c in data["categories"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise WorkdirError(f"{path}: not a readable router ({e}); rerun `rdjax eval` to rebuild it") from None
    n = len(router.embeddings)
    labels_ok = (
        router.labels.shape == (n,)
        and n > 0
        and 0 <= router.labels.min() <= router.labels.max() < len(router.categories)
    )
    if router.embeddings.ndim != 2 or not labels_ok:
        raise WorkdirError(f"{path}: inconsistent router arrays; rerun `rdjax eval` to rebuild it")
    if not np.all(np.isfinite(router.embeddings)):
        raise WorkdirError(f"{path}: non-finite embeddings; rerun `rdjax eval` to rebuild it")
    return router
