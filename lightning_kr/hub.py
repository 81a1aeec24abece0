"""``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` of :class:`~lightning_kr.KRModel`.

With the ``[hub]`` extra (``pip install 'lightning-kr[hub]'``), :class:`PretrainedMixin` is
``huggingface_hub``'s :class:`~huggingface_hub.ModelHubMixin`: ``from_pretrained`` takes a Hub id
as well as a folder, ``save_pretrained`` also writes a model card (``README.md``) and
``push_to_hub`` uploads the folder. Without it, the same calls work on local folders and a Hub id
fails with the line that installs the extra. The folder itself is :mod:`lightning_kr.pretrained`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_kr.pretrained import CONFIG_FILE, WEIGHTS_FILE, load_folder, save_folder

try:
    from huggingface_hub import ModelHubMixin, snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
except ImportError:  # the [hub] extra is not installed
    ModelHubMixin = None

HUB_INSTALL = "pip install 'lightning-kr[hub]'"

MODEL_CARD = """---
{{ card_data }}
---

A model converted to dynamic convolution with Kernel Representation (KR) by
[lightning-kr](https://pypi.org/project/lightning-kr/). `kr_config.json` records the KR options,
the converted layers and how the base model is built; `model.safetensors` holds the weights.

```python
from lightning_kr import KRModel

model = KRModel.from_pretrained("<this repository's id, or the folder>")
```
"""


class LocalPretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` on local folders (the ``[hub]`` extra adds Hub ids
    and ``push_to_hub``)."""

    def save_pretrained(self, save_directory: str | os.PathLike, **hub_options: Any) -> None:
        """Write ``kr_config.json`` and ``model.safetensors`` into ``save_directory``.

        ``hub_options`` (``push_to_hub=True``...) need the ``[hub]`` extra."""
        if hub_options:
            raise ImportError(
                f"save_pretrained({sorted(hub_options)}) needs huggingface_hub: {HUB_INSTALL}"
            )
        save_folder(self, save_directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        base_model: nn.Module | None = None,
        *,
        device: str | torch.device = "cpu",
        **hub_options: Any,
    ) -> Any:
        """The model saved in a folder; see :func:`lightning_kr.pretrained.load_folder`."""
        path = Path(pretrained_model_name_or_path)
        if hub_options or (not path.exists() and _looks_like_repo_id(str(path))):
            raise ImportError(
                f"{str(path)!r} is not a folder here; loading from the Hugging Face Hub needs "
                f"huggingface_hub: {HUB_INSTALL}"
            )
        return load_folder(path, base_model, device)

    def push_to_hub(self, *args: Any, **kwargs: Any) -> str:
        raise ImportError(f"push_to_hub needs huggingface_hub: {HUB_INSTALL}")


if ModelHubMixin is None:
    PretrainedMixin: type = LocalPretrainedMixin
else:

    class HubPretrainedMixin(
        ModelHubMixin,
        library_name="lightning-kr",
        license="apache-2.0",
        tags=["dynamic-convolution", "kernel-representation", "lightning-kr"],
        model_card_template=MODEL_CARD,
    ):
        """:class:`~huggingface_hub.ModelHubMixin` for :class:`~lightning_kr.KRModel`: ``save_pretrained``
        (and ``push_to_hub``) write :mod:`lightning_kr.pretrained`'s folder and a model card."""

        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            # A KRModel's arguments are modules, not a JSON config: the folder has its own record.
            return object.__new__(cls)

        def _save_pretrained(self, save_directory: Path) -> None:
            save_folder(self, save_directory)

        @classmethod
        def from_pretrained(
            cls,
            pretrained_model_name_or_path: str | os.PathLike,
            base_model: nn.Module | None = None,
            *,
            device: str | torch.device = "cpu",
            revision: str | None = None,
            cache_dir: str | os.PathLike | None = None,
            force_download: bool = False,
            local_files_only: bool = False,
            token: str | bool | None = None,
        ) -> Any:
            """The model saved in a folder or a Hub repository (its ``kr_config.json`` and
            ``model.safetensors`` are downloaded).

            Args:
                pretrained_model_name_or_path: a folder written by ``save_pretrained``, or a Hub id
                    (``"user/resnet18-kr"``).
                base_model: the unconverted architecture (default: rebuilt from the record).
                device: where the weights are loaded.
                revision, cache_dir, force_download, local_files_only, token: as in
                    :func:`huggingface_hub.snapshot_download`.
            """
            path = Path(pretrained_model_name_or_path)
            name = str(pretrained_model_name_or_path)
            if not path.exists() and _looks_like_repo_id(name):
                try:
                    downloaded = snapshot_download(
                        repo_id=name,
                        allow_patterns=[CONFIG_FILE, WEIGHTS_FILE],
                        revision=revision,
                        cache_dir=cache_dir,
                        force_download=force_download,
                        local_files_only=local_files_only,
                        token=token,
                    )
                except Exception as error:
                    raise FileNotFoundError(
                        f"{name!r} is neither a folder here nor a Hub repository that could be "
                        f"downloaded ({type(error).__name__}: {error})"
                    ) from error
                path = Path(downloaded)
            return load_folder(path, base_model, device)

    PretrainedMixin = HubPretrainedMixin


def _looks_like_repo_id(name: str) -> bool:
    """``user/name`` or ``name`` as the Hub spells ids (a path such as ``./x`` or ``/x`` is not)."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
        return False
    if ModelHubMixin is None:
        return name.count("/") == 1
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True
