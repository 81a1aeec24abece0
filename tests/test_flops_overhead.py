"""MAC counting (``count_macs`` / ``count_overhead``) and the ``FlopsOverhead`` callback."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode, flop_registry
from torchvision.models import VisionTransformer, resnet18

from lightning_kr import kr_convert
from lightning_kr.callbacks import FlopsOverhead, MacCount, count_macs, count_overhead
from lightning_kr.callbacks.mac_count import static_counterpart
from lightning_kr.layers.dynamic_conv import STRATEGIES

# The operators torch.utils.flop_counter.FlopCounterMode counts on CPU (2 flops per multiply-add).
# CPU attention (scaled_dot_product_attention's flash kernel for CPU) is counted by the torch
# versions that register a formula for it (2.15 does, 2.14 does not); compare it only there.
CPU_ATTENTION_COUNTED = any(
    str(op) == "aten._scaled_dot_product_flash_attention_for_cpu" for op in flop_registry
)
SHARED_OPS = {"conv", "linear", "addmm", "matmul", "mm", "bmm", "baddbmm", "einsum", "dot"} | (
    {"scaled_dot_product_attention"} if CPU_ATTENTION_COUNTED else set()
)


def tiny_cnn(num_classes: int = 4) -> nn.Sequential:
    """Layers of every shape the KR strategies tell apart: large and small maps, stride 2,
    depthwise, 1×1, and a hidden linear layer (first conv and classifier stay static)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, num_classes),
    )


def tiny_vit() -> nn.Module:
    return VisionTransformer(
        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=4,
    )  # fmt: skip


def shared_macs(model: nn.Module, x: torch.Tensor) -> tuple[MacCount, int, float]:
    """(our count, our MACs on the shared operators, FlopCounterMode's flops / 2)."""
    counted = count_macs(model, x)
    with torch.no_grad(), FlopCounterMode(display=False) as reference:
        model.eval()(x)
    assert counted.unsupported == {}, "every operator of the KR model has a handle"
    ours = sum(v for op, v in counted.by_operator.items() if op in SHARED_OPS)
    return counted, ours, reference.get_total_flops() / 2


@pytest.mark.parametrize(
    ("strategy", "kernel_num"),
    [
        ("auto", 1),
        ("auto", 4),
        *((s, 4) for s in ("grouped", "unfold", "reference") if s in STRATEGIES),
    ],
)
def test_contractions_agree_with_torch_flop_counter(strategy, kernel_num):
    """Convolutions and matrix products: fvcore with our handles == FlopCounterMode / 2.

    A batch of 2 exercises broadcast ``matmul`` (im2col columns against a shared kernel), which
    fvcore's default handle undercounts, and ``groups = B`` convolutions.
    """
    model = kr_convert(tiny_cnn(), kernel_num=kernel_num, input_size=20, strategy=strategy)
    _, ours, reference = shared_macs(model, torch.randn(2, 3, 20, 20))
    assert ours == pytest.approx(reference, rel=1e-6)


def test_contractions_agree_on_attention_models():
    model = kr_convert(tiny_vit(), kernel_num=2, input_size=16, fft_size=2)
    _, ours, reference = shared_macs(model, torch.randn(2, 3, 16, 16))
    assert ours == pytest.approx(reference, rel=1e-6)


@pytest.fixture(scope="module")
def kr_resnet():
    torch.manual_seed(0)
    return kr_convert(resnet18(num_classes=10), kernel_num=4, input_size=32)


class BroadcastMatmul(nn.Module):
    def forward(self, cols):  # one kernel (g, C_out/g, K) against every sample's columns
        return torch.matmul(torch.ones(2, 3, 5), cols)


def test_broadcast_matmul_counts_every_sample():
    """fvcore's own matmul handle counts prod(first operand) · L and misses the batch here."""
    counted = count_macs(BroadcastMatmul(), torch.randn(4, 2, 5, 7))
    assert counted.by_operator["matmul"] == 4 * 2 * 3 * 5 * 7


def test_static_resnet18_is_fvcores_figure():
    counted = count_macs(resnet18(), torch.randn(1, 3, 224, 224))
    assert counted.gmacs == pytest.approx(1.82, abs=0.005)
    assert counted.by_operator["conv"] == 1_813_561_344
    assert counted.unsupported == {}
    assert counted.params == sum(p.numel() for p in resnet18().parameters())


def test_resnet18_overhead_covers_every_kr_part(kr_resnet):
    x = torch.randn(1, 3, 64, 64)  # layer4 on 2×2 maps, where every tap of its kernels is live
    overhead = count_overhead(kr_resnet, x)
    with torch.no_grad(), FlopCounterMode(display=False) as reference:
        kr_resnet.eval()(x)
    shared = sum(v for op, v in overhead.kr.by_operator.items() if op in SHARED_OPS)
    assert shared * 2 == pytest.approx(reference.get_total_flops(), rel=1e-6)
    assert overhead.kr.unsupported == {} and overhead.static.unsupported == {}
    kr = overhead.kr.by_module
    assert kr["stem"] > 0 and kr["head"] > 0  # FFT stem, joint head
    rows = {row.name: row for row in overhead.layers}
    assert len(rows) == 19 + 2
    conv = rows["layer4.1.conv2"]
    # Attention, fusion and representation (the generator) and applying 4 candidates of 512·512·9
    # weights (on 2×2 maps: the convolution with every candidate, 4 · 4 positions, instead of
    # mixing per-sample kernels) are all counted on top of the static convolution.
    assert conv.generator_macs > 0
    assert conv.added_macs - conv.generator_macs >= 3 * 4 * 512 * 512 * 9
    assert overhead.kr.total - overhead.static.total == sum(r.added_macs for r in overhead.layers)
    assert overhead.overhead_pct > 0
    assert overhead.table(3).caption.endswith("Every operator counted.")


