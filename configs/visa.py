"""VisA with the MVTec settings of the paper's code (WRN-50-2, 256 px, batch 16, 200 epochs).

Data: the official VisA download, with split_csv/1cls.csv at the root.
python -m rdjax.main --config=configs/visa.py --workdir=runs/visa \
    --config.dataset.root=/data/VisA --config.dataset.category=all
"""

from rdjax.configs import mvtec


def get_config():
    config = mvtec.get_config()
    config.dataset.name = "visa"
    config.dataset.category = "candle"
    return config
