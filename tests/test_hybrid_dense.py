"""HybridDense: the signed learned power, its bounds, its gradients, and that ``s`` and ``p`` learn."""

import pytest
import torch
import torch.nn.functional as F

from lightning_kr.patch import HybridDense, hybrid_activation, hybrid_activation_dot


def preprint_formula(z, scale, power, eps):
    """``sign(z) · s · ((|z| + eps) ** p - eps ** p)``, written out."""
    return torch.sign(z) * scale * ((z.abs() + eps) ** power - eps**power)


def randomised(layer: HybridDense) -> HybridDense:
    with torch.no_grad():
        layer.scale.normal_()
        layer.power_logit.normal_()
    return layer


def test_output_is_the_signed_scaled_power_of_the_linear_map():
    torch.manual_seed(0)
    layer = randomised(HybridDense(6, 5)).double()
    x = torch.randn(4, 6, dtype=torch.double)
    z = x @ layer.weight.T + layer.bias
    expected = preprint_formula(z, layer.scale, layer.power, layer.eps)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_relu_variant_is_zero_for_negative_z_and_the_power_above():
    torch.manual_seed(0)
    layer = randomised(HybridDense(6, 5, variant="relu")).double()
    x = torch.randn(64, 6, dtype=torch.double)
    z = x @ layer.weight.T + layer.bias
    positive = layer.scale * ((z + layer.eps) ** layer.power - layer.eps**layer.power)
    expected = torch.where(z > 0, positive, torch.zeros_like(z))
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert (layer(x)[z <= 0] == 0).all()


def test_power_one_and_scale_one_is_the_linear_map():
    layer = HybridDense(3, 4, power_init=1.0)
    x = torch.randn(10, 3)
    torch.testing.assert_close(
        layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5
    )


def test_power_stays_inside_its_range_whatever_the_logit():
    layer = HybridDense(3, 4, power_range=(0.5, 3.0))
    with torch.no_grad():
        layer.power_logit.copy_(torch.tensor([-1e4, -3.0, 3.0, 1e4]))
    assert ((layer.power >= 0.5) & (layer.power <= 3.0)).all()
    assert torch.isfinite(layer(torch.randn(5, 3) * 1e3)).all()


def test_activation_is_continuous_and_zero_at_zero():
    layer = HybridDense(1, 1, power_range=(0.5, 3.0), power_init=0.6)
    z = torch.tensor([-1e-6, 0.0, 1e-6]).view(3, 1)
    out = layer.activation(z).flatten()
    assert out[1] == 0
    assert out.abs().max() < 1e-3
    assert out[0] == -out[2]


@pytest.mark.parametrize("power_init", [0.51, 1.0, 2.9])
def test_gradients_are_finite_at_and_near_zero(power_init):
    layer = HybridDense(1, 1, power_init=power_init)
    z = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8, 1e-3, 10.0]).view(-1, 1)
    z.requires_grad_(True)
    layer.activation(z).sum().backward()
    for grad in (z.grad, layer.scale.grad, layer.power_logit.grad):
        assert torch.isfinite(grad).all()
    # the analytic slope s·p·(|z| + eps) ** (p - 1): finite at 0 because the base is >= eps
    slope = layer.scale.abs() * layer.power * (z.detach().abs() + layer.eps) ** (layer.power - 1)
    assert (z.grad.abs() <= slope * (1 + 1e-5)).all()


def test_gradcheck_in_double_away_from_zero():
    torch.manual_seed(0)
    layer = randomised(HybridDense(3, 2)).double()
    x = torch.randn(5, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_bfloat16_is_finite_with_float32_powers():
    torch.manual_seed(0)
    layer = HybridDense(8, 8, power_init=2.9)
    x = torch.cat([torch.randn(4, 8) * 1e4, torch.randn(4, 8) * 1e-4, torch.zeros(1, 8)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    pure = layer.to(torch.bfloat16)(x.bfloat16())
    assert pure.dtype == torch.bfloat16
    assert torch.isfinite(pure).all()


def test_scale_and_power_move_under_an_optimiser():
    torch.manual_seed(0)
    layer = HybridDense(1, 1)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.zero_()
    scale, power = layer.scale.item(), layer.power.item()
    z = torch.linspace(-2, 2, 101).view(-1, 1)
    target = 0.5 * torch.sign(z) * z.abs() ** 2
    optimizer = torch.optim.Adam([layer.scale, layer.power_logit], lr=0.05)
    first_loss = None
    for _ in range(200):
        loss = F.mse_loss(layer(z), target)
        first_loss = first_loss or loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first_loss
    assert abs(layer.power.item() - power) > 0.5
    assert abs(layer.scale.item() - scale) > 0.2


def test_num_predictors_are_independent_dense_layers():
    torch.manual_seed(0)
    grouped = randomised(HybridDense(5, 3, num_predictors=4))
    x = torch.randn(2, 7, 4, 5)
    out = grouped(x)
    assert out.shape == (2, 7, 4, 3)
    for g in range(4):
        single = HybridDense(5, 3)
        with torch.no_grad():
            for name in ("weight", "bias", "scale", "power_logit"):
                getattr(single, name).copy_(getattr(grouped, name)[g])
        torch.testing.assert_close(out[:, :, g], single(x[:, :, g]))


def test_rejects_a_power_init_outside_the_range():
    with pytest.raises(ValueError, match="power_init"):
        HybridDense(2, 2, power_range=(0.5, 3.0), power_init=4.0)


@pytest.mark.parametrize("variant", ["signed", "relu"])
def test_fused_activation_dot_matches_autograd_and_gradcheck(variant):
    z = torch.randn(2, 3, 4, 5, dtype=torch.double, requires_grad=True)
    q = torch.randn(2, 3, 4, 5, dtype=torch.double, requires_grad=True)
    power = (0.5 + 2.5 * torch.rand(3, 4, 1, dtype=torch.double)).requires_grad_()
    fused = hybrid_activation_dot(z, q, power, 1e-3, variant, dim=2)
    plain = (hybrid_activation(z, None, power, 1e-3, variant) * q).sum(2)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda z, q, p: hybrid_activation_dot(z, q, p, 1e-3, variant, dim=2), (z, q, power)
    )


def test_fused_activation_dot_is_finite_in_bfloat16_at_zero():
    z = torch.tensor([[0.0, -0.0, 1e-30, 3e4]], dtype=torch.bfloat16, requires_grad=True)
    q = torch.ones_like(z, requires_grad=True)
    power = torch.tensor([0.5, 1.0, 2.0, 3.0], requires_grad=True)
    out = hybrid_activation_dot(z, q, power, 1e-3, dim=-1)
    out.sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert all(torch.isfinite(t.grad).all() for t in (z, q, power))
