"""Which dataset a config names, where it lives, and loading its splits into memory."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from rdjax.data import layouts, mvtec, novelty, synthetic
from rdjax.data.preprocess import DataError, Split

DATASETS = ("mvtec", "synthetic", "visa", "folder") + novelty.NOVELTY_DATASETS


def dataset_root(config: ml_collections.ConfigDict) -> Path:
    """The folder holding the categories; the synthetic one is generated when absent."""
    name = config.dataset.name
    if name not in DATASETS:
        raise DataError(f"unknown dataset.name {name!r}; choose one of {DATASETS}")
    if name == "folder":
        return Path(config.dataset.train_dir).expanduser().parent
    if name in novelty.NOVELTY_DATASETS:
        return Path(config.dataset.data_dir or Path.home() / "tensorflow_datasets")
    if not config.dataset.root:
        raise DataError("config.dataset.root is empty; set --config.dataset.root=/path/to/mvtec_anomaly_detection")
    root = Path(config.dataset.root).expanduser()
    if root.name.endswith((".tar.xz", ".tar.gz", ".tar")):
        root = extract_archive(root, Path(config.dataset.data_dir or Path.home() / "tensorflow_datasets"))
    if name == "synthetic":
        synthetic.generate(root, seed=config.dataset.synthetic_seed)
    return root


def extract_archive(archive: Path, cache: Path) -> Path:
    """Unpack the official mvtec_anomaly_detection.tar.xz once; return the folder of categories.

    Extraction goes to a temporary folder renamed into place when complete, so an
    interrupted extraction is never mistaken for a dataset.
    """
    import shutil
    import tarfile
    import tempfile

    if not archive.is_file():
        raise DataError(f"{archive}: no such archive")
    target = cache / "extracted" / archive.name.split(".tar")[0]
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract."))
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            entries = [p for p in tmp.iterdir()]
            inner = entries[0] if len(entries) == 1 and not mvtec.list_categories(tmp) else tmp
            inner.rename(target)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{archive}: cannot extract ({e})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def list_categories(config: ml_collections.ConfigDict) -> list[str]:
    """What dataset.category='all' (dataset.normal_class='all' for novelty) runs over."""
    if config.dataset.name in novelty.NOVELTY_DATASETS:
        return [f"class_{c}" for c in novelty.CLASSES]
    if config.dataset.name == "folder":
        return [config.dataset.category]
    if config.dataset.name == "visa":
        return layouts.visa_categories(dataset_root(config))
    return mvtec.list_categories(dataset_root(config))


def _items(config: ml_collections.ConfigDict) -> dict | None:
    d = config.dataset
    if d.name == "visa":
        return layouts.scan_visa(dataset_root(config), d.category)
    if d.name == "folder":
        return layouts.scan_folders(d.train_dir, d.test_good_dir, d.test_anomalous_dir, d.mask_dir)
    return None  # MVTec layout: mvtec.prepare scans it


def load_dataset(config: ml_collections.ConfigDict) -> tuple[Split, Split]:
    """(train, test) splits of config.dataset.category, decoded at config.image_size.

    With several processes, process 0 generates/prepares the data first and the others
    wait, so no two processes write the same TFDS folder.
    """
    import jax
    from jax.experimental import multihost_utils

    if config.dataset.name in novelty.NOVELTY_DATASETS:
        return novelty.load_novelty(config.dataset.name, int(config.dataset.category.removeprefix("class_")),
                                    config.image_size, config.dataset.data_dir or None)

    def ready() -> mvtec.MVTecAD:
        name = config.dataset.category if config.dataset.name in ("mvtec", "synthetic") else f"{config.dataset.name}_{config.dataset.category}"
        return mvtec.prepare(dataset_root(config), name, config.dataset.data_dir or None, items=_items(config))

    if jax.process_count() > 1:
        if jax.process_index() == 0:
            ready()
        multihost_utils.sync_global_devices("rdjax: dataset prepared")
    builder = ready()
    size = config.image_size
    location = dataset_root(config) / (config.dataset.category if config.dataset.name != "folder" else "")
    nonzero = config.dataset.name == "visa"  # VisA masks are not 0/255
    return (
        mvtec.load_split(builder, "train", size, desc="decoding train", location=location, nonzero_masks=nonzero),
        mvtec.load_split(builder, "test", size, desc="decoding test", location=location, nonzero_masks=nonzero),
    )
