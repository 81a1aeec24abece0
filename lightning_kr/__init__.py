"""lightning-kr: dynamic convolution with Kernel Representation (KR) for PyTorch Lightning."""

from lightning_kr.classifier import KRClassifier
from lightning_kr.config import KRConfig
from lightning_kr.convert import kr_convert
from lightning_kr.diagnostics import AttentionStatistics, attention_statistics
from lightning_kr.fuse_batchnorm import fuse_batchnorm
from lightning_kr.kr_model import KRModel
from lightning_kr.layers import (
    FFTStem,
    JointHead,
    KernelGenerator,
    KRConv1d,
    KRConv2d,
    KRConv3d,
    KRLinear,
    KRMultiheadAttention,
    KRShiftedWindowAttention,
    ReprChain,
)
from lightning_kr.loss_scale import set_loss_scale
from lightning_kr.report import ConversionReport

__version__ = "0.1.0"

__all__ = [
    "AttentionStatistics",
    "ConversionReport",
    "FFTStem",
    "JointHead",
    "KRClassifier",
    "KRConfig",
    "KRConv1d",
    "KRConv2d",
    "KRConv3d",
    "KRLinear",
    "KRModel",
    "KRMultiheadAttention",
    "KRShiftedWindowAttention",
    "KernelGenerator",
    "ReprChain",
    "attention_statistics",
    "fuse_batchnorm",
    "kr_convert",
    "set_loss_scale",
]
