"""Per-patch dynamic-convolution image autoencoder: fit, validate and predict with LightningCLI.

Trains on crops of the photographs bundled with scikit-image, validates on held-out photographs,
then prints PSNR, SSIM, parameter count, saved size of the encoder and of the whole model, and the
CPU time to reconstruct one 512×512 image::

    python recipes/autoencoder.py fit                        # the PatchDynamicConv2d autoencoder
    python recipes/autoencoder.py fit --model.kind=static    # the ordinary-conv baseline
    python recipes/autoencoder.py validate --ckpt_path=PATH/TO/last.ckpt
    python recipes/autoencoder.py predict --ckpt_path=PATH/TO/last.ckpt \\
        --data.predict_paths='[photo.png]'                   # writes photo_recon.png beside it

``recipes/autoencoder_benchmark.py`` trains both kinds the same way and prints them side by side.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import ArgsType, LightningArgumentParser
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table
from torch import nn
from torchvision.io import write_png

from lightning_kr.cli import RecipeCLI, exit_on_user_error
from lightning_kr.patch import LitAutoencoder, PatchAutoencoder, SampleImagesDataModule

FIGURES = {
    "val_psnr": "PSNR held-out (dB)",
    "val_ssim": "SSIM held-out",
    "parameters": "parameters",
    "encoder_kb": "encoder file (KB)",
    "model_kb": "model file (KB)",
    "cpu_seconds": "CPU time, one image (s)",
    "timing_size": "timed image side (px)",
    "cpu_threads": "CPU threads",
    "fit_seconds": "fit time (s)",
}


def saved_kilobytes(module: nn.Module, path: Path | None = None) -> float:
    """Size in KB (1000 bytes) of ``torch.save(module.state_dict())``, written to ``path`` if given."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return buffer.getbuffer().nbytes / 1000


@torch.inference_mode()
def cpu_seconds(autoencoder: nn.Module, size: int = 512, repeats: int = 5) -> float:
    """Fastest wall time of one ``(1, 3, size, size)`` CPU reconstruction, after 2 warm-ups.

    The fastest of ``repeats`` runs (``timeit``'s convention): slower runs measure other processes.
    """
    model = autoencoder.to("cpu").eval()
    image = torch.rand(1, 3, size, size)
    for _ in range(2):
        model(image)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(image)
        times.append(time.perf_counter() - start)
    return min(times)


def measure(
    autoencoder: PatchAutoencoder,
    out_dir: Path | None = None,
    timing_size: int = 512,
    timing_repeats: int = 5,
) -> dict[str, float]:
    """Parameters, saved sizes (``encoder.pt`` / ``autoencoder.pt`` in ``out_dir``) and CPU time."""
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    encoder_path = None if out_dir is None else out_dir / "encoder.pt"
    model_path = None if out_dir is None else out_dir / "autoencoder.pt"
    figures = {
        "parameters": sum(parameter.numel() for parameter in autoencoder.parameters()),
        "encoder_kb": saved_kilobytes(autoencoder.encoder, encoder_path),
        "model_kb": saved_kilobytes(autoencoder, model_path),
        "cpu_threads": torch.get_num_threads(),
    }
    device = next(autoencoder.parameters()).device
    training = autoencoder.training
    figures["cpu_seconds"] = cpu_seconds(autoencoder, timing_size, timing_repeats)
    figures["timing_size"] = timing_size
    autoencoder.to(device).train(training)
    return figures


def report_table(reports: dict[str, dict[str, Any]], title: str = "autoencoder") -> Table:
    """A rich table with one row per figure and one column per model."""
    table = Table(title=title)
    table.add_column("figure")
    for name in reports:
        table.add_column(name, justify="right")
    for key, label in FIGURES.items():
        if any(key in report for report in reports.values()):
            cells = [_format(report.get(key)) for report in reports.values()]
            table.add_row(label, *cells)
    return table


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


