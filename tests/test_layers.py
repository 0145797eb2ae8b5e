"""Each layer kind against torch.nn with the same weights (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import nchw_to_nhwc, rel_err
from rdjax.models.layers import BatchNorm, Conv, ConvTranspose2x2, conv2d
from rdjax.port import convert

TOL = 1e-5


def _port_single(module: torch.nn.Module, flax_vars):
    """Port one torch layer through the real converter (keys without a prefix)."""
    sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    target = jax.tree_util.tree_map(lambda a: a, flax_vars)
    return convert(sd, target, ignore=lambda k: k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("kernel,stride,cin,cout,size", [(3, 1, 5, 7, 9), (3, 2, 6, 4, 10), (1, 2, 8, 3, 9), (7, 2, 3, 5, 17)])
def test_conv_matches_torch(kernel, stride, cin, cout, size):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
    x = torch.randn(2, cin, size, size)
    flax_conv = Conv(cout, kernel, stride)
    variables = flax_conv.init(jax.random.key(0), jnp.zeros((1, size, size, cin)))
    ported = _port_single(ref, variables)
    ours = flax_conv.apply(ported, jnp.asarray(nchw_to_nhwc(x)))
    want = nchw_to_nhwc(ref(x).detach())
    assert ours.shape == want.shape
    assert rel_err(ours, want) < TOL


@pytest.mark.parametrize("kernel,stride,size", [(3, 1, 9), (3, 2, 10), (3, 2, 9), (1, 1, 6), (1, 2, 9), (7, 2, 17)])
def test_conv_gradients_match_torch(kernel, stride, size):
    """conv2d lowers 1x1 kernels to a matmul and, on the CPU, computes kxk kernel
    gradients tap by tap; both gradients must still be torch's."""
    torch.manual_seed(3)
    x = torch.randn(2, 6, size, size, requires_grad=True)
    w = torch.randn(5, 6, kernel, kernel, requires_grad=True)
    y = torch.nn.functional.conv2d(x, w, stride=stride, padding=kernel // 2)
    dy = torch.randn_like(y)
    y.backward(dy)
    x_j, w_j = jnp.asarray(nchw_to_nhwc(x.detach())), jnp.asarray(w.detach().numpy().transpose(2, 3, 1, 0))
    ours, vjp = jax.vjp(lambda a, k: conv2d(a, k, stride), x_j, w_j)
    dx, dw = jax.jit(vjp)(jnp.asarray(nchw_to_nhwc(dy)))
    assert rel_err(ours, nchw_to_nhwc(y.detach())) < TOL
    assert rel_err(dx, nchw_to_nhwc(x.grad)) < TOL
    assert rel_err(dw, w.grad.numpy().transpose(2, 3, 1, 0)) < TOL


@pytest.mark.parametrize("cin,cout,h,w", [(4, 6, 3, 5), (8, 8, 4, 4)])
def test_conv_transpose_matches_torch(cin, cout, h, w):
    torch.manual_seed(1)
    ref = torch.nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False)
    x = torch.randn(2, cin, h, w)
    layer = ConvTranspose2x2(cout)
    variables = layer.init(jax.random.key(0), jnp.zeros((1, h, w, cin)))
    ported = _port_single(ref, variables)
    ours = layer.apply(ported, jnp.asarray(nchw_to_nhwc(x)))
    want = nchw_to_nhwc(ref(x).detach())
    assert ours.shape == (2, 2 * h, 2 * w, cout)
    assert rel_err(ours, want) < TOL


def _bn_pair(c: int):
    torch.manual_seed(2)
    ref = torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(c) + 0.5)
        ref.bias.copy_(torch.randn(c))
        ref.running_mean.copy_(torch.randn(c))
        ref.running_var.copy_(torch.rand(c) + 0.5)
    return ref


def test_batchnorm_eval_matches_torch():
    c = 6
    ref = _bn_pair(c).eval()
    x = torch.randn(3, c, 5, 4) * 3 + 1
    layer = BatchNorm(use_running_average=True)
    ported = _port_single(ref, layer.init(jax.random.key(0), jnp.zeros((1, 5, 4, c))))
    ours = layer.apply(ported, jnp.asarray(nchw_to_nhwc(x)))
    assert rel_err(ours, nchw_to_nhwc(ref(x).detach())) < TOL


def test_batchnorm_train_matches_torch_including_running_stats():
    c = 6
    ref = _bn_pair(c).train()
    layer = BatchNorm(use_running_average=False)
    variables = _port_single(ref, layer.init(jax.random.key(0), jnp.zeros((1, 5, 4, c))))
    for step in range(3):  # several updates: the momentum recursion must match too
        x = torch.randn(3, c, 5, 4) * (step + 2) + step
        want = nchw_to_nhwc(ref(x).detach())
        ours, updates = layer.apply(variables, jnp.asarray(nchw_to_nhwc(x)), mutable=["batch_stats"])
        variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
        assert rel_err(ours, want) < TOL
        np.testing.assert_allclose(variables["batch_stats"]["mean"], ref.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(variables["batch_stats"]["var"], ref.running_var.numpy(), rtol=1e-5, atol=1e-6)
