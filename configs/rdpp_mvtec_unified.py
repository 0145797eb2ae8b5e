"""RD++ in the unified (multi-class) setting, as the ADer benchmark trains it
(zhangzjn/ADer, configs/benchmark/rd++/rd++_256_100e.py and trainer/rdpp_trainer.py):
everything of configs/mvtec_unified.py, with RD++'s two Adams at ADer's rates, 0.001 for
the projection layers and five times that, 0.005, for the OCBE and decoder, stepping
every 2 batches. ADer zeroes the gradients before every batch, so its steps use every
second batch's gradient alone; rdjax keeps the official RD++ loop's sum over both
batches (docs/differences.md).

rdjax train --config=rdpp_mvtec_unified --workdir=runs/rdpp_unified --config.dataset.root=/data/mvtec_anomaly_detection
"""

from rdjax.configs import mvtec_unified


def get_config():
    config = mvtec_unified.get_config()
    config.model.name = "rdpp"
    config.model.proj_lr = 0.001
    config.model.accumulation = 2
    config.learning_rate = 0.005
    return config
