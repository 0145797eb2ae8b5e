"""Each layer kind against torch.nn with the same weights, and the CPU lowerings
against torch in float64.

Tolerances, and why they hold on any CPU:
- float32 forward of one layer (TOL = 1e-5 of the largest output): each output is a dot
  product of at most 7*7*8 = 392 terms; float32 accumulation errs by at most
  about sqrt(n) * 2^-24 of the terms' magnitude for random data (at most n * 2^-24 =
  2.3e-5 in the worst case, never approached by random data), whatever order a CPU's
  kernels sum in.
- gradients are compared in float64 (jax.enable_x64 against torch float64), where the
  same argument gives ~1e-14; FLOAT64_TOL = 1e-10 leaves four orders of magnitude.
- bfloat16 results are rounded once from float32 sums: within 2^-8 of the largest value
  plus the float32 sum's error; BF16_TOL = 2^-7.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rdjax.models.layers import BatchNorm, Conv, ConvTranspose2x2
from rdjax.models.lowering import conv2d
from rdjax.runtime.weights import convert

from conftest import nchw_to_nhwc, rel_err

TOL = 1e-5
FLOAT64_TOL = 1e-10


def _port_single(module: torch.nn.Module, flax_vars):
    """Port one torch layer through the real converter (keys without a prefix)."""
    sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    target = jax.tree_util.tree_map(lambda a: a, flax_vars)
    return convert(sd, target, ignore=lambda k: k.endswith("num_batches_tracked"))


@pytest.mark.parametrize(
    "kernel,stride,cin,cout,size", [(3, 1, 5, 7, 9), (3, 2, 6, 4, 10), (1, 2, 8, 3, 9), (7, 2, 3, 5, 17)]
)
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
def test_conv_and_its_gradients_match_torch_in_float64(kernel, stride, size):
    """conv2d lowers 1x1 kernels to a matmul and, on the CPU, computes kxk kernel
    gradients tap by tap (custom VJPs); output and both gradients must be torch's."""
    torch.manual_seed(3)
    x = torch.randn(2, 6, size, size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, kernel, kernel, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.conv2d(x, w, stride=stride, padding=kernel // 2)
    dy = torch.randn_like(y)
    y.backward(dy)
    with jax.enable_x64(True):
        x_j, w_j = jnp.asarray(nchw_to_nhwc(x.detach())), jnp.asarray(w.detach().numpy().transpose(2, 3, 1, 0))
        ours, vjp = jax.vjp(lambda a, k: conv2d(a, k, stride), x_j, w_j)
        dx, dw = jax.jit(vjp)(jnp.asarray(nchw_to_nhwc(dy)))
        assert ours.dtype == dx.dtype == dw.dtype == jnp.float64
    assert rel_err(ours, nchw_to_nhwc(y.detach())) < FLOAT64_TOL
    assert rel_err(dx, nchw_to_nhwc(x.grad)) < FLOAT64_TOL
    assert rel_err(dw, w.grad.numpy().transpose(2, 3, 1, 0)) < FLOAT64_TOL


BF16_TOL = 2.0**-7


def _bf16_valued(*shape: int) -> torch.Tensor:
    """float64 data that bfloat16 holds exactly, so rounding inputs is not the difference."""
    return torch.randn(*shape).to(torch.bfloat16).to(torch.float64).requires_grad_(True)


@pytest.mark.parametrize("kernel,stride,size", [(3, 1, 7), (3, 2, 8), (3, 2, 7), (1, 1, 5), (1, 2, 7)])
def test_bfloat16_conv_and_gradients_match_torch_float64(kernel, stride, size):
    """The CPU's bfloat16 lowering (tap-wise float32-accumulated matmuls for >= 256
    input channels, custom VJPs) computes torch's convolution and both gradients."""
    torch.manual_seed(4)
    x, w = _bf16_valued(2, 256, size, size), _bf16_valued(8, 256, kernel, kernel)
    y = torch.nn.functional.conv2d(x, w, stride=stride, padding=kernel // 2)
    dy = torch.randn_like(y).to(torch.bfloat16).to(torch.float64)
    y.backward(dy)
    bf = lambda a: jnp.asarray(np.asarray(a, np.float32), jnp.bfloat16)  # noqa: E731
    x_j, w_j = bf(nchw_to_nhwc(x.detach())), bf(w.detach().numpy().transpose(2, 3, 1, 0))
    fn = lambda a, k: jax.vjp(lambda a_, k_: conv2d(a_, k_, stride), a, k)  # noqa: E731
    ours, vjp = fn(x_j, w_j)
    dx, dw = vjp(bf(nchw_to_nhwc(dy)))
    assert ours.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    assert rel_err(ours.astype(jnp.float32), nchw_to_nhwc(y.detach())) < BF16_TOL
    assert rel_err(dx.astype(jnp.float32), nchw_to_nhwc(x.grad)) < BF16_TOL
    assert rel_err(dw.astype(jnp.float32), w.grad.numpy().transpose(2, 3, 1, 0)) < BF16_TOL
    # The forward really is matmuls on the CPU (XLA would convolve in float32).
    hlo = jax.jit(lambda a, k: conv2d(a, k, stride)).lower(x_j, w_j).compile().as_text()
    assert "convolution(" not in hlo


def test_bfloat16_conv_transpose_matches_torch_float64():
    torch.manual_seed(5)
    ref = torch.nn.ConvTranspose2d(16, 8, 2, stride=2, bias=False).double()
    with torch.no_grad():
        ref.weight.copy_(ref.weight.to(torch.bfloat16).double())
    x = _bf16_valued(2, 16, 3, 5).detach()
    layer = ConvTranspose2x2(8, dtype=jnp.bfloat16)
    variables = layer.init(jax.random.key(0), jnp.zeros((1, 3, 5, 16)))
    ported = _port_single(ref.float(), variables)
    ours = layer.apply(ported, jnp.asarray(nchw_to_nhwc(x), jnp.bfloat16))
    assert ours.dtype == jnp.bfloat16
    assert rel_err(ours.astype(jnp.float32), nchw_to_nhwc(ref.double()(x).detach())) < BF16_TOL


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
