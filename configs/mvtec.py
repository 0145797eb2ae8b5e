"""The paper's MVTec AD settings: WRN-50-2, ImageNet teacher, 256 px, batch 16, 200 epochs,
Adam lr 0.005, eval every 10, seed 111.

These are the base values in configs/default.py, which keeps them in one place; this file
names them as the MVTec config that users and other configs (visa.py) start from.

python -m rdjax.main --config=configs/mvtec.py --workdir=runs/bottle \
    --config.dataset.root=/data/mvtec_anomaly_detection --config.dataset.category=bottle
"""

from rdjax.configs import default


def get_config():
    config = default.get_config()
    config.dataset.name = "mvtec"
    return config
