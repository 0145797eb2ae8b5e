"""A PyTorch RD4AD student assembled from torchvision's own blocks, as an independent
reference for rdjax's OCBE and decoder.

It follows the official code's structure (its BN_layer in resnet.py and de_resnet.py,
crosschecked by experiments/crosscheck_official.py): torchvision Bottleneck/BasicBlock
forwards, with the decoder's stride-2
convolutions swapped for 2x2 stride-2 ConvTranspose2d. State-dict keys are renamed to the
official ones ('downsample' -> 'upsample' in the decoder) so the real port is exercised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score
from torch import nn
from torchvision import transforms
from torchvision.models import resnet as tvr

from rdjax.models.resnet import get_arch


def teacher_features(model: tvr.ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    a = model.layer1(x)
    b = model.layer2(a)
    return [a, b, model.layer3(b)]


class TorchOCBE(nn.Module):
    def __init__(self, arch: str):
        super().__init__()
        spec = get_arch(arch)
        e = spec.expansion
        block = tvr.BasicBlock if spec.block == "basic" else tvr.Bottleneck
        kw = {} if spec.block == "basic" else {"base_width": spec.base_width}
        self.conv1 = nn.Conv2d(64 * e, 128 * e, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(128 * e)
        self.conv2 = nn.Conv2d(128 * e, 256 * e, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(256 * e)
        self.conv3 = nn.Conv2d(128 * e, 256 * e, 3, 2, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(256 * e)
        self.conv4 = nn.Conv2d(1024 * e, 512 * e, 1, bias=False)  # defined, never used: as official
        self.bn4 = nn.BatchNorm2d(512 * e)
        inplanes = 256 * e * 3
        down = nn.Sequential(nn.Conv2d(inplanes, 512 * e, 1, 2, bias=False), nn.BatchNorm2d(512 * e))
        blocks = [block(inplanes, 512, 2, down, **kw)]
        blocks += [block(512 * e, 512, **kw) for _ in range(1, spec.ocbe_blocks)]
        self.bn_layer = nn.Sequential(*blocks)

    def forward(self, feats):
        a, b, c = feats
        a = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(a))))))
        b = torch.relu(self.bn3(self.conv3(b)))
        return self.bn_layer(torch.cat([a, b, c], 1))


class TorchDecoder(nn.Module):
    def __init__(self, arch: str):
        super().__init__()
        spec = get_arch(arch)
        e = spec.expansion
        block = tvr.BasicBlock if spec.block == "basic" else tvr.Bottleneck
        kw = {} if spec.block == "basic" else {"base_width": spec.base_width}
        inplanes = 512 * e
        for i, planes in enumerate((256, 128, 64)):
            up = nn.Sequential(nn.ConvTranspose2d(inplanes, planes * e, 2, 2, bias=False), nn.BatchNorm2d(planes * e))
            first = block(inplanes, planes, 1, up, **kw)
            if spec.block == "basic":
                first.conv1 = nn.ConvTranspose2d(inplanes, planes, 2, 2, bias=False)
            else:
                width = first.conv2.in_channels
                first.conv2 = nn.ConvTranspose2d(width, width, 2, 2, bias=False)
            rest = [block(planes * e, planes, **kw) for _ in range(1, spec.layers[i])]
            setattr(self, f"layer{i + 1}", nn.Sequential(first, *rest))
            inplanes = planes * e

    def forward(self, x):
        a = self.layer1(x)
        b = self.layer2(a)
        c = self.layer3(b)
        return [c, b, a]


def official_state_dict(ocbe: TorchOCBE, decoder: TorchDecoder) -> dict:
    """The official checkpoint layout: {'bn': ..., 'decoder': ...}, decoder shortcuts as 'upsample'."""
    dec = {k.replace("downsample", "upsample"): v for k, v in decoder.state_dict().items()}
    return {"bn": ocbe.state_dict(), "decoder": dec}


class TorchProjection(nn.Module):
    """RD++'s projection of one scale, as its official code builds it: an nn.Sequential of
    four (Conv2d 3x3 with bias, InstanceNorm2d, LeakyReLU) stages, c -> c/2 -> c/4 -> c/2 -> c."""

    def __init__(self, c: int):
        super().__init__()
        stages = []
        for cin, cout in ((c, c // 2), (c // 2, c // 4), (c // 4, c // 2), (c // 2, c)):
            stages += [nn.Conv2d(cin, cout, 3, 1, 1), nn.InstanceNorm2d(cout), nn.LeakyReLU()]
        self.proj = nn.Sequential(*stages)

    def forward(self, x):
        return self.proj(x)


class TorchMPL(nn.Module):
    """RD++'s MultiProjectionLayer(base): proj_a, proj_b, proj_c on base*4, *8, *16 channels."""

    def __init__(self, base: int):
        super().__init__()
        self.proj_a, self.proj_b, self.proj_c = (TorchProjection(base * k) for k in (4, 8, 16))

    def forward(self, feats):
        return [p(f) for p, f in zip((self.proj_a, self.proj_b, self.proj_c), feats)]


