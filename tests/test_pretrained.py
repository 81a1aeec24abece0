"""``save_pretrained`` / ``from_pretrained``: a folder of ``kr_config.json`` + ``model.safetensors``.

Round trips are exact (classifier, head-less segmentation model, detection model, tied weights,
bfloat16), loading runs no probe pass, and every way a folder can be wrong is a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_kr.convert
from lightning_kr import KRClassifier, KRModel, kr_convert
from lightning_kr.models import build_model, builder_record
from lightning_kr.pretrained import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    PretrainedFolderError,
    join_state,
    split_state,
)
from tests.reference import tiny_cnn, trained_looking


def no_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("from_pretrained ran a probe pass")

    monkeypatch.setattr(lightning_kr.convert, "probe", fail)


def outputs(model: nn.Module, *args) -> object:
    model.eval()
    with torch.no_grad():
        return model(*args)


def assert_same(a: object, b: object) -> None:
    if isinstance(a, Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


@pytest.fixture(scope="module")
def resnet_folder(tmp_path_factory) -> tuple[Path, KRModel]:
    torch.manual_seed(0)
    model = kr_convert(build_model("resnet18", num_classes=10), input_size=32, kernel_num=2)
    trained_looking(model, batchnorm_statistics=True)
    model.eval()
    folder = tmp_path_factory.mktemp("resnet18_kr")
    model.save_pretrained(folder)
    return folder, model


def test_classifier_round_trip_is_exact_and_runs_no_probe(resnet_folder, monkeypatch):
    folder, saved = resnet_folder
    no_probe(monkeypatch)
    loaded = KRModel.from_pretrained(folder)
    images = torch.randn(3, 3, 32, 32)
    assert not loaded.training
    assert_same(outputs(saved, images), outputs(loaded, images))
    assert loaded.config == saved.config
    assert loaded.report.as_dict() == saved.report.as_dict()
    assert [n for n, _ in loaded.kr_layers()] == [n for n, _ in saved.kr_layers()]


def test_the_folder_records_config_layers_and_builder(resnet_folder):
    folder, saved = resnet_folder
    record = json.loads((folder / CONFIG_FILE).read_text())
    assert record["format_version"] == 1
    assert record["kr_config"]["kernel_num"] == 2
    assert record["converted"] == sorted(n for n, _ in saved.kr_layers())
    assert record["base_model"] == {
        "class": "torchvision.models.resnet.ResNet",
        "builder": {"name": "resnet18", "kwargs": {"num_classes": 10}},
    }
    assert record["plan"]["num_classes"] == 10 and record["plan"]["stem_on"] == "conv1"
    assert record["weights"]["file"] == WEIGHTS_FILE and len(record["weights"]["sha256"]) == 64


def test_head_less_segmentation_model(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = kr_convert(build_model("lraspp_mobilenet_v3_large", num_classes=3), input_size=64)
    trained_looking(model)
    assert model.head is None and model.plan.unread_repr_from is not None
    model.save_pretrained(tmp_path)
    no_probe(monkeypatch)
    loaded = KRModel.from_pretrained(tmp_path)
    images = torch.randn(2, 3, 64, 64)
    assert_same(outputs(model, images), outputs(loaded, images))
    assert loaded.report.notes == model.report.notes


def test_detection_model(tmp_path, monkeypatch):
    torch.manual_seed(0)
    static = build_model("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3)
    images = [torch.rand(3, 320, 320) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[30.0, 40.0, 200.0, 220.0]]), "labels": torch.tensor([1])}]
    model = kr_convert(static, example_input=(images, targets * 2))
    trained_looking(model)
    model.save_pretrained(tmp_path)
    no_probe(monkeypatch)
    loaded = KRModel.from_pretrained(tmp_path)
    assert_same(outputs(model, images), outputs(loaded, images))


def test_a_model_built_otherwise_loads_onto_the_base_model_passed(tmp_path):
    torch.manual_seed(0)
    model = trained_looking(kr_convert(tiny_cnn(), input_size=8))
    model.save_pretrained(tmp_path)
    with pytest.raises(PretrainedFolderError, match="pass it, freshly built, as from_pretrained"):
        KRModel.from_pretrained(tmp_path)
    base = tiny_cnn()
    loaded = KRModel.from_pretrained(tmp_path, base_model=base)
    assert loaded.backbone is base  # converted in place, as PEFT does
    images = torch.randn(4, 3, 8, 8)
    assert_same(outputs(model, images), outputs(loaded, images))


class TiedStem(nn.Module):
    """A model whose first convolution is registered under two names (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = tiny_cnn()[1:]
        self.same_stem = self.stem

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.stem(x))


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    model = trained_looking(kr_convert(TiedStem(), input_size=8))
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert record["weights"]["aliases"] == {
        "backbone.same_stem.weight": "backbone.stem.weight",
        "backbone.same_stem.bias": "backbone.stem.bias",
    }
    loaded = KRModel.from_pretrained(tmp_path, base_model=TiedStem())
    assert loaded.backbone.same_stem is loaded.backbone.stem
    images = torch.randn(2, 3, 8, 8)
    assert_same(outputs(model, images), outputs(loaded, images))


