import pytest
import torch

from lightning_kr.layers import FFTStem, low_frequency_dft


@pytest.mark.parametrize("size", [(32, 32), (17, 24)])
def test_low_frequency_dft_equals_rfft2(size):
    x = torch.randn(2, 3, *size, dtype=torch.double)
    f = 4
    real, imag = low_frequency_dft(x, f)
    full = torch.fft.rfft2(x, norm="forward")
    rows = torch.arange(-(f - 1), f) % size[0]
    want = full[:, :, rows, :f]
    torch.testing.assert_close(real, want.real)
    torch.testing.assert_close(imag, want.imag)


def test_stem_shapes_gradients_and_sizes():
    stem = FFTStem(3, repr_dim=16, freq_size=4)
    x = torch.randn(2, 3, 64, 48, requires_grad=True)
    d0 = stem(x)
    assert d0.shape == (2, 16)
    d0.sum().backward()
    assert stem.proj.weight.grad.abs().sum() > 0
    assert stem(torch.randn(1, 3, 224, 224)).shape == (1, 16)


def test_stem_sees_global_layout():
    stem = FFTStem(3, repr_dim=8)
    left = torch.zeros(1, 3, 32, 32)
    left[..., :16] = 1
    right = left.flip(-1)
    assert not torch.allclose(stem(left), stem(right))


def test_stem_errors():
    stem = FFTStem(3, repr_dim=8, freq_size=4)
    with pytest.raises(ValueError, match="at least 7x7"):
        stem(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        stem(torch.randn(1, 1, 32, 32))
