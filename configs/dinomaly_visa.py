"""Dinomaly's official VisA settings, unified (guojiajeremy/Dinomaly, dinomaly_visa_uni.py):
those of configs/dinomaly_mvtec.py (10,000 iterations, StableAdamW eps 1e-10) on VisA's
twelve categories in one model. Its separate script (dinomaly_visa_sep.py) is
--config.setting=per_category --config.total_steps=5000 --config.model.eps=1e-8.

Data: the official VisA download, with split_csv/1cls.csv at the root (docs/datasets.md).
python -m rdjax.main --config=configs/dinomaly_visa.py --workdir=runs/dinomaly_visa \
    --config.dataset.root=/data/VisA
"""

from rdjax.configs import dinomaly_mvtec


def get_config():
    config = dinomaly_mvtec.get_config()
    config.dataset.name = "visa"
    return config
