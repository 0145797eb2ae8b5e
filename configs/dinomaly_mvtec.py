"""Dinomaly's official MVTec AD settings, unified (guojiajeremy/Dinomaly,
dinomaly_mvtec_uni.py): one model for every category; DINOv2 ViT-B/14 with 4 registers
(DINOv2's hub weights), blocks 2..9 rebuilt in two groups; images resized to 448 and
centre-cropped to 392; batch 16 with full batches only; 10,000 iterations of StableAdamW
(amsgrad, betas (0.9, 0.999), weight decay 1e-4, eps 1e-10) warming up to 2e-3 over 100
and a cosine down to 2e-4, gradients clipped to norm 0.1; maps the mean of the groups'
1 - cos, resized to 256 and blurred by a 5 x 5 Gaussian (sigma 4); the image score the
mean of the map's top 1 %; seed 1. rdjax holds 10% of train/good out for its thresholds
by default; --config.threshold.method=f1 --config.threshold.validation_size=0 trains on
every image, as the official script.

python -m rdjax.main --config=configs/dinomaly_mvtec.py --workdir=runs/dinomaly \
    --config.dataset.root=/data/mvtec_anomaly_detection
"""

from rdjax.configs import mvtec


def get_config():
    config = mvtec.get_config()
    config.model.name = "dinomaly"
    config.model.arch = "dinov2_vitb14_reg4"
    config.model.teacher_weights = "imagenet"  # DINOv2's hub checkpoint for the architecture
    config.setting = "unified"
    config.dataset.category = "all"
    config.input.filter = ""  # the model's: torchvision's Resize on PIL images
    config.input.resize = 448
    config.input.mask_threshold = 0.0  # its evaluation takes any non-zero mask value as a defect
    config.image_size = 392
    # The maps and score are the model's own recipe (map keys unset: Dinomaly.map_recipe, the
    # official evaluation: the groups' mean 1 - cos at 256 px, a 5 x 5 blur, the top 1 %).
    config.batch_size = 16
    config.drop_last = True
    config.total_steps = 10000
    config.learning_rate = 2e-3
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.model.final_lr = 2e-4
    config.model.warmup_steps = 100
    config.model.eps = 1e-10
    config.model.weight_decay = 1e-4
    config.model.clip = 0.1
    config.eval_every = 1000  # epochs: in effect once, at the end
    config.checkpoint_every = 5
    config.seed = 1
    return config
