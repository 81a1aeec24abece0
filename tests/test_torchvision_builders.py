"""kr_convert on every torchvision builder: one training step each, every parameter trained.

CI runs one builder of each family at a small input and the classic classifiers at 224²; the slow
suite runs all 121 at their standard input (recipes/torchvision_builders.py says which).
"""

import pytest
import torch
from torchvision.models import get_model

from lightning_kr import kr_convert
from lightning_kr.layers import (
    KRConv2d,
    KRConv3d,
    KRLinear,
    KRShiftedWindowAttention,
)
from recipes.torchvision_builders import (
    build,
    builders,
    convert_and_train_step,
    example,
    family_of,
    small_size,
    standard_size,
)

REPRESENTATIVE = [
    "resnet18", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
    "efficientnet_v2_s", "convnext_tiny", "regnet_y_400mf", "densenet121", "shufflenet_v2_x0_5",
    "mnasnet0_5", "googlenet", "inception_v3", "vgg11_bn", "alexnet", "maxvit_t", "vit_b_32",
]  # fmt: skip
ONE_PER_FAMILY = [
    "fcn_resnet50", "lraspp_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn",
    "ssdlite320_mobilenet_v3_large", "r3d_18", "swin3d_t", "raft_small", "quantized_resnet18",
]  # fmt: skip
CLASSIC_AT_224 = [
    # VGG-16's step at 224² costs 30 s on 2 cores; -m slow runs it (with every builder), and
    # vgg11_bn stands for the family above.
    pytest.param("vgg16", marks=pytest.mark.slow),
    "squeezenet1_1",
    "resnet50",
    "swin_t",
]


def assert_trains_and_converts(name: str, size: tuple[int, ...]) -> None:
    """One training step after kr_convert: probed in training mode, every trainable parameter has
    a finite gradient, and ≥ 90 % (classifiers) / 75 % (others) of Conv/Linear layers are KR."""
    result = convert_and_train_step(name, size)
    assert result["probe_mode"] == "train", result
    assert not result["untrained"], f"{name}: no gradient for {result['untrained'][:5]}"
    assert result["finite_gradients"]
    target = 0.9 if result["joint_head"] else 0.75
    assert result["kr_fraction"] >= target, (name, result["kr_fraction"], result["skipped"])


@pytest.mark.parametrize("name", REPRESENTATIVE + ONE_PER_FAMILY)
def test_builders_train_one_step(name):
    assert_trains_and_converts(name, small_size(name))


@pytest.mark.parametrize("name", CLASSIC_AT_224)
def test_classic_classifiers_at_224(name):
    assert_trains_and_converts(name, (224, 224))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(builders()))
def test_every_builder_at_its_standard_input(name):
    assert_trains_and_converts(name, standard_size(name))


def test_there_are_121_builders_in_six_families():
    families = builders()
    assert len(families) == 121
    assert {family_of(n) for n in ONE_PER_FAMILY} == set(families.values()) - {"classification"}


def test_detection_converts_the_backbone_and_keeps_proposal_heads_static():
    static = build("fasterrcnn_mobilenet_v3_large_320_fpn")
    args = example("fasterrcnn_mobilenet_v3_large_320_fpn", (320, 320))
    model = kr_convert(static, example_input=args)
    skipped = {d.name: d.reason for d in model.report.skipped}
    assert "not the samples in a fixed layout" in skipped["roi_heads.box_head.fc6"]
    assert isinstance(model.backbone.rpn.head.conv[0][0], KRConv2d)
    assert model.head is None and "no joint head" in model.report.notes[0]
    # d_0 comes from the images the backbone sees: normalised and batched by the transform.
    assert model.stem_on == model.report.first_layer
    losses = model(*args)
    assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_objectness"}
    model.eval()
    with torch.no_grad():
        detections = model(args[0])
    assert len(detections) == 2 and "boxes" in detections[0]


def test_segmentation_returns_its_dict_and_converts_the_classifier_convs():
    static = build("fcn_resnet50")
    model = kr_convert(static, input_size=64)
    out = model(torch.randn(2, 3, 64, 64))
    assert out["out"].shape == (2, 21, 64, 64)
    assert isinstance(model.backbone.classifier[4], KRConv2d)
    assert model.head is None


def test_optical_flow_stacked_frames_take_each_samples_d():
    args = example("raft_small", (128, 128))
    model = kr_convert(build("raft_small"), example_input=args)
    encoder_conv = model.backbone.feature_encoder.convnormrelu[0]
    assert not isinstance(encoder_conv, KRConv2d)  # the first layer
    stacked = model.backbone.feature_encoder.layer1[0].convnormrelu1[0]
    assert isinstance(stacked, KRConv2d) and stacked.batch_layout == "stacked"
    assert model.stem_on == "feature_encoder.convnormrelu.0"
    # Each pair gets its own d: the flow of pair 0 does not depend on pair 1.
    model.eval()
    with torch.no_grad():
        flows = model(*args)[-1]
        changed = model(args[0], torch.cat([args[1][:1], torch.randn(1, 3, 128, 128)]))[-1]
    torch.testing.assert_close(flows[0], changed[0])


def test_video_models_use_kr_conv3d_and_a_spatio_temporal_stem():
    model = kr_convert(build("r3d_18"), input_size=(4, 64, 64))
    assert isinstance(model.backbone.layer1[0].conv1[0], KRConv3d)
    assert model.stem.time_freq > 0
    assert model(torch.randn(2, 3, 4, 64, 64)).shape == (2, 400)


def test_mvit_pooling_per_head_takes_its_samples_d():
    model = kr_convert(build("mvit_v2_s"), input_size=(16, 224, 224))
    one_head = model.backbone.blocks[0].attn.pool_k.pool  # stage 1: one head
    two_heads = model.backbone.blocks[1].attn.pool_k.pool  # stage 2: two heads, rows (B·2, ...)
    assert isinstance(one_head, KRConv3d) and one_head.batch_layout == "batch"
    assert isinstance(two_heads, KRConv3d) and two_heads.batch_layout == "interleaved"


def test_inception_aux_logits_are_converted_and_trained():
    model = kr_convert(get_model("inception_v3"), input_size=299)
    assert isinstance(model.backbone.AuxLogits.conv0.conv, KRConv2d)
    assert isinstance(model.backbone.AuxLogits.fc, KRLinear)
    model.train()
    out = model(torch.randn(2, 3, 299, 299))
    assert out.aux_logits.shape == (2, 1000)
    (out.logits.sum() + out.aux_logits.sum()).backward()
    assert model.backbone.AuxLogits.fc.weight.grad is not None


def test_swin_window_attention_becomes_kr_attention():
    model = kr_convert(get_model("swin_t"), input_size=64)
    attention = model.backbone.features[1][0].attn
    assert isinstance(attention, KRShiftedWindowAttention)
    assert isinstance(attention.qkv, KRLinear) and isinstance(attention.proj, KRLinear)
    assert isinstance(model.backbone.features[1][0].mlp[0], KRLinear)
