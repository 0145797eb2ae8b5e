"""Dinomaly at scale, apart from tests/integration/test_scale.py so that pytest-xdist's workers share
the load: two processes equal one, and bfloat16 maps stay close to float32's."""

from __future__ import annotations

import pytest
from test_scale import _train_both, check_bfloat16_maps, check_two_processes

from rdjax.models.dinomaly import Dinomaly

pytestmark = pytest.mark.slow  # three trainings through the CLI (subprocesses): ~2 min


@pytest.fixture(scope="module")
def dinomaly_runs(synthetic_data, tmp_path_factory):
    """Dinomaly (the tiny random ViT, 64 px images cropped to 56, its maps and score),
    trained with 2 devices in one process and with two processes of one device."""
    flags = (
        "--config.model.name=dinomaly", "--config.model.arch=vit_tiny14_reg4", "--config.image_size=56",
        "--config.input.resize=64", "--config.map_mode=mean", "--config.max_ratio=0.01",
        "--config.learning_rate=0.002", "--config.adam_b1=0.9",
    )  # fmt: skip
    return _train_both(synthetic_data(), tmp_path_factory.mktemp("dinomaly_runs"), *flags)


def test_two_processes_equal_one_process(dinomaly_runs):
    """Bit-identical state, metrics and calibration: the dropout masks, the hard-mining
    threshold and the clipping norm are taken over the global batch, whoever holds it."""
    check_two_processes(dinomaly_runs, 1, {"arch": "vit_tiny14_reg4", "name": "dinomaly"})


def test_bfloat16_maps_stay_close_to_float32():
    check_bfloat16_maps(Dinomaly("vit_tiny14_reg4"), Dinomaly("vit_tiny14_reg4", dtype="bfloat16"), 56)
