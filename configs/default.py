"""Base configuration. Every other config starts from this one.

Key names under "User-facing keys" are the public interface; see docs/config.md.
Run any config by name or path: `rdjax train --config=default --workdir=DIR`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # User-facing keys.
    config.model = ml_collections.ConfigDict()
    config.model.name = "rd4ad"  # a name in rdjax.registry.MODELS: 'rd4ad', 'rdpp' (RD++) or 'dinomaly'
    # The teacher: a ResNet for RD4AD and RD++ ('resnet18', 'resnet34', 'resnet50',
    # 'wide_resnet50_2', 'wide_resnet101_2'); a DINOv2 ViT for Dinomaly
    # ('dinov2_vitb14_reg4', ...; rdjax.models.vit.VIT_ARCHS).
    config.model.arch = "wide_resnet50_2"
    # 'imagenet' (download/cache), a .pth/.safetensors/.npz file, an rdjax teacher
    # directory, or 'none' (random teacher: for tests and demos only).
    config.model.teacher_weights = "imagenet"
    # Every other config.model key is an option of the model (rdjax.models.<name>, with its
    # defaults), e.g. config.model.proj_lr for 'rdpp', config.model.warmup_steps for
    # 'dinomaly'; a config that sets one names the model (configs/rdpp_*.py, dinomaly_*.py).
    # True: never download (teacher weights must already be in the cache); the same as
    # the environment variable RDJAX_OFFLINE=1.
    config.offline = False

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "mvtec"
    config.dataset.root = ""
    config.dataset.category = "bottle"  # or "all": every category under root
    # 'per_category': one model per category (the papers), each in workdir/<category> when
    # there are several; 'unified': one model trained on every category's training images
    # shuffled together, one workdir, evaluated per category (docs/usage.md).
    config.setting = "per_category"
    config.dataset.data_dir = ""  # where TFDS keeps prepared data ("" = ~/tensorflow_datasets)
    config.dataset.synthetic_seed = 0  # dataset.name='synthetic' only
    # dataset.name='folder' only: any folders of images (masks optional, matched by file stem).
    config.dataset.train_dir = ""
    config.dataset.test_good_dir = ""
    config.dataset.test_anomalous_dir = ""
    config.dataset.mask_dir = ""
    # dataset.name in ('mnist', 'fashion_mnist', 'cifar10') only: the normal class, "0".."9" or "all".
    config.dataset.normal_class = "0"
    # dataset.name='realiad' only: the split set beside the image folder (docs/datasets.md):
    # 'realiad_jsons' (the multi-view protocol), 'realiad_jsons_sv', 'realiad_jsons_fuiad_0.1', ...
    config.dataset.split_set = "realiad_jsons"

    config.image_size = 256
    config.batch_size = 16
    # Epochs as the official code runs them (False): ceil(N / batch_size) steps, the last on
    # the N mod batch_size rows left over (the loss and BatchNorm count only those). True:
    # full batches only, N // batch_size steps; on small sets that is far fewer steps
    # (docs/config.md). None (unset) = the workdir's when it has one, else False; recorded
    # in config.json when training starts.
    config.drop_last = ml_collections.config_dict.placeholder(bool)
    config.num_epochs = 200
    # > 0: train exactly this many optimizer steps, as iteration-counted official loops do
    # (Dinomaly's 10,000): num_epochs becomes ceil(total_steps / steps per epoch) and the
    # last epoch stops early. 0: num_epochs epochs.
    config.total_steps = 0
    config.learning_rate = 0.005
    config.eval_every = 10
    config.checkpoint_every = 10
    config.seed = 111
    config.dtype = "float32"

    # Further keys.
    config.adam_b1 = 0.5
    config.adam_b2 = 0.999
    # A step schedule (ADer's): every learning rate times lr_decay_factor after this many
    # epochs; 0 keeps the rates constant, as the papers' code.
    config.lr_decay_epoch = 0
    config.lr_decay_factor = 0.1
    config.keep_checkpoints = 3
    # The maps and the image score (rdjax.models.MapRecipe). Each left None (unset) is the
    # model's own recipe, the official code's (RD4AD's and RD++'s: add, 4.0, 0, 0, 0.0;
    # Dinomaly's: mean, 4.0, 5, 256, 0.01), or a trained workdir's; recorded in
    # config.json when training starts.
    config.map_mode = ml_collections.config_dict.placeholder(str)  # 'add', 'mul' or 'mean' over the scales
    config.blur_sigma = ml_collections.config_dict.placeholder(float)
    # 0: scipy's gaussian_filter (truncate 4, reflect), RD4AD's and RD++'s blur; k > 0 (odd):
    # a k x k Gaussian with zero padding, Dinomaly's (5).
    config.blur_kernel = ml_collections.config_dict.placeholder(int)
    # The side of the maps the metrics compare: 0 = the input's; > 0 = the map resized to
    # it (bilinear, align_corners=False) before the blur, and the masks by nearest
    # neighbour, as Dinomaly's evaluation does at 256.
    config.map_size = ml_collections.config_dict.placeholder(int)
    # The image score from its map: 0 = the map's maximum (RD4AD, RD++); r in (0, 1] = the
    # mean of the map's highest r fraction of pixels (Dinomaly's max_ratio, 0.01 there).
    config.max_ratio = ml_collections.config_dict.placeholder(float)
    config.imagenet_normalize = True  # False for MNIST/Fashion-MNIST, as the official helpers
    # How a file becomes the model's input (rdjax.data.preprocess.Recipe, docs/config.md):
    # filter 'pil_bilinear' (torchvision's Resize on PIL images: RD4AD's code) or
    # 'cv2_bilinear' (OpenCV's resize of the float image: RD++'s code); '' = the workdir's
    # recipe when it has one, else the model's own. resize: the side images are resized
    # to before a centre crop to image_size (0 = image_size, no crop). Recorded in
    # config.json when training starts.
    config.input = ml_collections.ConfigDict()
    config.input.filter = ""
    config.input.resize = 0
    # A mask pixel is a defect where its resized value (in [0, 1]) exceeds this: 0.5 for
    # RD4AD's and RD++'s code, 0 for Dinomaly's (any non-zero value).
    config.input.mask_threshold = 0.5
    config.eval_batch_size = 16
    # How evaluation (and, by default, predict) turns an image into model inputs
    # (rdjax.scoring.tiling, docs/usage.md "Large and non-square images"): 'squeeze' (the whole
    # image to image_size, the paper's protocol), 'fit' or 'tile' (blended windows of a
    # proportionally scaled copy; tile_size native pixels per window, 0 = image_size;
    # overlap native pixels between windows). Thresholds are calibrated on these maps.
    config.resize = ml_collections.ConfigDict()
    config.resize.mode = "squeeze"
    config.resize.tile_size = 0
    config.resize.overlap = 0
    # Where training reads the teacher's features: 'auto', 'memory', 'disk' or 'off'
    # (docs/scaling.md). 'disk' writes under feature_cache_dir ("" = the workdir).
    config.feature_cache = "auto"
    config.feature_cache_dir = ""
    # Test sets up to this many pixels keep every map for exact pixel metrics; larger
    # ones use binned metrics accumulated batch by batch (within 1e-3, docs/scaling.md).
    config.exact_metrics_max_pixels = 2**24
    # Also write best_on_test.json: the evaluated epoch with the best test metrics, as RD++'s
    # official script selects (labelled as chosen on the test set; metrics.json stays the last).
    config.report_best_on_test = False
    # >0: a jax.profiler trace of that many training steps, from the run's second step,
    # into workdir/profile (TensorBoard's profile plugin or Perfetto read it).
    config.profile_steps = 0
    # What runs on each evaluation pass (big_vision's shape): a name -> its 'type' (a
    # module in rdjax/evaluators/), 'every' (epochs; 0 = eval_every) and its own settings
    # (docs/config.md). An evaluator runs after those its settings name.
    config.evals = ml_collections.ConfigDict(
        {
            "anomaly": {"type": "anomaly", "every": 0},
            "calibration": {"type": "calibration", "every": 0},
            "report": {
                "type": "report",
                "every": 0,
                "hardest": 4,
                "metrics_from": "anomaly",
                "threshold_from": "calibration",
            },
        }
    )

    # Epochs by category where they differ from num_epochs ({} = num_epochs everywhere);
    # configs/rdpp_mvtec.py sets RD++'s official table.
    config.num_epochs_by_category = ml_collections.ConfigDict()

    # Decision thresholds, calibrated after training and stored in calibration.json.
    config.threshold = ml_collections.ConfigDict()
    # 'quantile' (the default): that quantile of the scores of normal training images held
    # out of training, so the reported test metrics and decisions use no threshold fitted
    # on them. 'f1': F1-optimal on the labelled test set (the papers' protocol has no
    # threshold; labelled "fitted on the test set" wherever it is reported).
    config.threshold.method = "quantile"
    config.threshold.quantile = 0.99
    # train/good images held out of training (and never trained on): a fraction below 1
    # (rounded, at least one image) or a number of images; 0 with method='f1' trains on
    # every image, as the papers do.
    config.threshold.validation_size = 0.1
    return config