class AutoencoderReport(Callback):
    """After ``fit`` or ``validate``: measure the model, print a table, write ``report.json``.

    The figures are also kept in :attr:`figures` and the folder in :attr:`out_dir`.
    ``encoder.pt``, ``autoencoder.pt`` (state dicts) and ``report.json`` go to the run's folder: the
    logger's log directory, or without a logger ``<default_root_dir>/autoencoder_runs/<time>``
    (never loose files in the working directory); under ``fast_dev_run`` the table is printed and no
    file is written (as Lightning writes no log and no checkpoint then). Rank zero measures and
    writes; the folder is resolved on every rank (``trainer.log_dir`` is a collective call).

    Args:
        timing_size: side of the square image whose CPU reconstruction time is measured.
        timing_repeats: timed runs (after 2 warm-ups); the fastest is reported.
        dirpath: write to this folder instead.
    """

    def __init__(
        self, timing_size: int = 512, timing_repeats: int = 5, dirpath: str | None = None
    ) -> None:
        self.timing_size = timing_size
        self.timing_repeats = timing_repeats
        self.dirpath = dirpath
        self.figures: dict[str, Any] = {}
        self.out_dir: Path | None = None  # None: nothing written (fast_dev_run)
        self._fit_start = 0.0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out_dir = self.run_folder(trainer)
        self._report(trainer, pl_module, out_dir, fit_seconds=time.perf_counter() - self._fit_start)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._report(trainer, pl_module, self.run_folder(trainer))

    def run_folder(self, trainer: Trainer) -> Path | None:
        """The folder of this run's files, ``None`` under ``fast_dev_run``; call it on every rank
        (it broadcasts)."""
        log_dir = trainer.log_dir if trainer.loggers else None  # every rank: a collective call
        if self.dirpath is not None:
            self.out_dir = Path(self.dirpath)
        elif trainer.fast_dev_run:
            self.out_dir = None
        elif log_dir:
            self.out_dir = Path(log_dir)
        else:
            stamp = trainer.strategy.broadcast(time.strftime("%Y%m%d-%H%M%S"))
            self.out_dir = Path(trainer.default_root_dir) / "autoencoder_runs" / stamp
        return self.out_dir

    @rank_zero_only
    def _report(
        self, trainer: Trainer, pl_module: LightningModule, out_dir: Path | None, **extra: float
    ) -> None:
        metrics = trainer.callback_metrics
        self.figures = {
            "kind": pl_module.hparams.get("kind"),
            **{
                key.replace("/", "_"): float(metrics[key])
                for key in ("val/psnr", "val/ssim")
                if key in metrics
            },
            **measure(pl_module.autoencoder, out_dir, self.timing_size, self.timing_repeats),
            **extra,
        }
        Console().print(report_table({self.figures["kind"]: self.figures}))
        if out_dir is not None:
            (out_dir / "report.json").write_text(json.dumps(self.figures, indent=2))
            Console().print(f"report.json, encoder.pt, autoencoder.pt → {out_dir}")


class ReconstructionWriter(BasePredictionWriter):
    """Write each reconstruction beside its input, ``photo.png`` -> ``photo_recon.png``."""

    def __init__(self, suffix: str = "_recon") -> None:
        super().__init__(write_interval="batch")
        self.suffix = suffix

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: dict[str, Any],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        for image, source in zip(prediction["reconstruction"], prediction["path"], strict=True):
            source = Path(source)
            target = source.with_name(f"{source.stem}{self.suffix}.png")
            pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
            write_png(pixels, str(target))


class AutoencoderCLI(RecipeCLI):
    """LightningCLI with the report and the PNG writer always on (``--report.*``, ``--writer.*``);
    a :class:`~lightning_kr.cli.RecipeCLI`, so every standard Trainer flag runs or is refused with
    a sentence that says what to change."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(AutoencoderReport, "report")
        parser.add_lightning_class_args(ReconstructionWriter, "writer")


def main(args: ArgsType = None, run: bool = True) -> AutoencoderCLI:
    """Run the recipe; ``args`` as on the command line, e.g. ``["fit", "--model.kind=static"]``.

    A user's mistake ends it as a wrong option does: ``autoencoder.py: error: ...`` on stderr,
    exit status 2, no traceback.
    """
    with exit_on_user_error("autoencoder.py"):
        return AutoencoderCLI(
            LitAutoencoder,
            SampleImagesDataModule,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "max_epochs": 3,
                "gradient_clip_val": 1.0,
                "log_every_n_steps": 10,
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "lightning_logs", "name": "autoencoder"},
                },
            },
            args=args,
            run=run,
        )


if __name__ == "__main__":
    main()
