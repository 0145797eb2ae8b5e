"""The RD++ demo: configs/synthetic.py (generated data, random ResNet-18 teacher, 128 px)
with model 'rdpp' and RD++'s optimizer settings."""

from rdjax.configs import synthetic


def get_config():
    config = synthetic.get_config()
    config.model.name = "rdpp"
    config.model.proj_lr = 0.001
    config.model.accumulation = 2
    return config
