"""Numerical faults (issue 22, item 5): a NaN or Inf image leaves the other images of its batch alone
in eval mode, for every convolution strategy; a non-finite training loss stops the run and the last
good checkpoint keeps finite weights."""

from __future__ import annotations

import contextlib
import io
import itertools
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_kr import kr_convert
from lightning_kr.callbacks import NonFiniteLossError, StopOnNonFiniteLoss
from lightning_kr.layers import KRConv2d
from lightning_kr.layers.dynamic_conv import STRATEGIES

REPO = Path(__file__).resolve().parents[1]
FAULTS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
LAYERS = {  # between them, every strategy applies to one
    "4_kernels": {"kernel_num": 4},
    "1_kernel": {"kernel_num": 1},
    "channel_filter": {"kernel_num": 1, "attentions": ("channel", "filter")},
}


def applicable(layer: KRConv2d) -> list[str]:
    """The strategies that can apply this layer's attentions (as in test_strategies_fuzzed)."""
    heads = layer.generator.heads
    names = []
    for name in STRATEGIES:
        if name == "shared" and ("kernel" in heads or "spatial" in heads):
            continue
        if name == "tap_scaled" and "kernel" in heads:
            continue
        names.append(name)
    return names


def test_every_strategy_is_checked_by_one_layer() -> None:
    covered = {
        name for options in LAYERS.values() for name in applicable(KRConv2d(4, 4, 3, **options))
    }
    assert covered == set(STRATEGIES)


@pytest.mark.parametrize("options", LAYERS.values(), ids=LAYERS.keys())
def test_a_bad_image_does_not_leak_into_the_batch_for_any_strategy(options) -> None:
    layer = KRConv2d(6, 8, 3, padding=1, repr_dim=3, min_hidden=4, zero_init=False, **options)
    layer.eval()
    x, d = torch.randn(4, 6, 7, 7), torch.randn(4, 3)
    others = [0, 3]
    with torch.no_grad():
        for fault, name in itertools.product(FAULTS.values(), applicable(layer)):
            bad_x, bad_d = x.clone(), d.clone()
            bad_x[1, :, 2, 3] = fault
            bad_d[2, 0] = fault  # a bad representation in another image
            layer.strategy = name
            clean, clean_d = layer.forward_with_repr(x, d)
            y, d_next = layer.forward_with_repr(bad_x, bad_d)
            assert torch.isfinite(y[others]).all(), name
            torch.testing.assert_close(y[others], clean[others], msg=lambda m, n=name: f"{n}: {m}")
            torch.testing.assert_close(d_next[others], clean_d[others])


def test_a_converted_model_keeps_the_images_of_a_batch_independent() -> None:
    """Stem, KR layers, BatchNorm in eval, joint head: one image of NaN changes no other output."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip
    kr = kr_convert(model, kernel_num=4, example_input=torch.randn(2, 3, 16, 16)).eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        clean = kr(images)
        images[1] = float("nan")
        faulty = kr(images)
    assert torch.isnan(faulty[1]).all()
    assert torch.isfinite(faulty[[0, 2]]).all()
    torch.testing.assert_close(faulty[[0, 2]], clean[[0, 2]])


# ----------------------------------------------------------------------------------- training


class Diverging(LightningModule):
    """A linear model whose loss becomes NaN at ``nan_at`` (a global step)."""

    def __init__(self, nan_at: int) -> None:
        super().__init__()
        self.nan_at = nan_at
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.net(batch[0]).pow(2).mean()
        return loss * float("nan") if self.global_step >= self.nan_at else loss

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(12, 4))
        return torch.utils.data.DataLoader(data, batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_nan_loss_stops_training_and_the_last_checkpoint_stays_finite(tmp_path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    trainer = Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint, StopOnNonFiniteLoss()],
        default_root_dir=tmp_path,
    )
    model = Diverging(nan_at=5)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 1, step 5: .*last\.ckpt"):
        trainer.fit(model)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # never stepped on NaN
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_the_recipe_stops_on_a_nan_loss_in_one_line(tmp_path, capsys, monkeypatch) -> None:
    """``recipes/imagenet.py``: the second epoch diverges; the run ends with ``imagenet.py: error:``
    and the first epoch's ``last.ckpt`` is left as it was."""
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    monkeypatch.setattr(sys, "argv", ["recipes/imagenet.py"])
    import imagenet

    threads = torch.get_num_threads()
    original = imagenet.KRClassifier.training_step

    def diverging(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.current_epoch == 1 else loss

    monkeypatch.setattr(imagenet.KRClassifier, "training_step", diverging)
    args = ["fit", "--trainer.max_epochs=2", "--trainer.limit_train_batches=2"]
    args += ["--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]
    args += ["--trainer.callbacks=[]", "--flops.print_table=false", "--data.batch_size=8"]
    args += ["--data.image_size=16", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    with pytest.raises(SystemExit) as exit_, contextlib.redirect_stdout(io.StringIO()):
        imagenet.main(args)
    torch.set_num_threads(threads)
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("imagenet.py: error: training loss is nan at epoch 1, step 2")
    (last,) = tmp_path.rglob("last.ckpt")
    saved = torch.load(last, weights_only=False)
    assert saved["epoch"] == 0 and saved["global_step"] == 2
    assert all(
        torch.isfinite(v).all()
        for v in saved["state_dict"].values()
        if torch.is_tensor(v) and v.is_floating_point()
    )
