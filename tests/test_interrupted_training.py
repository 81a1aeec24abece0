"""Interrupted and resumed training loses nothing; a damaged checkpoint is refused (issue 22, item 4).

A 2-process CPU DDP run of ``recipes/imagenet.py`` on the embedded digits is stopped in the middle
of its second epoch, with SIGTERM (the main process, or every process of the run) or SIGKILL (every
process), and resumed with ``fit --ckpt_path last``. SIGTERM saves ``last.ckpt`` at the batch it
stopped on (:class:`~lightning_kr.callbacks.CheckpointOnSigterm`); SIGKILL cannot be caught and
loses what came after the end-of-epoch checkpoint. Either way the resumed run starts from what the
checkpoint holds: weights, optimiser, learning-rate schedule, attention temperature, epoch and step,
KR config, on both processes. A checkpoint cut short or with a damaged byte is refused with one
``imagenet.py: error:`` line, before anything is read from it; checkpoints are written whole or not
at all (:mod:`lightning_kr.checkpoint_file`).

In CI: the damaged checkpoints, the atomic write and SIGTERM in one process. The DDP kills::

    pytest tests/test_interrupted_training.py -m slow
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback

from lightning_kr.callbacks import TemperatureAnnealing
from lightning_kr.checkpoint_file import (
    AtomicCheckpointIO,
    CheckpointFileError,
    checkpoint_problem,
    save_atomically,
)
from lightning_kr.classifier import KRClassifier

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

import imagenet  # noqa: E402

STEPS = 6  # training batches per epoch and process
SMALL = [  # two epochs of 6 batches of 8 digits of 16x16 (per process), one validation batch
    "--trainer.max_epochs=2",
    f"--trainer.limit_train_batches={STEPS}",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--flops.print_table=false",
    "--embeddings.every_n_epochs=10",
    "--data.batch_size=8",
    "--data.image_size=16",
]
DDP = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]


def small(tmp_path: Path, subcommand: str = "fit", *extra: str) -> list[str]:
    root = tmp_path / "runs"
    return [
        subcommand,
        *SMALL,
        f"--trainer.logger.init_args.save_dir={root}",
        f"--trainer.default_root_dir={root}",
        *extra,
    ]


def callback(cls: type, **init_args: Any) -> str:
    """``--trainer.callbacks+=`` for one of this file's callbacks (importable in a subprocess)."""
    spec = {"class_path": f"test_interrupted_training.{cls.__name__}", "init_args": init_args}
    return f"--trainer.callbacks+={json.dumps(spec)}"


class PauseAt(Callback):
    """Waits after training batch ``batch`` of epoch ``epoch`` (writing ``paused_rank<r>`` with the
    step reached) until SIGTERM arrives or ``seconds`` pass: the run is killed mid-epoch there."""

    def __init__(self, folder: str, epoch: int = 1, batch: int = 2, seconds: float = 120) -> None:
        self.folder, self.epoch, self.batch, self.seconds = Path(folder), epoch, batch, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) != (self.epoch, self.batch):
            return
        (self.folder / f"paused_rank{trainer.global_rank}").write_text(str(trainer.global_step))
        deadline = time.monotonic() + self.seconds
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)


class SigtermAt(Callback):
    """Sends SIGTERM to its own process after training batch ``batch`` of epoch ``epoch``."""

    def __init__(self, epoch: int = 1, batch: int = 2) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGTERM)


