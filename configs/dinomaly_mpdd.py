"""Dinomaly's official MPDD settings, one model per category (guojiajeremy/Dinomaly,
dinomaly_mpdd_sep.py): those of configs/dinomaly_mvtec.py but 5,000 iterations and
StableAdamW eps 1e-8, each category trained apart (its script reseeds with 1 for each).
MPDD ships in MVTec AD's layout, so it reads as dataset 'mvtec'.

python -m rdjax.main --config=configs/dinomaly_mpdd.py --workdir=runs/dinomaly_mpdd \
    --config.dataset.root=/data/MPDD
"""

from rdjax.configs import dinomaly_mvtec


def get_config():
    config = dinomaly_mvtec.get_config()
    config.setting = "per_category"
    config.dataset.category = "all"
    config.total_steps = 5000
    config.model.eps = 1e-8
    return config
