"""One-class novelty detection on Fashion-MNIST: the MNIST settings on another dataset.

python -m rdjax.main --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist --config.dataset.normal_class=all
"""

from rdjax.configs import mnist


def get_config():
    config = mnist.get_config()
    config.dataset.name = "fashion_mnist"
    return config