class RecordStart(Callback):
    """Saves, at the first training batch of the (resumed) run, the state it starts from, to
    ``started_rank<r>.pt``: what ``fit --ckpt_path`` restored, before any step changes it."""

    def __init__(self, folder: str) -> None:
        self.folder, self.done = Path(folder), False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.done:
            return
        self.done = True
        annealing = next(c for c in trainer.callbacks if isinstance(c, TemperatureAnnealing))
        temperatures = {
            name: float(buffer)
            for name, buffer in pl_module.named_buffers()
            if name.endswith("temperature")
        }
        state = {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "batch_idx": batch_idx,
            "weights": {
                k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                for k, v in pl_module.state_dict().items()
            },
            "optimizer": trainer.optimizers[0].state_dict(),
            "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            "annealing": annealing.state_dict(),
            "temperatures": temperatures,
            "num_training_batches": trainer.num_training_batches,
            "kr": pl_module.kr_model.config.as_record(),
            "kr_hparam": pl_module.hparams["kr"],
        }
        torch.save(state, self.folder / f"started_rank{trainer.global_rank}.pt")


# ------------------------------------------------------------------------------------ in CI


@pytest.fixture(autouse=True)
def _command_line(monkeypatch):
    """The recipe is called as from its own command line; the threads it sets are given back."""
    monkeypatch.setattr(sys, "argv", ["recipes/imagenet.py"])
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sigtermed(tmp_path_factory) -> tuple[Path, int, Path]:
    """A run in this process (3 batches per epoch) sent SIGTERM after batch 1 of epoch 1: its
    folder, its exit status and its ``last.ckpt``."""
    tmp_path = tmp_path_factory.mktemp("sigtermed")
    threads = torch.get_num_threads()
    args = [*small(tmp_path), "--trainer.limit_train_batches=3"]
    with (
        pytest.MonkeyPatch.context() as patch,
        contextlib.redirect_stdout(io.StringIO()),
        pytest.raises(SystemExit) as exit_,
    ):
        patch.setattr(sys, "argv", ["recipes/imagenet.py"])
        imagenet.main([*args, callback(SigtermAt, epoch=1, batch=1)])
    torch.set_num_threads(threads)
    return tmp_path, exit_.value.code, last_checkpoint(tmp_path)


