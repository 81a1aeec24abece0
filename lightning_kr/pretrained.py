"""The ``save_pretrained`` folder: ``kr_config.json`` beside ``model.safetensors``, as PEFT does.

``kr_config.json`` holds everything needed to build the model again: the :class:`KRConfig`, the
format version, the converted layer names, the conversion plan (so loading runs no probe pass), the
report, and how to rebuild the base model when :func:`~lightning_kr.models.build_model` built it
(builder name and keyword arguments). ``model.safetensors`` holds the weights and buffers (tensors
shared between names are stored once), and its SHA-256 is recorded in ``kr_config.json``: a
changed or truncated file is refused instead of loaded in part.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_kr.config import KRConfig
from lightning_kr.conversion.create import FACTORIES, base_type
from lightning_kr.conversion.plan import ConversionPlan
from lightning_kr.models import build_model
from lightning_kr.report import ConversionReport

if TYPE_CHECKING:
    from lightning_kr.kr_model import KRModel

CONFIG_FILE = "kr_config.json"
WEIGHTS_FILE = "model.safetensors"
PRETRAINED_FORMAT = 1
"""Version of the folder's layout; a folder of another version is refused with a clear error."""


class PretrainedFolderError(ValueError):
    """A ``save_pretrained`` folder that cannot be loaded as it is, with what differs."""


