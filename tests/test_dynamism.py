"""What a dynamic layer is for: a task that only sample-specific kernels can solve.

Each image's target is the image convolved with one of two kernels, chosen by a global property of
that image (the sign of its mean on the first channel, which the layer's ``h = GAP(x)`` sees): a
shift by one position to the left for "positive" images, to the right for "negative" ones. A static
convolution can only learn the average of the two kernels, so its loss has a floor; a KR layer with
the library's defaults must generate each image its own kernel and fit the task to a small fraction
of that floor. The same for :class:`~lightning_kr.KRLinear` on tokens: the target keeps the first
half of the features of positive samples and the second half of negative ones.

These tests fail when the defaults leave the layers static (the dynamic-convolution issue: a KR
layer that learns only what a static one can). Fixed seeds, a few seconds each on a CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kr import KRConv1d, KRConv2d, KRConv3d, KRLinear

STEPS = 1500
FRACTION = 0.10  # KR's final loss must be at most this fraction of the static layer's
CHANNELS = 4
REPR_DIM = 8

# Modes with the attentions this task needs: spatial attention (1x: picks the tap of each shift)
# or kernel-number attention (4x: picks a candidate). DyConv 1x has no attention at all.
CONV_MODES = {
    "kr_1x": {"kernel_num": 1, "repr_dim": REPR_DIM},
    "kr_4x": {"kernel_num": 4, "repr_dim": REPR_DIM},
    "odconv_1x": {"kernel_num": 1, "repr_dim": 0},
    "odconv_4x": {"kernel_num": 4, "repr_dim": 0},
    "dyconv_4x": {"kernel_num": 4, "repr_dim": 0, "attentions": ("kernel",)},
}
# A linear layer has no spatial attention: channel / filter gates (1x) or candidates (4x).
LINEAR_MODES = CONV_MODES


def images(
    batch: int, spatial: tuple[int, ...], generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Noise images whose first channel is offset by ±1: (B, C, *spatial), sign (B,)."""
    x = torch.randn(batch, CHANNELS, *spatial, generator=generator)
    sign = torch.randint(0, 2, (batch,), generator=generator) * 2 - 1
    x[:, 0] += sign.view(-1, *([1] * len(spatial))).float()
    return x, sign


def shifted_target(x: Tensor, sign: Tensor) -> Tensor:
    """Each image shifted by one position along its last axis: left if ``sign > 0``, else right
    (zero filled), i.e. a 3-tap convolution whose tap depends on the image."""
    left = F.pad(x[..., 1:], (0, 1))
    right = F.pad(x[..., :-1], (1, 0))
    chosen = sign.view(-1, *([1] * (x.dim() - 1))) > 0
    return torch.where(chosen, left, right)


def fit(layer: nn.Module, batches: list[tuple[Tensor, Tensor]], d: bool) -> float:
    """Adam on the mean squared error; the mean loss of the last 20 steps."""
    optimizer = torch.optim.Adam(layer.parameters(), lr=3e-2)
    losses = []
    for x, target in batches:
        if d:
            y, _ = layer.forward_with_repr(x, torch.zeros(x.shape[0], REPR_DIM))
        else:
            y = (
                layer.forward_with_repr(x, None)[0]
                if hasattr(layer, "forward_with_repr")
                else layer(x)
            )
        loss = F.mse_loss(y, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses[-20:]) / 20


def conv_batches(spatial: tuple[int, ...]) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(STEPS):
        x, sign = images(16, spatial, generator)
        batches.append((x, shifted_target(x, sign)))
    return batches


CONV_CASES = {
    "1d": (KRConv1d, nn.Conv1d, (3,), 1, (24,)),
    "2d": (KRConv2d, nn.Conv2d, (1, 3), (0, 1), (8, 8)),
    "3d": (KRConv3d, nn.Conv3d, (1, 1, 3), (0, 0, 1), (3, 4, 6)),
}


@pytest.mark.parametrize("mode", CONV_MODES)
@pytest.mark.parametrize("dims", CONV_CASES)
def test_kr_convolution_fits_what_a_static_convolution_cannot(dims, mode):
    kr_type, static_type, kernel, padding, spatial = CONV_CASES[dims]
    batches = conv_batches(spatial)
    torch.manual_seed(0)
    static = static_type(CHANNELS, CHANNELS, kernel, padding=padding)
    static_loss = fit(static, batches, d=False)
    torch.manual_seed(0)
    options = CONV_MODES[mode]
    kr = kr_type(CHANNELS, CHANNELS, kernel, padding=padding, **options)
    kr_loss = fit(kr, batches, d=options["repr_dim"] > 0)
    assert static_loss > 0.2, f"the static floor is the averaged kernel's error; got {static_loss}"
    assert kr_loss <= FRACTION * static_loss, (
        f"{kr_type.__name__} ({mode}) reached {kr_loss:.4f}, static {static_loss:.4f}: the layer did "
        "not learn sample-specific kernels"
    )


def token_batches() -> list[tuple[Tensor, Tensor]]:
    """Tokens (B, N, C) offset by ±2 on feature 0 (the mean of 5 noisy tokens shows its sign); the
    target keeps half of the features."""
    generator = torch.Generator().manual_seed(0)
    features = 2 * CHANNELS
    batches = []
    for _ in range(STEPS):
        x = torch.randn(16, 5, features, generator=generator)
        sign = torch.randint(0, 2, (16,), generator=generator) * 2 - 1
        x[..., 0] += 2 * sign.view(-1, 1).float()
        keep = torch.zeros(16, 1, features)
        keep[sign > 0, :, : features // 2] = 1
        keep[sign < 0, :, features // 2 :] = 1
        batches.append((x, x * keep))
    return batches


@pytest.mark.parametrize("mode", LINEAR_MODES)
def test_kr_linear_fits_what_a_static_linear_cannot(mode):
    batches = token_batches()
    torch.manual_seed(0)
    static_loss = fit(nn.Linear(2 * CHANNELS, 2 * CHANNELS), batches, d=False)
    torch.manual_seed(0)
    options = LINEAR_MODES[mode]
    kr = KRLinear(2 * CHANNELS, 2 * CHANNELS, **options)
    kr_loss = fit(kr, batches, d=options["repr_dim"] > 0)
    assert static_loss > 0.2
    assert kr_loss <= FRACTION * static_loss, (
        f"KRLinear ({mode}) reached {kr_loss:.4f}, static {static_loss:.4f}: the layer did not "
        "learn sample-specific kernels"
    )
