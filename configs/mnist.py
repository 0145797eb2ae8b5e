"""One-class novelty detection on MNIST: ResNet-18 teacher, 32x32, as the official helpers.

python -m rdjax.main --config=configs/mnist.py --workdir=runs/mnist --config.dataset.normal_class=all
"""

from rdjax.configs import default


def get_config():
    config = default.get_config()
    config.model.arch = "resnet18"
    config.dataset.name = "mnist"
    config.dataset.normal_class = "all"
    config.image_size = 32
    config.imagenet_normalize = False  # the official helper applies ToTensor only
    config.batch_size = 64
    config.num_epochs = 50
    config.eval_every = 10
    config.checkpoint_every = 10
    config.eval_batch_size = 256
    return config
