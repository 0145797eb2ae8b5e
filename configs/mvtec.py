"""The paper's MVTec AD settings: WRN-50-2, 256 px, batch 16, 200 epochs, eval every 10.

python -m rdjax.main --config=configs/mvtec.py --workdir=runs/bottle \
    --config.dataset.root=/data/mvtec_anomaly_detection --config.dataset.category=bottle
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.arch = "wide_resnet50_2"
    config.model.teacher_weights = "imagenet"
    config.dataset.name = "mvtec"
    config.image_size = 256
    config.batch_size = 16
    config.num_epochs = 200
    config.learning_rate = 0.005
    config.eval_every = 10
    config.checkpoint_every = 10
    config.seed = 111
    return config
