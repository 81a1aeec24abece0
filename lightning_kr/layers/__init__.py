"""KR building blocks: layers know nothing about models."""

from lightning_kr.layers.dynamic_conv import dynamic_conv2d, dynamic_linear, mix_candidates
from lightning_kr.layers.fft_stem import FFTStem, low_frequency_dft
from lightning_kr.layers.joint_head import JointHead
from lightning_kr.layers.kernel_generator import ATTENTION_KINDS, Attentions, KernelGenerator
from lightning_kr.layers.kr_conv1d import KRConv1d
from lightning_kr.layers.kr_conv2d import KRConv2d
from lightning_kr.layers.kr_conv3d import KRConv3d
from lightning_kr.layers.kr_layer import KRLayer
from lightning_kr.layers.kr_linear import KRLinear
from lightning_kr.layers.kr_multihead_attention import KRMultiheadAttention
from lightning_kr.layers.kr_window_attention import KRShiftedWindowAttention
from lightning_kr.layers.repr_chain import ReprChain

__all__ = [
    "ATTENTION_KINDS",
    "Attentions",
    "FFTStem",
    "JointHead",
    "KRConv1d",
    "KRConv2d",
    "KRConv3d",
    "KRLayer",
    "KRLinear",
    "KRMultiheadAttention",
    "KRShiftedWindowAttention",
    "KernelGenerator",
    "ReprChain",
    "dynamic_conv2d",
    "dynamic_linear",
    "low_frequency_dft",
    "mix_candidates",
]