def test_tensors_that_overlap_in_part_are_stored_as_copies():
    base = torch.arange(6.0)
    state = {"whole": base, "tail": base[2:], "again": base, "extra._extra_state": {"k": 1}}
    tensors, aliases, extra = split_state(state)
    assert set(tensors) == {"whole", "tail"} and aliases == {"again": "whole"}
    assert tensors["tail"].untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    joined = join_state(tensors, aliases, extra)
    assert joined.keys() == state.keys() and torch.equal(joined["tail"], base[2:])


def test_bfloat16_model_loads_in_bfloat16(tmp_path):
    torch.manual_seed(0)
    model = trained_looking(kr_convert(tiny_cnn().to(torch.bfloat16), input_size=8))
    model.save_pretrained(tmp_path)
    loaded = KRModel.from_pretrained(tmp_path, base_model=tiny_cnn())
    assert next(loaded.parameters()).dtype == torch.bfloat16
    images = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    assert_same(outputs(model, images), outputs(loaded, images))


def test_a_timm_model_is_rebuilt_from_its_record(tmp_path):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = trained_looking(kr_convert(build_model("timm:resnet10t", num_classes=4), input_size=32))
    model.save_pretrained(tmp_path)
    loaded = KRModel.from_pretrained(tmp_path)
    images = torch.randn(2, 3, 32, 32)
    assert_same(outputs(model, images), outputs(loaded, images))


def test_head_dropout_added_by_the_classifier_is_recorded():
    network = build_model("resnet18", num_classes=4)
    KRClassifier(network, image_size=32, head_dropout=0.2, kr=None)
    assert builder_record(network)["kwargs"] == {"num_classes": 4, "head_dropout": 0.2}
    twice = build_model("resnet18", num_classes=4, head_dropout=0.1)
    KRClassifier(twice, image_size=32, head_dropout=0.2, kr=None)
    assert builder_record(twice) is None  # two dropouts: no build_model call makes that


def test_builder_record_only_for_plain_arguments():
    assert builder_record(build_model("mobilenet_v2_050", num_classes=3, dropout=0.1)) == {
        "name": "mobilenet_v2_050",
        "kwargs": {"num_classes": 3, "dropout": 0.1},
    }
    assert builder_record(build_model("resnet18", norm_layer=nn.Identity)) is None
    assert builder_record(tiny_cnn()) is None


# Errors: what differs, never a partial load.


