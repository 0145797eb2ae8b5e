"""Dinomaly's official modules rebuilt in torch from its code's description (never copied):
the tests' independent reference for rdjax.models.dinomaly. The encoder is timm's DINOv2
ViT (`vit_*_patch14_reg4_dinov2`) with random weights.

Dropout is given explicit masks, so both sides drop the same values.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn


def timm_encoder(dim: int, depth: int, heads: int, img_size: int, seed: int = 0) -> nn.Module:
    """timm's DINOv2-with-registers ViT, random weights drawn at a scale where every part matters."""
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_small_patch14_reg4_dinov2",
        pretrained=False,
        img_size=img_size,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        init_values=0.5,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.ndim > 1 else 0.3)
    return model.eval()


def encoder_at(source: nn.Module, size: int, grid: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """timm's encoder ``source`` (position grid ``grid``) at another input size, in ``dtype``,
    its position embedding interpolated in that dtype as DINOv2's interpolate_pos_encoding
    does: torch's bicubic, no antialiasing, scale factor (new grid + 0.1) / grid; the
    checkpoint's own grid unchanged."""
    dim, g = source.embed_dim, size // 14
    target = timm_encoder(dim, len(source.blocks), source.blocks[0].attn.num_heads, size).to(dtype)
    state = {k: v.to(dtype) for k, v in source.state_dict().items()}
    pos = state["pos_embed"].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    if g != grid:
        scale = (g + 0.1) / grid
        pos = F.interpolate(pos, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    state["pos_embed"] = pos.permute(0, 2, 3, 1).reshape(1, g * g, dim)
    target.load_state_dict(state)
    return target.eval()


def encoder_blocks(encoder: nn.Module, x: torch.Tensor, upto: int) -> list[torch.Tensor]:
    """The token sequences after blocks 0..upto (timm's own modules, no final norm)."""
    t = encoder.norm_pre(encoder._pos_embed(encoder.patch_embed(x)))
    outs = []
    for blk in encoder.blocks[: upto + 1]:
        t = blk(t)
        outs.append(t)
    return outs


class BMlp(nn.Module):
    def __init__(self, dim: int, rate: float = 0.2):
        super().__init__()
        self.fc1, self.fc2, self.rate = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim), rate

    def forward(self, x, masks=None):
        drop = (lambda t, m: t * m / (1 - self.rate)) if masks is not None else (lambda t, m: t)
        m = masks or (None, None, None)
        x = drop(x, m[0])
        x = drop(F.gelu(self.fc1(x)), m[1])
        return drop(self.fc2(x), m[2])


class LinearAttention2(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = F.elu(qkv[0]) + 1.0, F.elu(qkv[1]) + 1.0, qkv[2]
        kv = torch.einsum("...sd,...se->...de", k, v)
        z = 1.0 / torch.einsum("...sd,...d->...s", q, k.sum(dim=-2))
        x = torch.einsum("...de,...sd,...s->...se", kv, q, z)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-8)
        self.norm1, self.attn, self.norm2 = norm(dim), LinearAttention2(dim, heads), norm(dim)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTill(nn.Module):
    """The official assembly with its script's settings: targets 2..9, groups [0..3], [4..7]."""

    def __init__(self, encoder: nn.Module, dim: int, heads: int, registers: int = 4):
        super().__init__()
        self.encoder, self.registers = encoder, registers
        self.targets, self.groups = list(range(2, 10)), [[0, 1, 2, 3], [4, 5, 6, 7]]
        self.bottleneck = nn.ModuleList([BMlp(dim)])
        self.decoder = nn.ModuleList([DecoderBlock(dim, heads) for _ in range(8)])
        with torch.no_grad():
            for m in nn.ModuleList([self.bottleneck, self.decoder]).modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
                    nn.init.normal_(m.bias, std=0.01)  # nonzero, so the port of biases is tested
                elif isinstance(m, nn.LayerNorm):
                    nn.init.normal_(m.weight, 1.0, 0.1)
                    nn.init.normal_(m.bias, 0.0, 0.1)

    def forward(self, x, masks=None):
        with torch.no_grad():
            outs = encoder_blocks(self.encoder, x, self.targets[-1])
        en_list = [outs[i] for i in self.targets]
        side = int(math.sqrt(en_list[0].shape[1] - 1 - self.registers))
        fuse = lambda ts: torch.stack(ts, dim=1).mean(dim=1)  # noqa: E731
        y = self.bottleneck[0](fuse(en_list), masks)
        de_list = []
        for blk in self.decoder:
            y = blk(y)
            de_list.append(y)
        de_list = de_list[::-1]
        en = [fuse([en_list[i] for i in g]) for g in self.groups]
        de = [fuse([de_list[i] for i in g]) for g in self.groups]
        prefix = 1 + self.registers
        grid = lambda t: t[:, prefix:].permute(0, 2, 1).reshape(x.shape[0], -1, side, side).contiguous()  # noqa: E731
        return [grid(e) for e in en], [grid(d) for d in de]

    def state_dict_official(self) -> dict:
        return {k: v.detach().numpy() for k, v in self.state_dict().items() if not k.startswith("encoder.")}


def global_cosine_hm_percent(a, b, p: float, factor: float):
    """The official loss, with its gradient hook on the decoder's maps."""
    cos = nn.CosineSimilarity()
    loss = 0
    for item in range(len(a)):
        a_, b_ = a[item].detach(), b[item]
        with torch.no_grad():
            point_dist = 1 - cos(a_, b_).unsqueeze(1)
        thresh = torch.topk(point_dist.reshape(-1), k=int(point_dist.numel() * (1 - p)))[0][-1]
        loss += torch.mean(1 - cos(a_.reshape(a_.shape[0], -1), b_.reshape(b_.shape[0], -1)))
        inds = point_dist < thresh

        def hook(grad, inds=inds):
            grad = grad.clone()
            grad[inds.expand_as(grad)] *= factor
            return grad

        b_.register_hook(hook)
    return loss / len(a)


class StableAdamW(torch.optim.Optimizer):
    """The official StableAdamW (amsgrad option, decay first, the step divided by max(1, RMS(g / denom)))."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, clip=1.0):
        super().__init__(
            params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, clip=clip)
        )

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                if not state:
                    state["step"] = 0
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                    state["max_exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                bc1, bc2 = 1 - b1 ** state["step"], 1 - b2 ** state["step"]
                state["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                second = state["exp_avg_sq"]
                if group["amsgrad"]:
                    torch.max(state["max_exp_avg_sq"], second, out=state["max_exp_avg_sq"])
                    second = state["max_exp_avg_sq"]
                denom = (second.sqrt() / math.sqrt(bc2)).add_(group["eps"])
                ratio = grad / denom
                scale = max(1.0, float(ratio.norm(2) / math.sqrt(ratio.numel())) / group["clip"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bc1 / scale)


class WarmCosineScheduler(torch.optim.lr_scheduler.LRScheduler):
    """The official schedule: numpy warm-up then cosine, ``final`` after the table."""

    def __init__(self, optimizer, base, final, total_iters, warmup_iters=0):
        self.final, self.total_iters = final, total_iters
        warmup = np.linspace(0, base, warmup_iters)
        iters = np.arange(total_iters - warmup_iters)
        self.table = np.concatenate((warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch >= self.total_iters:
            return [self.final for _ in self.base_lrs]
        return [self.table[self.last_epoch] for _ in self.base_lrs]
