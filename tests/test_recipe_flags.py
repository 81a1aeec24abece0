"""Every standard Trainer flag on every recipe runs to a clean exit or is refused in one line (issue 22,
item 2).

``recipes/imagenet.py`` (on the embedded digits and on a small ImageFolder made here) and
``recipes/autoencoder.py``, called in-process through their ``main(args)``, as from the command line.
``recipes/compare.py`` is a plain PyTorch loop without Trainer flags. In CI: one case per flag that
crashed before or touches the recipes' own callbacks, a few steps of a small run each; the full
matrix (every flag on every recipe, bf16, resume after an interrupted run, validate / test /
predict on a checkpoint, 2-process CPU DDP) is marked ``slow``::

    pytest tests/test_recipe_flags.py -m slow
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

import autoencoder  # noqa: E402
import imagenet  # noqa: E402

DIGITS = [  # two training batches and one validation batch of 8 digits of 16x16
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--flops.print_table=false",
    "--data.batch_size=8",
    "--data.image_size=16",
]
FOLDER = [  # the poster's first row, fitted to this machine, on 2 classes x 20 images
    "--trainer.max_epochs=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.log_every_n_steps=1",
    "--flops.print_table=false",
    "--trainer.limit_train_batches=2",
    "--data.batch_size=4",
    "--data.image_size=16",
    "--data.resize_size=18",
    "--data.num_workers=0",
    "--cpu_threads=1",
]
AUTOENCODER = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=4",  # of 20
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_progress_bar=false",
    "--data.train_images=[chelsea.png]",
    "--data.val_images=[astronaut.png]",
    "--data.samples_per_epoch=40",
    "--data.batch_size=2",
    "--data.crop_size=32",
    "--data.val_crop_size=32",
    "--report.timing_size=32",
    "--report.timing_repeats=1",
]


def image_folder(root: Path) -> Path:
    for index, cls in enumerate(("n01", "n02")):
        for split, count in (("train", 20), ("val", 4)):
            for i in range(count):
                path = root / split / cls / f"{i}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (24, 20), (120 * index, 40, 200 - 90 * index)).save(path)
    return root


def recipe_args(recipe: str, tmp_path: Path, subcommand: str = "fit") -> tuple[Any, list[str]]:
    """The recipe module and its small-run options; logs and checkpoints go under ``tmp_path``."""
    root = tmp_path / "root"
    if recipe == "autoencoder":
        return autoencoder, [
            subcommand,
            *AUTOENCODER,
            f"--trainer.logger.init_args.save_dir={root}",
            f"--trainer.default_root_dir={root}",
        ]
    options = DIGITS if recipe == "digits" else FOLDER
    if recipe == "folder":
        options = [*options, f"--data.root={image_folder(tmp_path / 'imagenet')}"]
    return imagenet, [
        subcommand,
        *options,
        f"--trainer.logger.init_args.save_dir={root}",
        f"--trainer.default_root_dir={root}",
    ]


@pytest.fixture(autouse=True)
def _in_an_empty_folder(tmp_path, monkeypatch):
    """Each run starts in an empty working folder, from the recipe's own command line; the threads
    it sets (``cpu_threads``) are given back to the other tests."""
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setattr(sys, "argv", ["recipe.py"])
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(recipe: Any, args: list[str]) -> tuple[Any, list[str]]:
    """``recipe.main(args)``; the CLI and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        cli = recipe.main(args)
    return cli, [str(w.message) for w in caught]


def names(cli: Any) -> set[str]:
    return {type(callback).__name__ for callback in cli.trainer.callbacks}


def checkpoints(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.rglob("*.ckpt"))


# Each flag: (options, check(cli, warnings, tmp_path)). The run must end cleanly, leave the working
# folder empty, and pass the check.
def _fast_dev_run(cli, caught, tmp_path) -> None:
    assert cli.trainer.fast_dev_run and checkpoints(tmp_path) == []  # fast_dev_run writes none


def _no_logger(cli, caught, tmp_path) -> None:
    assert not cli.trainer.loggers and "LearningRateMonitor" not in names(cli)
    assert "KernelEmbeddings" not in names(cli)
    assert len([w for w in caught if "left out: the Trainer has no logger" in w]) <= 1