def test_another_architecture_is_refused(resnet_folder):
    folder, _ = resnet_folder
    from torchvision.models import mobilenet_v2, resnet34

    with pytest.raises(
        PretrainedFolderError, match=r"holds a converted torchvision.models.resnet.ResNet"
    ):
        KRModel.from_pretrained(folder, base_model=mobilenet_v2(num_classes=10))
    with pytest.raises(
        PretrainedFolderError, match=r"tensors missing from the file .backbone.layer1.2"
    ):
        KRModel.from_pretrained(folder, base_model=resnet34(num_classes=10))
    with pytest.raises(PretrainedFolderError, match=r"other shapes.*fc.*\(10, 512\).*\(5, 512\)"):
        KRModel.from_pretrained(folder, base_model=build_model("resnet18", num_classes=5))
    with pytest.raises(PretrainedFolderError, match="already a KRModel"):
        KRModel.from_pretrained(folder, base_model=KRModel.from_pretrained(folder))


def copy_folder(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_missing_files_are_named(resnet_folder, tmp_path):
    folder, _ = resnet_folder
    with pytest.raises(FileNotFoundError, match="not a folder written by save_pretrained"):
        KRModel.from_pretrained(tmp_path / "nowhere")
    no_weights = copy_folder(folder, tmp_path / "no_weights")
    (no_weights / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"no {WEIGHTS_FILE}"):
        KRModel.from_pretrained(no_weights)
    no_config = copy_folder(folder, tmp_path / "no_config")
    (no_config / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"has no {CONFIG_FILE}"):
        KRModel.from_pretrained(no_config)


def test_another_format_version_is_refused(resnet_folder, tmp_path):
    folder = copy_folder(resnet_folder[0], tmp_path / "v2")
    record = json.loads((folder / CONFIG_FILE).read_text())
    record["format_version"] = 2
    (folder / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(PretrainedFolderError, match=r"format version 2 .* reads version 1"):
        KRModel.from_pretrained(folder)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate"])
def test_changed_or_truncated_weights_are_refused(resnet_folder, tmp_path, damage):
    folder = copy_folder(resnet_folder[0], tmp_path / "damaged")
    data = bytearray((folder / WEIGHTS_FILE).read_bytes())
    if damage == "flip a byte":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    (folder / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(PretrainedFolderError, match="not the file save_pretrained wrote"):
        KRModel.from_pretrained(folder)


def test_an_unreadable_weights_file_with_a_matching_record_is_refused(resnet_folder, tmp_path):
    from lightning_kr.pretrained import sha256

    folder = copy_folder(resnet_folder[0], tmp_path / "garbage")
    (folder / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    record = json.loads((folder / CONFIG_FILE).read_text())
    record["weights"]["sha256"] = sha256(folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(PretrainedFolderError, match="not a readable safetensors file"):
        KRModel.from_pretrained(folder)


def test_a_classifier_checkpoint_becomes_a_folder_in_one_call(tmp_path):
    torch.manual_seed(0)
    classifier = KRClassifier(
        "resnet18", num_classes=4, image_size=32, head_dropout=0.2, warmup_epochs=0, lr=0.01
    )
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,)))
    trainer = Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(classifier, DataLoader(data, batch_size=4))
    checkpoint = tmp_path / "last.ckpt"
    trainer.save_checkpoint(checkpoint)

    KRClassifier.load_from_checkpoint(checkpoint).model.save_pretrained(tmp_path / "shared")

    loaded = KRModel.from_pretrained(tmp_path / "shared")
    assert isinstance(loaded.backbone.fc[0], nn.Dropout)  # head_dropout was rebuilt too
    images = torch.randn(2, 3, 32, 32)
    assert_same(outputs(classifier.model, images), outputs(loaded, images))


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    example = next(block for block in blocks if "save_pretrained(" in block)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md save_pretrained example", "exec"), namespace)
    assert isinstance(namespace["model"], KRModel) and not isinstance(namespace["plain"], KRModel)
    assert {p.name for p in (tmp_path / "resnet18_kr").iterdir()} >= {CONFIG_FILE, WEIGHTS_FILE}
