"""One-class novelty detection on CIFAR-10: the MNIST settings, with ImageNet normalization
(the official CIFAR-10 helper normalizes, its MNIST helpers do not).

python -m rdjax.main --config=configs/cifar10.py --workdir=runs/cifar10 --config.dataset.normal_class=all
"""

from rdjax.configs import mnist


def get_config():
    config = mnist.get_config()
    config.dataset.name = "cifar10"
    config.imagenet_normalize = True
    return config
