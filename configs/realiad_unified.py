"""RD4AD on Real-IAD in the unified setting: configs/mvtec_unified.py (the ADer benchmark's
RD settings, which ADer also uses for Real-IAD) over Real-IAD's split files
(docs/datasets.md); every image of the five views of a sample is a row.

rdjax train --config=realiad_unified --workdir=runs/realiad --config.dataset.root=/data/Real-IAD/realiad_256
"""

from rdjax.configs import mvtec_unified


def get_config():
    config = mvtec_unified.get_config()
    config.dataset.name = "realiad"
    return config
