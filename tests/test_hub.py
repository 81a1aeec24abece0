"""Sharing a KR model through the Hugging Face Hub (the ``[hub]`` extra), tested offline.

A local folder stands in for the Hub: ``push_to_hub`` uploads into it and ``from_pretrained`` with
a Hub id downloads from it; no network is used.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lightning_kr.hub
from lightning_kr import KRModel, kr_convert
from lightning_kr.hub import LocalPretrainedMixin
from lightning_kr.models import build_model
from lightning_kr.pretrained import CONFIG_FILE, WEIGHTS_FILE
from tests.reference import trained_looking

huggingface_hub = pytest.importorskip("huggingface_hub")


@pytest.fixture
def local_hub(tmp_path, monkeypatch) -> Path:
    """Repositories as folders under ``tmp_path / "hub"``; no network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = tmp_path / "hub"

    def create_repo(self, repo_id, **kwargs):
        (hub / repo_id).mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, hub / repo_id, dirs_exist_ok=True)
        return f"local-hub/{repo_id}"

    def snapshot_download(*, repo_id, allow_patterns, **kwargs):
        assert set(allow_patterns) == {CONFIG_FILE, WEIGHTS_FILE}
        if not (hub / repo_id).is_dir():
            raise huggingface_hub.errors.RepositoryNotFoundError(f"no repository {repo_id}")
        return str(hub / repo_id)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(lightning_kr.hub, "snapshot_download", snapshot_download)
    return hub


@pytest.fixture(scope="module")
def model() -> KRModel:
    torch.manual_seed(0)
    return trained_looking(kr_convert(build_model("resnet18", num_classes=5), input_size=32)).eval()


def test_push_to_hub_then_from_pretrained_with_the_hub_id(local_hub, model):
    url = model.push_to_hub("someone/resnet18-kr")
    assert url == "local-hub/someone/resnet18-kr"
    files = {p.name for p in (local_hub / "someone/resnet18-kr").iterdir()}
    assert files == {CONFIG_FILE, WEIGHTS_FILE, "README.md"}

    loaded = KRModel.from_pretrained("someone/resnet18-kr")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))


def test_save_pretrained_writes_a_model_card(tmp_path, model):
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "library_name: lightning-kr" in card and "KRModel.from_pretrained" in card
    assert not (tmp_path / "config.json").exists()  # the record is kr_config.json


def test_an_unknown_id_or_folder_is_a_clear_error(local_hub):
    with pytest.raises(FileNotFoundError, match="neither a folder here nor a Hub repository"):
        KRModel.from_pretrained("someone/missing")
    with pytest.raises(FileNotFoundError, match="not a folder written by save_pretrained"):
        KRModel.from_pretrained("./runs/missing/model")


class LocalOnly(LocalPretrainedMixin):
    """What KRModel offers without the [hub] extra."""


def test_without_the_extra_hub_ids_say_how_to_install_it(tmp_path):
    with pytest.raises(ImportError, match=r"pip install 'lightning-kr\[hub\]'"):
        LocalOnly.from_pretrained("someone/resnet18-kr")
    with pytest.raises(ImportError, match=r"lightning-kr\[hub\]"):
        LocalOnly().push_to_hub("someone/resnet18-kr")
    with pytest.raises(ImportError, match=r"lightning-kr\[hub\]"):
        LocalOnly().save_pretrained(tmp_path, push_to_hub=True)
