"""The demo: the built-in synthetic dataset (generated when absent), both categories.

A random ResNet-18 teacher (no pretrained weights are needed, so it runs offline; the
run says so loudly), 128 px, small enough for a few minutes on 2 CPU cores.
"""

from rdjax.configs import default


def get_config():
    config = default.get_config()
    config.model.arch = "resnet18"
    config.model.teacher_weights = "none"
    config.dataset.name = "synthetic"
    config.dataset.root = "data/synthetic"
    config.dataset.category = "all"
    config.image_size = 128
    config.batch_size = 8
    config.eval_batch_size = 16
    config.num_epochs = 20
    config.eval_every = 10
    config.checkpoint_every = 5
    return config
