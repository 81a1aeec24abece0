"""The autoencoders, the bundled-photo data module, and the recipe's fit / validate / predict."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torchvision.io import write_png

from lightning_kr.patch import (
    LitAutoencoder,
    PatchDynamicConv2d,
    SampleImagesDataModule,
    build_autoencoder,
    count_parameters,
    load_sample_image,
)
from lightning_kr.patch.sample_images import TRAIN_IMAGES, VAL_IMAGES, grid_crops, read_rgb

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture
def recipe(monkeypatch):
    monkeypatch.syspath_prepend(str(RECIPES))
    monkeypatch.setattr("sys.argv", ["autoencoder.py"])
    import autoencoder

    return autoencoder


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_encodes_8x_smaller_4_channels_and_decodes_into_unit_range(kind):
    model = build_autoencoder(kind)
    images = torch.rand(2, 3, 64, 96)
    latent = model.encode(images)
    assert latent.shape == (2, 4, 8, 12)
    out = model(images)
    assert out.shape == images.shape
    assert out.min() >= 0 and out.max() <= 1
    assert isinstance(model.decoder[-1], nn.PixelShuffle)


def test_dynamic_autoencoder_is_one_patch_dynamic_conv_each_way():
    model = build_autoencoder("dynamic")
    assert isinstance(model.encoder, PatchDynamicConv2d)
    assert model.encoder.stride == (8, 8) and model.encoder.kernel_size == (8, 8)
    assert isinstance(model.decoder[0], PatchDynamicConv2d)
    assert model.decoder[0].out_channels == 3 * 8 * 8


@pytest.mark.parametrize("hidden", [(14, 8), (10, 16), ((8, 8), 4)])
def test_static_baseline_has_the_parameter_count_of_the_dynamic_one(hidden):
    encoder_hidden, decoder_hidden = hidden
    dynamic = build_autoencoder(
        "dynamic", encoder_hidden=encoder_hidden, decoder_hidden=decoder_hidden
    )
    static = build_autoencoder(
        "static", encoder_hidden=encoder_hidden, decoder_hidden=decoder_hidden
    )
    for part in ("encoder", "decoder"):
        ratio = count_parameters(getattr(static, part)) / count_parameters(getattr(dynamic, part))
        assert abs(ratio - 1) < 0.01, part


def test_rejects_sizes_that_are_not_a_multiple_of_the_downscale():
    with pytest.raises(ValueError, match="multiple of 8"):
        build_autoencoder("static").encode(torch.rand(1, 3, 60, 64))


def test_training_loss_sees_overshooting_pixels():
    model = LitAutoencoder(kind="static")
    with torch.no_grad():
        model.autoencoder.decoder[-2].bias.fill_(5.0)  # every pixel far above 1
    loss = model.training_step(torch.rand(2, 3, 16, 16), 0)
    loss.backward()
    assert model.autoencoder.decoder[-2].bias.grad.abs().sum() > 0


def test_bundled_photos_are_files_inside_scikit_image():
    for name in (*TRAIN_IMAGES, *VAL_IMAGES):
        image = load_sample_image(name)
        assert image.shape[0] == 3 and image.min() >= 0 and image.max() <= 1
    assert not set(TRAIN_IMAGES) & set(VAL_IMAGES)
    with pytest.raises(MisconfigurationException, match="not bundled"):
        load_sample_image("no_such_photo.png")


def test_data_module_gives_random_flipped_crops_and_held_out_tiles():
    data = SampleImagesDataModule(
        batch_size=4, samples_per_epoch=8, crop_size=64, val_crop_size=256
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch.shape == (4, 3, 64, 64)
    assert len(data.val_set) == 4 + 2  # astronaut 512×512: 2×2 tiles, coffee 400×600: 1×2 tiles
    with pytest.raises(MisconfigurationException, match="both"):
        SampleImagesDataModule(train_images=["astronaut.png"], val_images=["astronaut.png"])


def test_grid_crops_do_not_overlap():
    image = torch.arange(2 * 4 * 6, dtype=torch.float).view(1, 8, 6).expand(3, -1, -1)
    tiles = grid_crops([image], 2)
    assert tiles.shape == (4 * 3, 3, 2, 2)
    assert tiles[:, 0].flatten().unique().numel() == 8 * 6


def fit_args(tmp_path: Path) -> list[str]:
    return [
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_progress_bar=false",
        "--data.train_images=[chelsea.png]",
        "--data.val_images=[astronaut.png]",
        "--data.samples_per_epoch=4",
        "--data.batch_size=2",
        "--data.crop_size=64",
        "--data.val_crop_size=64",
        "--report.timing_size=64",
        "--report.timing_repeats=1",
    ]


def test_recipe_fit_then_validate_and_predict(recipe, tmp_path):
    cli = recipe.main(["fit", *fit_args(tmp_path)])
    report = next(cb for cb in cli.trainer.callbacks if isinstance(cb, recipe.AutoencoderReport))
    figures = report.figures
    assert figures["kind"] == "dynamic"
    assert 0 < figures["val_psnr"] < 100 and -1 <= figures["val_ssim"] <= 1
    assert figures["encoder_kb"] < figures["model_kb"]
    log_dir = Path(cli.trainer.log_dir)
    assert json.loads((log_dir / "report.json").read_text())["parameters"] == figures["parameters"]
    assert (log_dir / "encoder.pt").stat().st_size == pytest.approx(figures["encoder_kb"] * 1000)

    checkpoint = next(log_dir.glob("checkpoints/*.ckpt"))
    cli = recipe.main(["validate", f"--ckpt_path={checkpoint}", *fit_args(tmp_path)])
    report = next(cb for cb in cli.trainer.callbacks if isinstance(cb, recipe.AutoencoderReport))
    assert report.figures["val_psnr"] == pytest.approx(figures["val_psnr"], rel=1e-4)

    photo = tmp_path / "photo.png"
    write_png((load_sample_image("astronaut.png")[:, :45, :70] * 255).to(torch.uint8), str(photo))
    predict_args = [f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]
    recipe.main(
        ["predict", f"--ckpt_path={checkpoint}", f"--data.predict_paths=[{photo}]", *predict_args]
    )
    reconstruction = read_rgb(tmp_path / "photo_recon.png")
    assert reconstruction.shape == (3, 45, 70)


def test_predict_without_images_says_how_to_pass_them(recipe, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        recipe.main(["predict", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"])
    assert exit_.value.code == 2
    assert "autoencoder.py: error: " in capsys.readouterr().err


def test_benchmark_prints_both_kinds(recipe, tmp_path):
    import autoencoder_benchmark

    reports = autoencoder_benchmark.main(fit_args(tmp_path))
    assert set(reports) == {"dynamic", "static"}
    assert reports["dynamic"]["kind"] == "dynamic" and reports["static"]["kind"] == "static"
    assert abs(reports["static"]["parameters"] / reports["dynamic"]["parameters"] - 1) < 0.01
    assert (
        json.loads((tmp_path / "autoencoder" / "benchmark.json").read_text()).keys()
        == reports.keys()
    )


def test_recipe_under_ddp_without_a_logger_writes_to_its_run_folder(tmp_path):
    """Two CPU processes (``strategy="ddp"`` relaunches the script), no logger: the report is
    written once, in ``<default_root_dir>/autoencoder_runs/<time>``, nothing in the working folder,
    and no rank waits on a collective call that only rank zero makes (a hang before)."""
    workdir, root = tmp_path / "cwd", tmp_path / "root"
    workdir.mkdir()
    args = [
        a
        for a in fit_args(tmp_path)
        if not a.startswith(("--trainer.logger", "--trainer.default_root_dir"))
    ]
    command = [
        sys.executable, str(RECIPES / "autoencoder.py"), "fit", *args, "--trainer.logger=false",
        f"--trainer.default_root_dir={root}", "--trainer.accelerator=cpu", "--trainer.devices=2",
        "--trainer.strategy=ddp",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(RECIPES.parent)}
    result = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (root / "autoencoder_runs").iterdir()
    assert {p.name for p in run.iterdir()} >= {"report.json", "encoder.pt", "autoencoder.pt"}
    assert json.loads((run / "report.json").read_text())["kind"] == "dynamic"
    assert list(workdir.iterdir()) == []
