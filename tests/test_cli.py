"""`lightning_kr.cli`: Trainer flags honoured, GPUs checked, rows fitted to the machine, errors in a line."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_kr.callbacks import KernelEmbeddings
from lightning_kr.cli import (
    callbacks_for_flags,
    check_gpus,
    exit_on_user_error,
    fit_to_machine,
    given_keys,
)
from lightning_kr.cli.gpus import requested_devices
from lightning_kr.data import DataRootError

ROW = {  # the shape of recipes/configs/resnet18_kr_1x.yaml
    "trainer": {"accelerator": "gpu", "devices": 8, "strategy": "ddp", "precision": "16-mixed"},
    "data": {"init_args": {"batch_size": 32, "num_workers": 8, "pin_memory": True}},
    "model": {"lr": 0.1},
}


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)`` makes this machine look as if it had ``n`` CUDA GPUs (and no Apple GPU)."""

    def machine(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)

    return machine


def test_given_keys_are_the_dotted_options_without_init_args() -> None:
    args = ["fit", "--trainer.devices=2", "--data.init_args.root", "/d", "--model.lr", "0.1"]
    assert given_keys(args) == {"trainer.devices", "data.root", "model.lr"}


@pytest.mark.parametrize(
    ("devices", "count"), [(3, 3), ("3", 3), ([0, 2], 2), ("0,2", 2), ("auto", None), (-1, None)]
)
def test_requested_devices_counts_ids_and_numbers(devices, count) -> None:
    assert requested_devices(devices) == count


@pytest.mark.parametrize(
    ("machine", "devices", "precision", "lr"),
    [
        (0, 1, "32-true", 0.1 * 32 / 256),
        (1, 1, "16-mixed", 0.1 * 32 / 256),
        (4, 4, "16-mixed", 0.05),
    ],
)
def test_a_bare_row_runs_on_what_the_machine_has(gpus, machine, devices, precision, lr) -> None:
    gpus(machine)
    fit = fit_to_machine(ROW, ROW, given={"data.root"})
    assert fit.trainer == {
        "accelerator": "auto",
        "devices": "auto",
        "strategy": "auto",
        "precision": precision,
    }
    assert (fit.devices, fit.reference_batch, fit.global_batch) == (devices, 256, 32 * devices)
    assert fit.lr == pytest.approx(lr) and fit.row_lr == 0.1 and not fit.row_trainer
    assert fit.data.get("pin_memory", True) is (machine > 0)
    assert "global batch" in fit.describe() and f"{fit.lr:.4g}" in fit.describe()


def test_devices_8_asks_for_the_rows_own_ddp_settings(gpus) -> None:
    gpus(8)
    config = {**ROW, "trainer": {**ROW["trainer"], "devices": "8"}}
    fit = fit_to_machine(ROW, config, given={"data.root", "trainer.devices"})
    assert (
        fit.row_trainer and fit.trainer["strategy"] == "ddp" and fit.trainer["accelerator"] == "gpu"
    )
    assert fit.lr == 0.1 and fit.global_batch == 256


def test_given_settings_are_kept_and_the_lr_follows_the_global_batch(gpus) -> None:
    gpus(0)
    config = {
        "trainer": {
            **ROW["trainer"],
            "devices": 2,
            "accelerator": "cpu",
            "accumulate_grad_batches": 2,
        },
        "data": {"init_args": {"batch_size": 16}},
        "model": {"lr": 0.1},
    }
    given = {"trainer.devices", "trainer.accelerator", "trainer.accumulate_grad_batches"}
    fit = fit_to_machine(ROW, config, given)
    assert fit.trainer["devices"] == 2 and fit.trainer["accelerator"] == "cpu"
    assert fit.global_batch == 16 * 2 * 2 and fit.lr == pytest.approx(0.1 * 64 / 256)
    assert fit_to_machine(ROW, config, {*given, "model.lr"}).lr == 0.1  # a given lr is kept


def test_gpus_asked_for_and_missing_are_refused_with_the_flags_to_pass(gpus) -> None:
    gpus(0)
    with pytest.raises(MisconfigurationException, match=r"--trainer\.accelerator auto"):
        check_gpus("gpu", 8)
    gpus(2)
    with pytest.raises(MisconfigurationException, match=r"--trainer\.devices 2"):
        check_gpus("gpu", 8, hint="scale the lr")
    check_gpus("gpu", 2)
    check_gpus("cpu", 8)  # not a GPU run: Lightning's business


def test_callbacks_give_way_to_the_flags() -> None:
    callbacks = [ModelCheckpoint(), LearningRateMonitor(), RichProgressBar(), KernelEmbeddings()]

    def kept(**options) -> list[str]:
        return [type(c).__name__ for c in callbacks_for_flags(callbacks, options)]

    assert kept() == [
        "ModelCheckpoint",
        "LearningRateMonitor",
        "RichProgressBar",
        "KernelEmbeddings",
    ]
    assert "ModelCheckpoint" not in kept(enable_checkpointing=False)
    assert "RichProgressBar" not in kept(enable_progress_bar=False)
    with pytest.warns(
        UserWarning, match="KernelEmbeddings, LearningRateMonitor left out"
    ) as caught:
        assert kept(logger=False) == ["ModelCheckpoint", "RichProgressBar"]
    assert len(caught) == 1  # one warning for all of them
    with pytest.warns(UserWarning, match="fast_dev_run writes no logs"):
        assert kept(fast_dev_run=True) == ["RichProgressBar"]
    with_folder = KernelEmbeddings(dirpath="somewhere")  # writes without a logger: kept
    assert callbacks_for_flags([with_folder], {"logger": False}) == [with_folder]


@pytest.mark.parametrize(
    "error", [MisconfigurationException("pass --x y"), DataRootError("/r is missing: fix it")]
)
def test_a_user_error_is_one_line_on_stderr_and_status_2(capsys, error) -> None:
    with pytest.raises(SystemExit) as exit_, exit_on_user_error("recipe.py"):
        raise error
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"recipe.py: error: {error}\n"


def test_a_bug_keeps_its_traceback() -> None:
    with pytest.raises(ZeroDivisionError), exit_on_user_error("recipe.py"):
        _ = 1 / 0
