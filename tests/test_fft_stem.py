import pytest
import torch

from lightning_kr.layers import FFTStem, low_frequency_dft
from lightning_kr.layers.fft_stem import low_frequency_dft3d


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


@pytest.mark.parametrize("size", [(8, 16, 16), (5, 9, 12)])
def test_low_frequency_dft3d_equals_fftn(size):
    x = torch.randn(2, 3, *size, dtype=torch.double)
    f, f_t = 4, 3
    real, imag = low_frequency_dft3d(x, f, f_t)
    full = torch.fft.fftn(x, dim=(-3, -2, -1), norm="forward")
    frames = torch.arange(-(f_t - 1), f_t) % size[0]
    rows = torch.arange(-(f - 1), f) % size[1]
    want = full[:, :, frames][:, :, :, rows][..., :f]  # the rfft half on the last axis
    assert real.shape == (2, 3, 2 * f_t - 1, 2 * f - 1, f)
    torch.testing.assert_close(real, want.real)
    torch.testing.assert_close(imag, want.imag)


def test_video_stem_has_the_same_features_for_any_number_of_frames():
    stem = FFTStem(3, repr_dim=16, freq_size=4, time_freq=2)
    assert stem.proj.in_features == 2 * 3 * 3 * 7 * 4
    x = torch.randn(2, 3, 8, 16, 16, requires_grad=True)
    stem(x).sum().backward()
    assert x.grad.abs().sum() > 0
    assert stem(torch.randn(1, 3, 3, 7, 7)).shape == (1, 16)
    assert stem(torch.randn(1, 3, 16, 32, 24)).shape == (1, 16)


def test_video_stem_sees_motion():
    stem = FFTStem(1, repr_dim=8, freq_size=2, time_freq=2)
    video = torch.zeros(1, 1, 8, 16, 16)
    for t in range(8):  # a bar moving right
        video[..., t, :, 2 * t] = 1
    assert not torch.allclose(stem(video), stem(video.flip(2)))


def test_video_stem_errors():
    stem = FFTStem(3, repr_dim=8, freq_size=4, time_freq=3)
    with pytest.raises(ValueError, match="at least 5 frames; got T=4"):
        stem(torch.randn(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\).*use time_freq=0"):
        stem(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="at least 7x7"):
        stem(torch.randn(1, 3, 8, 5, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*pass time_freq > 0"):
        FFTStem(3)(torch.randn(1, 3, 8, 16, 16))
