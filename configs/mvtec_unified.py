"""RD4AD in the unified (multi-class) setting: one model for every MVTec AD category, as
the ADer benchmark trains it (zhangzjn/ADer, configs/benchmark/rd/rd_256_100e.py):
WRN-50-2, ImageNet teacher, 256 px, batch 16, 100 epochs over the union of the
categories' training images, Adam (0.5, 0.999) at lr 0.005 (0.005 * batch / 16), the rate
times 0.1 after epoch 80 (its 'step' schedule, decay_epochs = 0.8 * epochs), seed
42, and one evaluation, at the end. ADer's 300-epoch variant (rd_256_300e.py) is
--config.num_epochs=300 --config.lr_decay_epoch=240.

rdjax train --config=mvtec_unified --workdir=runs/unified --config.dataset.root=/data/mvtec_anomaly_detection
"""

from rdjax.configs import mvtec


def get_config():
    config = mvtec.get_config()
    config.setting = "unified"
    config.dataset.category = "all"
    config.num_epochs = 100
    config.eval_every = 100
    config.seed = 42
    config.learning_rate = 0.005
    config.lr_decay_epoch = 80
    config.lr_decay_factor = 0.1
    return config
