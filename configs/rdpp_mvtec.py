"""RD++'s official MVTec AD settings (tientrandinh/Revisiting-Reverse-Distillation, main.py):
WRN-50-2, ImageNet teacher, 256 px, batch 16, seed 111; Adam betas (0.5, 0.999) at lr 0.005
for the OCBE and decoder and 0.001 for the projection layers, gradients accumulated over
2 batches, projection loss weighted 0.2, and the epochs of its per-category table
(categories it leaves out, which its script would fail on, get num_epochs = 200).

The official script evaluates on the test set after every epoch and keeps the best;
rdjax evaluates every eval_every epochs and reports the last in metrics.json, and the best
evaluated one in best_on_test.json, labelled as selected on the test set
(--config.eval_every=1 evaluates every epoch, as the official script).

python -m rdjax.main --config=configs/rdpp_mvtec.py --workdir=runs/rdpp \
    --config.dataset.root=/data/mvtec_anomaly_detection --config.dataset.category=all
"""

from rdjax.configs import mvtec

EPOCHS = {
    "carpet": 10,
    "leather": 10,
    "grid": 260,
    "tile": 260,
    "wood": 100,
    "cable": 240,
    "capsule": 300,
    "hazelnut": 160,
    "metal_nut": 160,
    "screw": 280,
    "toothbrush": 280,
    "transistor": 300,
    "zipper": 300,
    "pill": 200,
    "bottle": 200,
}


def get_config():
    config = mvtec.get_config()
    config.model.name = "rdpp"
    config.model.proj_lr = 0.001
    config.model.accumulation = 2
    config.learning_rate = 0.005
    config.num_epochs = 200
    config.num_epochs_by_category.update(EPOCHS)
    config.report_best_on_test = True  # the official protocol's figure, beside the last epoch's
    return config
