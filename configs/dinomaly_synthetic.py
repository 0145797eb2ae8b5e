"""The Dinomaly demo: the built-in synthetic dataset, both categories in one model (the
unified setting Dinomaly is made for), a small RANDOM ViT encoder ('vit_tiny14_reg4': no
pretrained weights, so it runs offline; the run says so), 128 px images centre-cropped to
112 (8 x 8 patches), Dinomaly's map and score recipe.

rdjax train --config=dinomaly_synthetic --workdir=runs/dinomaly_demo
"""

from rdjax.configs import dinomaly_mvtec, synthetic


def get_config():
    config = dinomaly_mvtec.get_config()
    demo = synthetic.get_config()
    config.dataset = demo.dataset
    config.model.arch = "vit_tiny14_reg4"
    config.model.teacher_weights = "none"
    config.input.resize = 128
    config.image_size = 112
    config.map_size = 0  # the crop's own size: no 256 px resize for 112 px inputs
    config.batch_size = 8
    config.total_steps = 220  # the RD4AD demo's budget in the unified setting: 20 epochs of 11 steps
    config.model.warmup_steps = 20
    config.eval_every = 1000
    config.checkpoint_every = 5
    return config