def save_folder(model: KRModel, folder: str | os.PathLike) -> Path:
    """Write ``kr_config.json`` and ``model.safetensors`` of ``model`` into ``folder`` (created if
    needed; these two files are replaced). Returns the folder."""
    from lightning_kr import __version__

    if model.plan is None:
        raise ValueError(
            "this KRModel has no conversion plan (it was not made by kr_convert); convert the base "
            "model with kr_convert and load this model's state_dict into it"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, aliases, extra = split_state(model.state_dict())
    weights = folder / WEIGHTS_FILE
    save_file(tensors, weights, metadata={"format": "pt"})
    base = model.backbone
    record = {
        "library": "lightning-kr",
        "library_version": __version__,
        "format_version": PRETRAINED_FORMAT,
        "kr_config": config_record(model.config),
        "base_model": {
            "class": qualified_name(type(base)),
            "builder": model.builder,
        },
        "converted": sorted(name for name, _ in model.kr_layers()),
        "plan": model.plan.as_record(),
        "dtype": str(parameter_dtype(model)).removeprefix("torch."),
        "weights": {
            "file": WEIGHTS_FILE,
            "sha256": sha256(weights),
            "tensors": len(tensors),
            "aliases": aliases,
            "extra_state": extra,
        },
        "report": model.report.as_dict(),
    }
    (folder / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return folder


def load_folder(
    folder: str | os.PathLike,
    base_model: nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> KRModel:
    """The :class:`KRModel` saved in ``folder``, in eval mode, with outputs equal to the saved one's.

    Args:
        folder: written by :meth:`KRModel.save_pretrained`.
        base_model: the unconverted architecture the model was converted from (converted in place);
            default: rebuilt from the builder recorded in ``kr_config.json``.
        device: where the weights are loaded.

    Raises:
        FileNotFoundError: the folder or one of its two files is missing.
        PretrainedFolderError: another format version, a changed or truncated weights file, or a
            base model that is not the saved one's architecture (the message says what differs).
    """
    from lightning_kr.convert import apply_plan

    folder = Path(folder)
    record = read_record(folder)
    weights = folder / record["weights"]["file"]
    if not weights.is_file():
        raise FileNotFoundError(
            f"{folder} has {CONFIG_FILE} but no {weights.name}: copy the whole folder written by "
            "save_pretrained"
        )
    expected, actual = record["weights"]["sha256"], sha256(weights)
    if actual != expected:
        raise PretrainedFolderError(
            f"{weights} ({weights.stat().st_size:,} bytes) is not the file save_pretrained wrote: "
            f"its SHA-256 is {actual[:16]}…, {CONFIG_FILE} records {expected[:16]}… (changed or "
            "truncated after saving); copy the folder again or save it again"
        )
    try:
        tensors = load_file(weights, device=str(device))
    except SafetensorError as error:
        raise PretrainedFolderError(
            f"{weights} is not a readable safetensors file: {error}"
        ) from None

    config = config_from_record(record["kr_config"])
    plan = ConversionPlan.from_record(record["plan"])
    base = base_model if base_model is not None else rebuild_base(record, folder)
    check_base(base, record, plan)
    base.to(device=device, dtype=getattr(torch, record.get("dtype", "float32")))
    model = apply_plan(base, config, plan, ConversionReport.from_dict(record["report"]))
    state = join_state(tensors, record["weights"]["aliases"], record["weights"]["extra_state"])
    for key, value in model.state_dict().items():  # the KRModel's own: its record, checked above
        if key.endswith("_extra_state") and key not in state:
            state[key] = value
    check_state(model, state)
    model.load_state_dict(state, strict=True)
    return model.eval()


def read_record(folder: Path) -> dict[str, Any]:
    """``kr_config.json`` of ``folder``, checked for the format version this library reads."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder written by save_pretrained")
    path = folder / CONFIG_FILE
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir())[:10]
        raise FileNotFoundError(
            f"{folder} has no {CONFIG_FILE} (it holds {present}); pass a folder written by "
            "KRModel.save_pretrained"
        )
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PretrainedFolderError(f"{path} is not valid JSON: {error}") from None
    version = record.get("format_version") if isinstance(record, dict) else None
    if version != PRETRAINED_FORMAT:
        from lightning_kr import __version__

        raise PretrainedFolderError(
            f"{path} is in format version {version!r} (written by lightning-kr "
            f"{record.get('library_version', '?') if isinstance(record, dict) else '?'}); "
            f"lightning-kr {__version__} reads version {PRETRAINED_FORMAT}. Load it with the "
            "version that wrote it"
        )
    return record


def rebuild_base(record: dict[str, Any], folder: Path) -> nn.Module:
    """The base model built again from the recorded :func:`build_model` call."""
    builder = record["base_model"].get("builder")
    if builder is None:
        raise PretrainedFolderError(
            f"{folder / CONFIG_FILE} does not say how to build the base model "
            f"({record['base_model']['class']}; it was not made by lightning_kr.build_model): pass "
            "it, freshly built, as from_pretrained(folder, base_model=...)"
        )
    return build_model(builder["name"], **builder["kwargs"])


def check_base(base: nn.Module, record: dict[str, Any], plan: ConversionPlan) -> None:
    """Refuse a base model that is not the saved one's architecture, saying what differs."""
    from lightning_kr.kr_model import KRModel

    if isinstance(base, KRModel):
        raise PretrainedFolderError(
            "base_model is already a KRModel; pass the unconverted architecture"
        )
    saved_class = record["base_model"]["class"]
    if qualified_name(type(base)) != saved_class:
        raise PretrainedFolderError(
            f"the folder holds a converted {saved_class}; base_model is a "
            f"{qualified_name(type(base))}. Pass the architecture it was saved from"
        )
    modules = dict(base.named_modules())
    missing = [name for name in plan.replace if name not in modules]
    wrong = [
        f"{name} ({type(modules[name]).__name__})"
        for name in plan.replace
        if name in modules and base_type(modules[name]) not in FACTORIES
    ]
    if missing or wrong:
        raise PretrainedFolderError(
            "base_model is not the architecture the folder was saved from: "
            + "; ".join(
                part
                for part in (
                    f"it has no {_first(missing)}" if missing else "",
                    f"these are not convertible layers: {_first(wrong)}" if wrong else "",
                )
                if part
            )
        )


def check_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Refuse weights that do not fit ``model`` exactly: missing, unexpected or other shapes."""
    mine = model.state_dict()
    missing = [k for k in mine if k not in state]
    unexpected = [k for k in state if k not in mine]
    shapes = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}"
        for k, v in mine.items()
        if isinstance(v, Tensor) and isinstance(state.get(k), Tensor) and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing from the file ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors the model lacks ({_first(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} of other shapes ({_first(shapes)})")
        raise PretrainedFolderError(
            "the saved weights do not fit the rebuilt model: "
            + "; ".join(parts)
            + ". Pass the base model they were saved from (same builder and arguments)"
        )


def split_state(
    state: dict[str, Any],
) -> tuple[dict[str, Tensor], dict[str, str], dict[str, Any]]:
    """A state_dict as ``(tensors to store, aliases, extra states)``.

    A tensor under several names (tied weights) is stored once: ``aliases`` maps each other name to
    the stored one. Tensors that overlap other tensors only in part are stored as copies. Extra
    states (non-tensor entries) must be plain data; the :class:`KRModel`'s own is left out (the
    folder's record says the same)."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    extra: dict[str, Any] = {}
    stored: dict[tuple, str] = {}
    storages: dict[tuple, int] = {}
    for value in state.values():
        if isinstance(value, Tensor):
            key = _storage_key(value)
            storages[key] = storages.get(key, 0) + 1
    for name, value in state.items():
        if not isinstance(value, Tensor):
            if name.split(".")[-1] == "_extra_state" and _is_kr_model_state(value):
                continue
            try:
                json.dumps(value)
            except TypeError:
                raise ValueError(
                    f"cannot save {name}: its extra state is a {type(value).__name__}, not plain data"
                ) from None
            extra[name] = value
            continue
        view = (*_storage_key(value), value.storage_offset(), tuple(value.shape), value.stride())
        if view in stored:
            aliases[name] = stored[view]
            continue
        stored[view] = name
        shared = storages[_storage_key(value)] > 1
        tensors[name] = value.detach().clone() if shared else value.detach().contiguous()
    return tensors, aliases, extra


def join_state(
    tensors: dict[str, Tensor], aliases: dict[str, str], extra: dict[str, Any]
) -> dict[str, Any]:
    """The state_dict :func:`split_state` took apart."""
    state: dict[str, Any] = dict(tensors)
    for name, stored in aliases.items():
        if stored not in tensors:
            raise PretrainedFolderError(
                f"{CONFIG_FILE} says {name} is stored as {stored}, which the weights file lacks"
            )
        state[name] = tensors[stored]
    state.update(extra)
    return state


def config_record(config: KRConfig) -> dict[str, Any]:
    """The options as given (``attentions: None`` stays ``None``), as plain data."""
    record = config.as_record()
    record["attentions"] = None if config.attentions is None else list(config.attentions)
    return record


def config_from_record(record: dict[str, Any]) -> KRConfig:
    return KRConfig.from_record(record)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def parameter_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _storage_key(tensor: Tensor) -> tuple:
    return (tensor.device.type, tensor.untyped_storage().data_ptr(), tensor.dtype)


def _is_kr_model_state(value: Any) -> bool:
    return isinstance(value, dict) and {"format_version", "config", "converted"} <= set(value)


def _first(items: Iterable[str], n: int = 5) -> str:
    items = list(items)
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")