def _no_checkpointing(cli, caught, tmp_path) -> None:
    assert "ModelCheckpoint" not in names(cli) and checkpoints(tmp_path) == []


def _max_steps(cli, caught, tmp_path) -> None:
    assert cli.trainer.global_step == 3


def _limit_train_batches(cli, caught, tmp_path) -> None:
    full = len(cli.datamodule.train_dataloader())
    assert cli.trainer.num_training_batches == max(1, int(full * 0.1)) < full


def _accumulate(cli, caught, tmp_path) -> None:
    assert cli.trainer.global_step == cli.trainer.num_training_batches // 2


def _finished(cli, caught, tmp_path) -> None:
    assert cli.trainer.state.finished


def _bf16(cli, caught, tmp_path) -> None:
    assert cli.trainer.precision == "bf16-mixed"


FLAGS: dict[str, tuple[list[str], Callable]] = {
    "fast_dev_run": (["--trainer.fast_dev_run=true"], _fast_dev_run),
    "logger_false": (["--trainer.logger=false"], _no_logger),
    "enable_checkpointing_false": (["--trainer.enable_checkpointing=false"], _no_checkpointing),
    "max_steps": (["--trainer.max_steps=3", "--trainer.max_epochs=3"], _max_steps),
    "limit_train_batches": (["--trainer.limit_train_batches=0.1"], _limit_train_batches),
    "accumulate_grad_batches": (["--trainer.accumulate_grad_batches=2"], _accumulate),
    "gradient_clip_val": (["--trainer.gradient_clip_val=1.0"], _finished),
    "deterministic": (["--trainer.deterministic=true"], _finished),
    "bf16_mixed": (["--trainer.precision=bf16-mixed"], _bf16),
}
RECIPES = ("digits", "folder", "autoencoder")
# In CI: the flags that crashed before (fast_dev_run, no logger, no checkpointing) on every recipe
# that has them, and the training-loop flags once, together.
CI_CASES = [
    ("digits", "fast_dev_run"),
    ("digits", "logger_false"),
    ("digits", "enable_checkpointing_false"),
    ("autoencoder", "fast_dev_run"),
    ("autoencoder", "logger_false"),
    ("autoencoder", "enable_checkpointing_false"),
]


def check_flag(recipe_name: str, flag: str, tmp_path: Path, extra: tuple[str, ...] = ()) -> Any:
    options, check = FLAGS[flag]
    recipe, args = recipe_args(recipe_name, tmp_path)
    if flag == "limit_train_batches" and recipe_name != "autoencoder":
        # digits: 23 batches of 64, of which 0.1 are 2; the folder: 20 batches of 2, 0.1 are 2
        args.append("--data.batch_size=64" if recipe_name == "digits" else "--data.batch_size=2")
    cli, caught = run(recipe, [*args, *options, *extra])
    check(cli, caught, tmp_path)
    assert list((tmp_path / "work").iterdir()) == []  # nothing loose in the working folder
    return cli


@pytest.mark.parametrize(("recipe_name", "flag"), CI_CASES, ids=lambda v: v)
def test_a_flag_runs_to_a_clean_exit(recipe_name: str, flag: str, tmp_path) -> None:
    cli = check_flag(recipe_name, flag, tmp_path)
    assert cli.trainer.state.finished, cli.trainer.state


def test_the_training_loop_flags_together(tmp_path) -> None:
    """max_steps, accumulate_grad_batches, gradient_clip_val, deterministic and a fraction of the
    training batches in one small run (each alone: the slow matrix)."""
    recipe, args = recipe_args("digits", tmp_path)
    flags = ["--trainer.max_epochs=3", "--trainer.max_steps=2", "--data.batch_size=32"]
    flags += ["--trainer.limit_train_batches=0.1", "--trainer.accumulate_grad_batches=2"]
    flags += ["--trainer.gradient_clip_val=1.0", "--trainer.deterministic=true"]
    cli, _ = run(recipe, [*args, *flags])
    assert cli.trainer.num_training_batches == 4 and cli.trainer.global_step == 2
    assert cli.trainer.current_epoch == 1  # one epoch of two accumulated steps
    assert cli.trainer.gradient_clip_val == 1.0 and torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize(
    ("recipe_name", "flags", "message"),
    [
        ("digits", ["--trainer.accelerator=gpu"], "asks for GPUs and this machine has none"),
        ("autoencoder", ["--trainer.accelerator=gpu"], "asks for GPUs and this machine has none"),
        ("autoencoder", ["--trainer.limit_train_batches=0.01"], "limit_train_batches"),
    ],
    ids=["imagenet_gpu", "autoencoder_gpu", "autoencoder_too_few_batches"],
)
def test_a_flag_this_machine_cannot_honour_is_refused_in_one_line(
    recipe_name, flags, message, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    recipe, args = recipe_args(recipe_name, tmp_path)
    with pytest.raises(SystemExit) as exit_, contextlib.redirect_stdout(io.StringIO()):
        recipe.main([*args, *flags])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"{recipe.__name__}.py: error: ") and message in error
    assert "Traceback" not in error