def test_sigterm_mid_epoch_saves_last_ckpt_and_resume_loses_nothing(sigtermed, tmp_path) -> None:
    """SIGTERM after batch 1 of epoch 1 saves step 3 + 2 = 5 and exits with status 143; ``fit
    --ckpt_path last`` runs the epoch's last batch: 6 steps in all, as without the stop."""
    folder, status, last = sigtermed
    assert status == 143
    saved = torch.load(last, weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (1, 5)  # nothing lost
    args = [*small(folder), "--trainer.limit_train_batches=3", "--ckpt_path=last"]
    with contextlib.redirect_stdout(io.StringIO()):
        resumed = imagenet.main(args)
    assert isinstance(resumed.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert resumed.trainer.global_step == 6 and resumed.trainer.current_epoch == 2
    assert Path(resumed.trainer.checkpoint_callback.last_model_path) == last


def damaged(last: Path, folder: Path, damage: str) -> Path:
    """A copy of ``last`` cut to half its size, or with one byte of a weight changed."""
    data = bytearray(last.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF  # inside the stored tensors: torch.load would not notice
    path = folder / f"{damage}.ckpt"
    path.write_bytes(bytes(data))
    return path


def refused(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_, contextlib.redirect_stdout(io.StringIO()):
        imagenet.main(args)
    error = capsys.readouterr().err
    assert exit_.value.code == 2, error
    assert "Traceback" not in error and error.count("\n") == 1
    return error


def test_a_truncated_checkpoint_is_refused_in_one_line(sigtermed, tmp_path, capsys) -> None:
    """``fit --ckpt_path FILE`` (read by LightningCLI for the model's hyper-parameters) and ``fit
    --ckpt_path last`` (found and read by the Trainer) both refuse a file cut to half its size."""
    _, _, last = sigtermed
    path = damaged(last, tmp_path, "truncated")
    assert "cut short" in checkpoint_problem(path)
    error = refused(capsys, small(tmp_path, "fit", f"--ckpt_path={path}"))
    assert error.startswith(f"imagenet.py: error: checkpoint {path} is truncated or corrupt: ")
    run = tmp_path / "runs" / "digits_resnet18_kr_1x" / "version_0" / "checkpoints"
    run.mkdir(parents=True)
    path.rename(run / "last.ckpt")
    error = refused(capsys, small(tmp_path, "fit", "--ckpt_path=last"))
    assert error.startswith(f"imagenet.py: error: checkpoint {run / 'last.ckpt'} is truncated")


@pytest.mark.parametrize("damage", ["truncated", "flipped_byte"])
def test_the_library_refuses_a_damaged_checkpoint_before_reading_it(
    sigtermed, damage, tmp_path
) -> None:
    _, _, last = sigtermed
    assert checkpoint_problem(last) is None
    path = damaged(last, tmp_path, damage)
    assert ("cut short" if damage == "truncated" else "CRC") in checkpoint_problem(path)
    with pytest.raises(CheckpointFileError, match="truncated or corrupt"):
        KRClassifier.load_from_checkpoint(path)
    with pytest.raises(CheckpointFileError, match="truncated or corrupt"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_a_checkpoint_killed_while_written_leaves_the_previous_one_whole(
    sigtermed, tmp_path, monkeypatch
) -> None:
    _, _, last = sigtermed
    target = tmp_path / "last.ckpt"
    target.write_bytes(last.read_bytes())

    def killed_half_way(obj, file, *args, **kwargs) -> None:
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # as a kill would stop it

    monkeypatch.setattr(torch, "save", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_atomically({"weights": 1}, target)
    assert target.read_bytes() == last.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file left


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "flipped_byte"])
def test_validate_refuses_a_damaged_checkpoint_and_loads_a_whole_one(
    sigtermed, damage, tmp_path, capsys
) -> None:
    _, _, last = sigtermed
    path = damaged(last, tmp_path, damage)
    error = refused(capsys, small(tmp_path, "validate", f"--ckpt_path={path}"))
    assert error.startswith(f"imagenet.py: error: checkpoint {path} is truncated or corrupt: ")
    assert isinstance(KRClassifier.load_from_checkpoint(last), KRClassifier)


# ------------------------------------------------------------------- 2-process DDP, killed


def launch(tmp_path: Path, *extra: str) -> subprocess.Popen:
    """``recipes/imagenet.py`` under 2-process CPU DDP, in a process group of its own."""
    command = [sys.executable, str(REPO / "recipes" / "imagenet.py"), *small(tmp_path), *DDP]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [*command, *extra],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: killpg reaches both ranks, nothing else
    )


def wait_for(condition, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended early ({process.returncode}):\n{output(process)}")
        assert time.monotonic() < deadline, "the run did not reach the point to kill it at"
        time.sleep(0.2)


def output(process: subprocess.Popen) -> str:
    return (process.communicate(timeout=120)[0] or "")[-4000:]


def group_gone(pgid: int, seconds: float = 120) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def last_checkpoint(tmp_path: Path) -> Path:
    (last,) = (tmp_path / "runs").rglob("last.ckpt")
    return last


def assert_starts_from(started: dict[str, Any], saved: dict[str, Any], mid_epoch: bool) -> None:
    """The resumed run's first state is the checkpoint's."""
    assert started["global_step"] == saved["global_step"]
    assert started["epoch"] == (saved["epoch"] if mid_epoch else saved["epoch"] + 1)
    weights = saved["state_dict"]
    assert started["weights"].keys() == weights.keys()
    for key, value in weights.items():
        if key.endswith("temperature"):  # set again for the next batch: checked below
            continue
        if isinstance(value, torch.Tensor):
            assert torch.equal(started["weights"][key], value), key
        else:
            assert started["weights"][key] == value, key  # a KR model's record (extra state)
    optimizer, saved_optimizer = started["optimizer"], saved["optimizer_states"][0]
    assert optimizer["param_groups"] == saved_optimizer["param_groups"]
    assert optimizer["state"].keys() == saved_optimizer["state"].keys()
    for index, state in saved_optimizer["state"].items():
        for name, value in state.items():
            assert torch.equal(optimizer["state"][index][name], value), (index, name)
    assert started["scheduler"] == saved["lr_schedulers"][0]
    (annealing_key,) = [k for k in saved["callbacks"] if k.startswith("TemperatureAnnealing")]
    annealing = saved["callbacks"][annealing_key]
    schedule = TemperatureAnnealing(annealing["start"], annealing["end"], annealing["epochs"])
    expected = schedule.temperature_at(annealing["batches"] / started["num_training_batches"])
    # the progress saved; the temperature of the next batch (on_train_start set it on the layers)
    assert started["annealing"] == {**annealing, "temperature": pytest.approx(expected)}
    assert started["temperatures"] and all(
        t == pytest.approx(expected) for t in started["temperatures"].values()
    )
    assert started["kr"] == started["kr_hparam"] == saved["hyper_parameters"]["kr"]


def resume_and_check(tmp_path: Path, saved: dict[str, Any], mid_epoch: bool) -> None:
    resumed = launch(tmp_path, "--ckpt_path=last", callback(RecordStart, folder=str(tmp_path)))
    text = output(resumed)
    assert resumed.returncode == 0, text
    assert "Traceback" not in text
    for rank in (0, 1):
        started = torch.load(tmp_path / f"started_rank{rank}.pt", weights_only=False)
        assert_starts_from(started, saved, mid_epoch)
        assert started["batch_idx"] == (saved["global_step"] - STEPS if mid_epoch else 0)
    final = torch.load(last_checkpoint(tmp_path), weights_only=False)
    assert final["global_step"] == 2 * STEPS  # every step, once
    assert len(list((tmp_path / "runs").rglob("version_*"))) == 1  # the same run folder


@pytest.mark.slow
@pytest.mark.parametrize("target", ["main_process", "process_group"])
def test_ddp_sigterm_mid_epoch_saves_the_step_reached_and_resumes_from_it(
    target: str, tmp_path
) -> None:
    run = launch(tmp_path, callback(PauseAt, folder=str(tmp_path), epoch=1, batch=2))
    paused = [tmp_path / f"paused_rank{rank}" for rank in (0, 1)]
    wait_for(lambda: all(p.exists() for p in paused), run)
    end_of_epoch_0 = torch.load(last_checkpoint(tmp_path), weights_only=False)
    assert end_of_epoch_0["global_step"] == STEPS
    if target == "main_process":
        os.kill(run.pid, signal.SIGTERM)  # as `kill PID`; Lightning passes it on to rank 1
    else:
        os.killpg(run.pid, signal.SIGTERM)  # as a scheduler stopping the job
    text = output(run)
    assert group_gone(run.pid), "a process of the run is still alive after SIGTERM"
    assert run.returncode == 143, text
    assert "Traceback" not in text and "SIGTERM: training stopped at epoch 1, step 9" in text
    saved = torch.load(last_checkpoint(tmp_path), weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (1, STEPS + 3)  # batches 0, 1, 2 of epoch 1
    resume_and_check(tmp_path, saved, mid_epoch=True)


@pytest.mark.slow
def test_ddp_sigkill_mid_epoch_resumes_from_the_last_checkpoint_written(tmp_path) -> None:
    run = launch(tmp_path, callback(PauseAt, folder=str(tmp_path), epoch=1, batch=2))
    paused = [tmp_path / f"paused_rank{rank}" for rank in (0, 1)]
    wait_for(lambda: all(p.exists() for p in paused), run)
    os.killpg(run.pid, signal.SIGKILL)
    run.communicate(timeout=60)
    assert run.returncode == -signal.SIGKILL and group_gone(run.pid)
    last = last_checkpoint(tmp_path)
    assert checkpoint_problem(last) is None
    assert not list(last.parent.glob(".*.partial"))
    saved = torch.load(last, weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (0, STEPS)  # the end of epoch 0
    resume_and_check(tmp_path, saved, mid_epoch=False)
