"""One-class novelty detection on cifar10: ResNet-18 teacher, 32x32, as the official helpers.

python -m rdjax.main --config=configs/cifar10.py --workdir=runs/cifar10 --config.dataset.normal_class=all
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.arch = "resnet18"
    config.dataset.name = "cifar10"
    config.dataset.normal_class = "all"
    config.image_size = 32
    config.batch_size = 64
    config.num_epochs = 50
    config.eval_every = 10
    config.checkpoint_every = 10
    config.eval_batch_size = 256
    return config