def test_model_without_kr_layers_has_zero_overhead():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    overhead = count_overhead(model, torch.zeros(1, 3, 8, 8))
    assert overhead.overhead_pct == 0.0
    assert overhead.kr.total == overhead.static.total == 8 * 27 * 36 + 8 * 36 * 2


def test_static_counterpart_is_temporary():
    kr = kr_convert(tiny_cnn(), input_size=20)
    holder = nn.ModuleDict({"net": kr})
    with static_counterpart(holder) as static:
        assert type(static.net[1]) is nn.Conv2d
    assert holder.net is kr


def test_counting_restores_every_modules_mode():
    model = kr_convert(tiny_cnn(), input_size=20).train()
    model.backbone[4].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    count_macs(model, torch.randn(1, 3, 20, 20))
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()


class Cumulative(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=-1).flatten(1)


def test_unsupported_operators_are_listed():
    counted = count_macs(Cumulative(), torch.randn(1, 3, 4, 4))
    assert counted.unsupported == {"aten::cumsum": 1}


class Classifier(pl.LightningModule):
    """A plain LightningModule around a converted model (not KRClassifier)."""

    def __init__(self, example: bool = True, extra: nn.Module | None = None) -> None:
        super().__init__()
        self.net = kr_convert(tiny_cnn(), input_size=20)
        self.extra = extra
        if example:
            self.example_input_array = torch.zeros(2, 3, 20, 20)

    def forward(self, x):
        logits = self.net(x)
        return logits if self.extra is None else logits + self.extra(x).sum(1, keepdim=True)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(module: pl.LightningModule, tmp_path, callback: FlopsOverhead) -> dict[str, float]:
    """Fit one step; the metrics written to the CSV log, and those left in callback_metrics."""
    data = TensorDataset(torch.randn(4, 3, 20, 20), torch.tensor([0, 1, 2, 3]))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=CSVLogger(tmp_path),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=4))
    (path,) = tmp_path.glob("lightning_logs/version_0/metrics.csv")
    with path.open() as f:
        logged = {k: float(v) for row in csv.DictReader(f) for k, v in row.items() if v}
    for key in ("flops/kr_gmacs", "params/kr_m"):
        assert float(trainer.callback_metrics[key]) == pytest.approx(logged[key], rel=1e-6)
    return logged


def test_callback_logs_the_overhead_and_prints_the_table(tmp_path, capsys):
    module = Classifier()
    callback = FlopsOverhead(top_n=3)
    metrics = _fit(module, tmp_path, callback)
    expected = count_overhead(module, torch.zeros(1, 3, 20, 20))
    assert metrics["flops/static_gmacs"] == pytest.approx(expected.static.gmacs, rel=1e-6)
    assert metrics["flops/kr_gmacs"] == pytest.approx(expected.kr.gmacs, rel=1e-6)
    assert metrics["flops/overhead_pct"] == pytest.approx(expected.overhead_pct, rel=1e-6)
    assert metrics["params/kr_m"] == pytest.approx(expected.kr.params / 1e6)
    assert metrics["params/static_m"] == pytest.approx(expected.static.params / 1e6)
    assert callback.result.kr.total == expected.kr.total
    printed = capsys.readouterr().out
    assert "KR overhead" in printed and "FFTStem" in printed


def test_callback_lists_unsupported_operators(tmp_path):
    module = Classifier(extra=Cumulative())
    with pytest.warns(UserWarning, match=r"aten::cumsum"):
        _fit(module, tmp_path, FlopsOverhead(input_size=20, print_table=False))


def test_input_size_or_example_input_is_required(tmp_path):
    with pytest.raises(MisconfigurationException, match="example_input_array"):
        _fit(Classifier(example=False), tmp_path, FlopsOverhead())
    with pytest.raises(MisconfigurationException, match="input_size"):
        FlopsOverhead(input_size=(3, 0))
    with pytest.raises(MisconfigurationException, match="no such submodule"):
        _fit(Classifier(), tmp_path, FlopsOverhead(module="backbone"))


@pytest.mark.slow
def test_resnet18_224_figures():
    """The figures of the speed issue: resnet18, input 1×3×224×224."""
    x = torch.randn(1, 3, 224, 224)
    gmacs = {}
    for mode, n in (("kr", 1), ("kr", 4), ("odconv", 1), ("odconv", 4)):
        overhead = count_overhead(kr_convert(resnet18(), kernel_num=n, mode=mode), x)
        assert overhead.static.gmacs == pytest.approx(1.82, abs=0.005)
        assert overhead.kr.unsupported == {}
        gmacs[mode, n] = overhead.kr.gmacs
    assert 1.82 < gmacs["odconv", 1] < gmacs["kr", 1] < 1.86
    assert gmacs["kr", 1] < gmacs["odconv", 4] < gmacs["kr", 4] < 1.95
