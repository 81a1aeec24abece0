"""PatchDynamicConv2d against a naive reference: explicit patches, explicit per-patch kernels."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_kr.patch import PatchDynamicConv2d

CONFIGS = [
    # the autoencoder's encoder: 8×8 patches at stride 8
    {"in_channels": 3, "out_channels": 4, "kernel_size": 8, "stride": 8, "hidden": 5},
    # the autoencoder's decoder: 3×3 "same" convolution, deeper predictor stack
    {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 1, "hidden": (5, 7)},
    # rectangular kernel, uneven stride and padding, relu variant
    {
        "in_channels": 2,
        "out_channels": 3,
        "kernel_size": (2, 3),
        "stride": (1, 2),
        "padding": (1, 0),
        "hidden": 4,
        "variant": "relu",
    },
]


def randomised(conv: PatchDynamicConv2d) -> PatchDynamicConv2d:
    """Move scales and powers off their initial values so that every term is exercised."""
    with torch.no_grad():
        for layer in conv.predictor_layers:
            layer.scale.normal_()
            layer.power_logit.normal_()
    return conv


def naive_patch_dynamic_conv(conv: PatchDynamicConv2d, x: torch.Tensor) -> torch.Tensor:
    """The preprint, location by location: cut the patch, predict one kernel per output channel
    with that channel's own HybridDense stack, multiply the kernel with the patch and sum."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = conv.padding
    padded = F.pad(x, (pw, pw, ph, ph))
    out_h, out_w = conv.output_size(x.shape[-2:])
    out = torch.zeros(x.shape[0], conv.out_channels, out_h, out_w, dtype=x.dtype)
    for i in range(out_h):
        for j in range(out_w):
            patch = padded[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw]  # (B, C, kh, kw)
            flat = patch.reshape(x.shape[0], -1)
            for o in range(conv.out_channels):
                hidden = flat
                for layer in conv.predictor_layers:
                    z = hidden @ layer.weight[o].T + layer.bias[o]
                    s, p, eps = layer.scale[o], layer.power[o], layer.eps
                    z_base = z.clamp_min(0) if layer.variant == "relu" else z.abs()
                    hidden = torch.sign(z) * s * ((z_base + eps) ** p - eps**p)
                kernel = hidden @ conv.kernel_head[o].T  # (B, C·kh·kw): one kernel per patch
                out[:, o, i, j] = (kernel.view_as(patch) * patch).sum((1, 2, 3))
    return out + conv.similar_conv(x)


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_the_naive_reference(config):
    torch.manual_seed(0)
    conv = randomised(PatchDynamicConv2d(**config)).double()
    x = torch.randn(2, config["in_channels"], 16, 17, dtype=torch.double)
    expected = naive_patch_dynamic_conv(conv, x)
    torch.testing.assert_close(conv(x), expected, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # the in-place inference path
        torch.testing.assert_close(conv(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("config", CONFIGS[:2])
def test_gradients_match_the_naive_reference(config):
    torch.manual_seed(0)
    conv = randomised(PatchDynamicConv2d(**config)).double()
    x = torch.randn(1, config["in_channels"], 9, 16, dtype=torch.double, requires_grad=True)
    fast = torch.autograd.grad(conv(x).square().sum(), [x, *conv.parameters()])
    slow = torch.autograd.grad(
        naive_patch_dynamic_conv(conv, x).square().sum(), [x, *conv.parameters()]
    )
    for got, want in zip(fast, slow, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_predicted_kernels_times_patches_give_the_output():
    torch.manual_seed(0)
    conv = randomised(PatchDynamicConv2d(3, 4, 8, stride=8, hidden=5)).double()
    x = torch.randn(2, 3, 16, 24, dtype=torch.double)
    kernels = conv.predict_kernels(x)
    assert kernels.shape == (2, 2, 3, 4, 3, 8, 8)
    patches = x.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5)  # (B, H', W', C, 8, 8)
    dynamic = torch.einsum("bxygcij,bxycij->bgxy", kernels, patches)
    torch.testing.assert_close(dynamic + conv.similar_conv(x), conv(x))


def test_each_output_location_sees_only_its_own_patch():
    torch.manual_seed(0)
    conv = randomised(PatchDynamicConv2d(3, 4, 8, stride=8, hidden=5))
    x = torch.rand(1, 3, 32, 32)
    changed = x.clone()
    changed[:, :, 8:16, 16:24] += 1.0  # the block of output location (1, 2)
    difference = (conv(changed) - conv(x)).abs().sum(1)[0]
    assert difference[1, 2] > 0
    difference[1, 2] = 0
    assert (difference == 0).all()


class LargestTensor(TorchDispatchMode):
    """Record the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


@pytest.mark.parametrize("grad", [True, False])
def test_never_builds_the_batch_location_channel_kernel_tensor(grad):
    conv = PatchDynamicConv2d(3, 4, 8, stride=8, hidden=14)
    x = torch.rand(2, 3, 64, 64)
    kernels_numel = 2 * 8 * 8 * 4 * (3 * 8 * 8)  # B × L × out × C·k²
    with torch.set_grad_enabled(grad), LargestTensor() as largest:
        out = conv(x)
        if grad:
            out.sum().backward()
    assert largest.numel < kernels_numel / 4


def test_bfloat16_forward_and_backward_are_finite():
    torch.manual_seed(0)
    conv = randomised(PatchDynamicConv2d(4, 6, 3, padding=1, hidden=(5, 5)))
    x = torch.randn(2, 4, 8, 8) * 30
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())
    pure = conv.to(torch.bfloat16)(x.bfloat16())
    assert pure.dtype == torch.bfloat16
    assert torch.isfinite(pure).all()


def test_output_size_matches_conv2d():
    conv = PatchDynamicConv2d(3, 5, (3, 2), stride=(2, 3), padding=(1, 0), hidden=3)
    x = torch.rand(1, 3, 20, 23)
    assert conv(x).shape == conv.similar_conv(x).shape == (1, 5, *conv.output_size((20, 23)))


def test_zero_kernel_head_starts_as_the_similar_conv():
    conv = PatchDynamicConv2d(3, 4, 3, padding=1, hidden=6, kernel_head_gain=0.0)
    x = torch.rand(2, 3, 10, 10)
    torch.testing.assert_close(conv(x), conv.similar_conv(x))
