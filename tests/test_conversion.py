"""The four steps of kr_convert on their own: probe, decide, create, and the batch layouts."""

import pytest
import torch
from torch import nn

from lightning_kr import KRConfig, kr_convert
from lightning_kr.conversion.create import FACTORIES, create
from lightning_kr.conversion.decide import Targets, decide
from lightning_kr.conversion.probe import probe
from lightning_kr.conversion.targets import matches
from lightning_kr.layers import KRConv1d, KRConv2d, KRConv3d, KRLinear, ReprChain
from lightning_kr.layers.repr_chain import rows_to_samples


class TwoViews(nn.Module):
    """Like RAFT: a shared encoder on two images stacked on the batch, heads that see rows per
    sample (``interleaved``), and a layer whose input has no batch."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.encoder = nn.Conv2d(8, 8, 3, padding=1)
        self.per_row = nn.Linear(8, 8)
        self.no_batch = nn.Linear(4, 4)
        self.unused = nn.Linear(8, 8)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, first, second):
        batch = first.shape[0]
        features = self.encoder(self.stem(torch.cat([first, second])))  # (2B, 8, H, W)
        a, b = features.split(batch)
        rows = self.per_row(a.flatten(2).transpose(1, 2).reshape(-1, 8))  # (B·H·W, 8), per sample
        a = a + rows.view(batch, -1, 8).transpose(1, 2).view_as(a)
        _ = self.no_batch(torch.randn(3, 4))
        return [self.out(torch.cat([a, b], 1))]


def test_probe_records_calls_entry_and_layouts():
    model = TwoViews()
    args = (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    modules = {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    seen = probe(model, args, modules, (nn.Conv2d, nn.Linear))
    assert seen.samples == 2 and seen.entry == "stem" and seen.entry_input_shape == (4, 3, 4, 4)
    assert list(seen.calls) == ["stem", "encoder", "per_row", "no_batch", "out"]
    assert seen.calls["encoder"].layout == "stacked" and seen.batch_multiple("encoder") == 2
    assert seen.calls["per_row"].layout == "interleaved" and seen.batch_multiple("per_row") == 16
    assert seen.batch_multiple("no_batch") is None
    assert seen.num_classes is None and seen.output_type == "list"


def test_decide_is_a_pure_function_of_what_the_probe_saw():
    model = TwoViews()
    args = (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    modules = {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    seen = probe(model, args, modules, (nn.Conv2d, nn.Linear))

    def reason(name, targets=None):
        module, calls = model.get_submodule(name), seen.calls.get(name)
        return decide(name, module, calls, seen, targets or Targets(), None)

    assert "first layer" in reason("stem").reason
    assert reason("encoder").reason is None and reason("per_row").reason is None
    assert "does not carry the batch" in reason("no_batch").reason
    assert "never called" in reason("unused").reason
    assert reason("encoder", Targets(exclude=["encoder"])).reason == "matched by exclude"
    assert reason("encoder", Targets(include="out")).reason == "not matched by include"
    filtered = reason("encoder", Targets(filter_fn=lambda name, module: False))
    assert filtered.reason == "filter_fn returned False"
    transposed = decide("up", nn.ConvTranspose2d(2, 2, 2), None, seen, Targets(), None)
    assert transposed.unsupported and "transposed" in transposed.reason


def test_create_has_one_row_per_layer_type():
    config = KRConfig(kernel_num=2)
    for static, kr_type in [
        (nn.Conv1d(4, 6, 3), KRConv1d),
        (nn.Conv2d(4, 6, 3), KRConv2d),
        (nn.Conv3d(4, 6, 3), KRConv3d),
        (nn.Linear(4, 6), KRLinear),
    ]:
        assert type(static) in FACTORIES
        layer = create(static, config)
        assert isinstance(layer, kr_type) and layer.kernel_num == 2

    class OwnForward(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Conv2d(3, 4, 3), OwnForward(4, 4, 3), nn.Conv2d(4, 4, 3))
    report = kr_convert(model, input_size=16).report
    assert "its own forward" in next(d.reason for d in report.skipped if d.name == "1")


def test_targets_follow_peft():
    assert matches("layer1.0.conv1", ["conv1"]) and not matches("layer1.0.conv10", ["conv1"])
    assert matches("layer1.0.conv1", r"layer1\..*") and not matches("layer2.0.conv1", r"layer1\..*")
    assert not matches("anything", None)


def test_config_and_overrides():
    config = KRConfig(kernel_num=4, exclude=["fc"])
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3))
    converted = kr_convert(model, config, repr_dim=8, input_size=16)
    assert converted.config.kernel_num == 4 and converted.config.repr_dim == 8
    assert converted.config.exclude == ("fc",)
    with pytest.raises(TypeError, match="unknown KR option"):
        kr_convert(model, kernel_number=4)


def test_chain_gives_every_row_its_samples_d_and_averages_back():
    d = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    chain = ReprChain()
    with chain.run(d):
        stacked = chain.read("a", 4, "stacked")
        interleaved = chain.read("b", 6, "interleaved")
        torch.testing.assert_close(stacked, torch.tensor([[1.0, 1], [3, 3], [1, 1], [3, 3]]))
        torch.testing.assert_close(interleaved[:3], d[:1].expand(3, 2))
        chain.write(torch.arange(8.0).view(4, 2), "stacked")
        torch.testing.assert_close(chain.read("c", 2), torch.tensor([[2.0, 3], [4, 5]]))
        with pytest.raises(RuntimeError, match="batch size 3"):
            chain.read("d", 3)
    rows = torch.arange(12.0).view(6, 2)
    torch.testing.assert_close(rows_to_samples(rows, 2, "interleaved"), rows.view(2, 3, 2).mean(1))


def test_two_views_model_converts_trains_and_keeps_samples_apart():
    model = kr_convert(TwoViews(), example_input=(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)))
    assert model.backbone.encoder.batch_layout == "stacked"
    assert model.backbone.per_row.batch_layout == "interleaved"
    assert model.head is None and model.stem_on == "stem"
    first, second = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    model.train()
    model(first, second)[0].sum().backward()
    untrained = {n.split(".")[1] for n, p in model.named_parameters() if p.grad is None}
    assert untrained == {"no_batch", "unused"}  # static, and not on the output's path
    model.eval()
    with torch.no_grad():
        out = model(first, second)[0]
        other = second.clone()
        other[2] = torch.randn(3, 8, 8)
        changed = model(first, other)[0]
    torch.testing.assert_close(out[:2], changed[:2])


def test_to_static_drops_the_stem_hook_and_computes_the_original():
    original = TwoViews().eval()
    args = (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8))
    model = kr_convert(original, example_input=args).eval()
    static = model.to_static().eval()
    assert type(static.encoder) is nn.Conv2d and not static.stem._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(static(*args)[0], original(*args)[0])
        torch.testing.assert_close(model(*args)[0], original(*args)[0], rtol=1e-4, atol=1e-5)
