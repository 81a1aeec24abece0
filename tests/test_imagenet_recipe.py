"""`recipes/imagenet.py`: the embedded default run, the rows' configs, DDP, resume, ImageNet folders."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

import imagenet as recipe  # noqa: E402

ROWS = sorted((REPO / "recipes" / "configs").glob("*_*x.yaml")) + sorted(
    (REPO / "recipes" / "configs").glob("*_static.yaml")
)
QUICK = [  # two training batches and one validation batch of 8 images of 16×16
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.callbacks=[]",
    "--flops.print_table=false",
    "--data.batch_size=8",
    "--data.image_size=16",
]


def quick(tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", *QUICK, f"--trainer.logger.init_args.save_dir={tmp_path}", *extra]


@pytest.fixture(autouse=True)
def _command_line(monkeypatch) -> Iterator[None]:
    """The recipe is called as from its own command line, not with pytest's arguments; the
    threads it sets (``cpu_threads``) are given back to the other tests."""
    monkeypatch.setattr(sys, "argv", ["recipes/imagenet.py"])
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[recipe.KRRecipeCLI, str]:
    """One quick fit on the embedded default, and what it printed."""
    save_dir = tmp_path_factory.mktemp("runs")
    printed = io.StringIO()
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(sys, "argv", ["recipes/imagenet.py"])
        cli = recipe.main(quick(save_dir))
    torch.set_num_threads(threads)
    return cli, printed.getvalue()


def printed_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_:
        recipe.main([*args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_shows_the_embedded_default_and_the_kr_callbacks(capsys) -> None:
    config = printed_config(capsys, "fit")
    assert config["data"]["class_path"] == "lightning_kr.data.DigitsDataModule"
    assert config["model"]["model"] == "resnet18" and config["model"]["kr"]["mode"] == "kr"
    assert config["temperature"]["start"] == 30.0
    assert {"flops", "embeddings", "checkpoint", "skipped_images"} <= set(config)
    callbacks = [c["class_path"].rsplit(".", 1)[-1] for c in config["trainer"]["callbacks"]]
    assert {"RichProgressBar", "RichModelSummary"} <= set(callbacks)
    assert config["checkpoint"]["save_last"] is True
    assert config["cpu_threads"] == 1


@pytest.mark.parametrize("row", ROWS, ids=lambda path: path.stem)
def test_every_row_config_parses_with_its_published_recipe(capsys, row: Path) -> None:
    config = printed_config(capsys, "fit", f"--config={row}")
    arch, variant = row.stem.rsplit("_", 1)[0], row.stem.rsplit("_", 1)[1]
    mode = "static" if variant == "static" else row.stem.split("_")[-2]
    model = config["model"]
    kr = model["kr"]
    assert (kr["mode"] if kr else "static") == mode
    assert kr is None or kr["kernel_num"] == (4 if variant == "4x" else 1)
    assert config["data"]["class_path"] == "lightning_kr.data.ImageNetDataModule"
    assert config["data"]["init_args"]["image_size"] == 224
    assert config["trainer"]["logger"]["init_args"]["name"] == f"imagenet_{row.stem}"
    expected = {  # (model, optimiser, lr, weight decay, epochs)
        "resnet18": ("resnet18", "sgd", 0.1, 1e-4, 100),
        "mobilenet_v2_050": ("mobilenet_v2_050", "sgd", 0.05, 4e-5, 150),
        "vit_tiny": ("vit_tiny", "adamw", 1e-3, 0.05, 300),
    }[arch.removesuffix("_kr").removesuffix("_odconv")]
    assert (
        model["model"],
        model["optimizer"],
        model["lr"],
        model["weight_decay"],
        config["trainer"]["max_epochs"],
    ) == expected
    assert "Poster:" in row.read_text() and "github.com/" in row.read_text()
    # Nothing of the embedded default leaks into an ImageNet row.
    assert (kr is None or kr["preserve_function"] is True) and config["cpu_threads"] is None
    assert config["trainer"]["num_sanity_val_steps"] == 2
    assert config["embeddings"]["max_samples"] == 2000
    assert "max_shift" not in config["data"]["init_args"]


def test_fit_on_the_embedded_default_writes_logs_checkpoint_config_and_table(trained) -> None:
    cli, out = trained
    assert "embedded default" in out and "--data.root" in out  # said in the first lines
    assert out.index("embedded default") < out.index("fit: resnet18")
    for figure in ("top-1 accuracy", "parameters", "MACs overhead", "throughput"):
        assert figure in out
    run = Path(cli.trainer.log_dir)
    assert run.parent.name == "digits_resnet18_kr_1x"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["kr"]["mode"] == "kr"
    assert any(path.name.startswith("events.out.tfevents") for path in run.iterdir())
    results = json.loads((run / "results_fit.json").read_text())
    assert 0.0 <= results["acc_top1"] <= 1.0
    assert results["flops/kr_gmacs"] > results["flops/static_gmacs"] > 0
    assert results["params_m"] > results["params_static_m"]
    assert results["train_images_per_second"] > 0


def test_validate_test_and_predict_from_the_checkpoint(trained) -> None:
    cli, _ = trained
    run = Path(cli.trainer.log_dir)
    last = run / "checkpoints" / "last.ckpt"
    options = ["--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
    options += ["--trainer.limit_predict_batches=2", "--trainer.enable_progress_bar=false"]
    options += ["--trainer.callbacks=[]", "--data.batch_size=8", "--data.image_size=16"]
    options += [f"--trainer.logger.init_args.save_dir={run.parents[1]}", f"--ckpt_path={last}"]
    validated = recipe.main(["validate", *options])
    assert validated.results["acc_top1"] == pytest.approx(cli.results["acc_top1"])
    tested = recipe.main(["test", *options])
    assert tested.results["evaluated_on"] == "test set"
    recipe.main(["predict", *options])
    probabilities = torch.load(run / "predictions.pt")
    assert probabilities.shape == (16, 10)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(16))
    # Evaluating into the run's folder keeps the training config.
    assert (run / "config_validate.yaml").is_file() and (run / "config.yaml").is_file()


def test_static_baseline_leaves_out_the_kr_only_callbacks(tmp_path, capsys) -> None:
    cli = recipe.main(quick(tmp_path, "--model.kr=null"))
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert "TemperatureAnnealing" not in names and "FlopsOverhead" in names
    assert "left out" in capsys.readouterr().out
    assert cli.results["params_m"] == pytest.approx(cli.results["params_static_m"])


def test_resume_continues_the_same_run(tmp_path) -> None:
    first = recipe.main(quick(tmp_path))
    run, steps = Path(first.trainer.log_dir), first.trainer.global_step
    temperature = first.model.kr_model.temperature
    second = recipe.main(quick(tmp_path, "--trainer.max_epochs=2", "--ckpt_path=last"))
    assert Path(second.trainer.log_dir) == run  # the same folder, not version_1
    assert second.trainer.current_epoch == 2
    assert second.trainer.global_step == 2 * steps  # the optimiser and scheduler went on
    scheduler = second.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 2 * steps
    optimizer = second.trainer.optimizers[0]  # AdamW's state went on from the checkpoint
    assert all(int(state["step"]) == 2 * steps for state in optimizer.state.values())
    annealing = next(
        c for c in second.trainer.callbacks if type(c).__name__ == "TemperatureAnnealing"
    )
    assert annealing.batches == 2 * steps
    assert second.model.kr_model.temperature <= temperature
    assert (run / "config.yaml").is_file()


def test_ddp_two_cpu_processes_on_the_embedded_default(tmp_path) -> None:
    command = [
        sys.executable,
        str(REPO / "recipes" / "imagenet.py"),
        *quick(
            tmp_path,
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            "--embeddings.every_n_epochs=1",
            "--embeddings.max_samples=16",
        ),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = list((tmp_path / "digits_resnet18_kr_1x").glob("version_*"))
    assert len(runs) == 1  # both processes wrote into one run
    results = json.loads((runs[0] / "results_fit.json").read_text())
    assert results["devices"] == 2
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file()
    assert (runs[0] / "kernel_embeddings").is_dir()


def test_imagenet_row_without_data_explains_the_layout(tmp_path, capsys) -> None:
    row = REPO / "recipes" / "configs" / "resnet18_kr_1x.yaml"
    with pytest.raises(SystemExit) as exit_:
        recipe.main(["fit", f"--config={row}", f"--data.root={tmp_path / 'nowhere'}"])
    assert exit_.value.code == 2
    assert "ImageFolder layout" in capsys.readouterr().err


def test_data_root_alone_trains_the_first_row_on_a_folder_in_imagenet_layout(
    tmp_path, capsys
) -> None:
    root = tmp_path / "imagenet"
    for index, cls in enumerate(("n01", "n02", "n03")):
        for split, count in (("train", 8), ("val", 4)):
            for i in range(count):
                path = root / split / cls / f"{i}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (48, 40), (80 * index, 40, 200 - 60 * index)).save(path)
    (root / "train" / "n01" / "broken.JPEG").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match=r"train epoch 0: skipped 1 unreadable images"):
        cli = recipe.main(
            [
                "fit",
                f"--data.root={root}",
                "--data.image_size=32",
                "--data.resize_size=36",
                "--data.batch_size=5",
                "--data.num_workers=0",
                "--data.pin_memory=false",
                "--trainer.accelerator=cpu",
                "--trainer.devices=1",
                "--trainer.strategy=auto",
                "--trainer.precision=32-true",
                "--trainer.max_epochs=1",
                "--trainer.enable_progress_bar=false",
                "--trainer.callbacks=[]",
                "--flops.print_table=false",
                "--cpu_threads=1",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            ]
        )
    banner = capsys.readouterr().out
    assert "--data.root without --config" in banner and "global batch 5 (the row's: 256)" in banner
    assert cli.model.hparams.optimizer == "sgd" and cli.model.hparams.milestones == [30, 60, 90]
    assert cli.model.hparams.lr == pytest.approx(0.1 * 5 / 256)  # scaled by the global batch
    assert cli.model.num_classes == 3 and cli.model.hparams.image_size == 32
    assert cli.results["acc_top1"] is not None and cli.results["acc_top5"] is None
    assert cli.trainer.callback_metrics["data/skipped_images_train"] == 1
    assert cli.trainer.global_step == 5  # 25 files (one unreadable) in 5 batches of 5


def folder_in_imagenet_layout(root: Path) -> Path:
    for cls in ("n01", "n02"):
        for split in ("train", "val"):
            path = root / split / cls / "0.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(path)
    return root


def test_a_bare_data_root_adapts_to_the_machine_and_devices_8_asks_for_the_row(
    tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    root = folder_in_imagenet_layout(tmp_path / "imagenet")
    config = printed_config(capsys, "fit", f"--data.root={root}")
    trainer = config["trainer"]
    assert (trainer["accelerator"], trainer["devices"], trainer["strategy"]) == ("auto",) * 3
    assert trainer["precision"] == "32-true" and config["model"]["lr"] == pytest.approx(0.1 / 8)
    assert config["model"]["optimizer"] == "sgd" and config["trainer"]["max_epochs"] == 100
    row = printed_config(capsys, "fit", f"--data.root={root}", "--trainer.devices=8")
    assert (row["trainer"]["strategy"], row["model"]["lr"]) == ("ddp", 0.1)
    with pytest.raises(SystemExit) as exit_:
        recipe.main(["fit", f"--data.root={root}", "--trainer.devices=8"])
    assert exit_.value.code == 2
    assert "this machine has none: pass --trainer.accelerator auto" in capsys.readouterr().err