def rdpp_projection_terms(noised, proj_noised, proj_clean, perm):
    """RD++'s Revisit_RDLoss terms (SSOT, reconstruction, contrast) with a given batch
    permutation, from geomloss and torch's losses."""
    import geomloss

    sinkhorn = geomloss.SamplesLoss(
        "sinkhorn", p=2, blur=0.05, reach=None, diameter=10000000, scaling=0.95, truncate=10, debias=True
    )
    cos = nn.CosineSimilarity()
    contrast = nn.CosineEmbeddingLoss(margin=0.5)
    flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
    target = -torch.ones(proj_clean[0].shape[0], dtype=proj_clean[0].dtype)
    ssot = sum(sinkhorn(torch.softmax(flat(p), -1), torch.softmax(flat(p[perm]), -1)) for p in proj_clean)
    rec = sum(torch.mean(1 - cos(n, p)) for n, p in zip(proj_noised, proj_clean))
    con = sum(contrast(flat(f), flat(p), target) for f, p in zip(noised, proj_clean))
    return ssot, rec, con


def rdpp_projection_loss(noised, proj_noised, proj_clean, perm):
    ssot, rec, con = rdpp_projection_terms(noised, proj_noised, proj_clean, perm)
    return (ssot + 0.01 * rec + 0.1 * con) / 1.11


def official_evaluation(teacher, ocbe, decoder, root: Path, category: str, size: int, proj=None):
    """The official test.py evaluation, re-run with torch + scipy + sklearn: batch 1,
    torchvision transforms, map in numpy, scipy blur, pixel lists. With ``proj``, RD++'s
    evaluation_multi_proj: the student reads the projected features (the maps compare it
    with the teacher's own)."""
    tf = transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    gt_tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    px_gt, px_pr, sp_gt, sp_pr = [], [], [], []
    for type_dir in sorted((root / category / "test").iterdir()):
        for path in sorted(type_dir.glob("*.png")):
            img = tf(Image.open(path).convert("RGB"))[None]
            if type_dir.name == "good":
                gt = torch.zeros(1, size, size)
            else:
                gt = gt_tf(Image.open(root / category / "ground_truth" / type_dir.name / f"{path.stem}_mask.png"))
            with torch.no_grad():
                t = teacher_features(teacher, img)
                s = decoder(ocbe(t if proj is None else proj(t)))
            amap = np.zeros((size, size))
            for fs, ft in zip(s, t):
                a = 1 - torch.nn.functional.cosine_similarity(fs, ft)
                a = torch.nn.functional.interpolate(a[:, None], size=size, mode="bilinear", align_corners=True)
                amap += a[0, 0].numpy()
            amap = gaussian_filter(amap, sigma=4)
            gt = (gt > 0.5).int().numpy()
            px_gt.extend(gt.ravel())
            px_pr.extend(amap.ravel())
            sp_gt.append(gt.max())
            sp_pr.append(amap.max())
    return roc_auc_score(px_gt, px_pr), roc_auc_score(sp_gt, sp_pr)