# ----------------------------------------------------------------------------------- the full matrix


@pytest.mark.slow
@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("recipe_name", RECIPES)
def test_every_flag_on_every_recipe(recipe_name: str, flag: str, tmp_path) -> None:
    cli = check_flag(recipe_name, flag, tmp_path)
    assert cli.trainer.state.finished, cli.trainer.state


class Interrupt(Callback):
    """Stops a run in the middle of its second epoch, as a crash or a kill would."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == 0:
            raise RuntimeError("interrupted")


@pytest.mark.slow
@pytest.mark.parametrize("recipe_name", RECIPES)
def test_fit_ckpt_path_last_resumes_an_interrupted_run(recipe_name: str, tmp_path) -> None:
    recipe, args = recipe_args(recipe_name, tmp_path)
    args = [*args, "--trainer.max_epochs=2", "--trainer.limit_train_batches=2"]
    interrupt = f"--trainer.callbacks+={__name__}.Interrupt"
    with (
        contextlib.redirect_stdout(io.StringIO()),
        pytest.raises(RuntimeError, match="interrupted"),
    ):
        recipe.main([*args, interrupt])
    last = max(checkpoints(tmp_path), key=lambda path: path.stat().st_mtime)
    saved = torch.load(last, weights_only=False)
    assert saved["epoch"] == 0 and saved["global_step"] == 2  # the end of the first epoch
    # imagenet.py finds the run's last.ckpt itself; the autoencoder keeps no last.ckpt.
    resume = "--ckpt_path=last" if recipe is imagenet else f"--ckpt_path={last}"
    resumed, _ = run(recipe, [*args, resume])
    assert resumed.trainer.current_epoch == 2 and resumed.trainer.global_step == 4


@pytest.mark.slow
@pytest.mark.parametrize("recipe_name", RECIPES)
@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_validate_test_and_predict_on_a_checkpoint(recipe_name: str, stage: str, tmp_path) -> None:
    recipe, args = recipe_args(recipe_name, tmp_path)
    run(recipe, args)
    checkpoint = next(path for path in checkpoints(tmp_path) if path.name != "last.ckpt")
    _, stage_args = recipe_args(recipe_name, tmp_path, stage)
    if recipe is autoencoder and stage == "test":  # no test_step: refused in one line
        with pytest.raises(SystemExit) as exit_, contextlib.redirect_stdout(io.StringIO()):
            recipe.main([*stage_args, f"--ckpt_path={checkpoint}"])
        assert exit_.value.code == 2
        return
    if recipe is autoencoder and stage == "predict":
        photo = tmp_path / "photo.png"
        Image.new("RGB", (40, 24), (9, 99, 199)).save(photo)
        stage_args.append(f"--data.predict_paths=[{photo}]")
    cli, _ = run(recipe, [*stage_args, f"--ckpt_path={checkpoint}"])
    assert cli.trainer.state.finished


@pytest.mark.slow
@pytest.mark.parametrize("recipe_name", ["folder", "autoencoder"])
def test_two_cpu_processes_under_ddp(recipe_name: str, tmp_path) -> None:
    recipe, args = recipe_args(recipe_name, tmp_path)
    command = [sys.executable, recipe.__file__, *args, "--trainer.accelerator=cpu"]
    command += ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.logger=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        command, cwd=tmp_path / "work", env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr and list((tmp_path / "work").iterdir()) == []
