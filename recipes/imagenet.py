"""Train, validate, test and predict KR classifiers: the poster's ImageNet rows, or the embedded digits.

With no data root, ``fit`` trains a KR ResNet-18 on the handwritten digits bundled with
scikit-learn (a couple of minutes on two CPU cores); a config under ``recipes/configs/`` selects a
row of the poster and ``--data.root`` points at ImageNet::

    python recipes/imagenet.py fit                                   # embedded digits
    python recipes/imagenet.py fit --model.kr null                   # its static baseline
    python recipes/imagenet.py fit --data.root /data/imagenet        # row resnet18_kr_1x, this machine
    python recipes/imagenet.py fit --data.root /data/imagenet --trainer.devices 8   # its 8-GPU DDP run
    python recipes/imagenet.py fit --config recipes/configs/vit_tiny_kr_4x.yaml \\
        --data.root /data/imagenet                                    # another row (8 GPUs, DDP)
    python recipes/imagenet.py fit --config ... --ckpt_path last     # resume the latest run
    python recipes/imagenet.py validate --config ... --ckpt_path runs/.../checkpoints/last.ckpt
    python recipes/imagenet.py fit --print_config                    # the resolved configuration

A bare ``--data.root`` keeps the row's hyper-parameters and runs on what the machine has
(Lightning's ``auto`` accelerator and devices; the learning rate scaled by the global batch); the
start-up banner says what was chosen. A user's mistake (a wrong root, GPUs that are not there, a
flag combination Lightning refuses) ends the command with ``imagenet.py: error: ...``, no traceback.

Defaults come from ``recipes/configs/default.yaml`` (the embedded run); a ``--config`` given on the
command line overrides them. Every run writes TensorBoard logs, checkpoints (``last.ckpt`` and the
best by validation top-1) and the resolved ``config.yaml`` to ``<save_dir>/<name>/version_<n>``,
and ends with a table: accuracy, parameters, MACs overhead (from ``FlopsOverhead``) and throughput.
"""

# ruff: noqa: E402  (the clock starts before the imports: the closing table's wall time counts them)
from __future__ import annotations

import time

START = time.perf_counter()

import warnings

# fvcore (FlopsOverhead) decorates functions with torch.jit.script at import: not this run's concern.
warnings.filterwarnings(
    "ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning
)

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from rich.console import Console
from rich.table import Table

from lightning_kr.callbacks import (
    FlopsOverhead,
    KernelEmbeddings,
    NonFiniteLossError,
    StopOnNonFiniteLoss,
    TemperatureAnnealing,
)
from lightning_kr.classifier import KRClassifier
from lightning_kr.cli import RecipeCLI, exit_on_user_error
from lightning_kr.cli.machine import MachineFit, fit_to_machine, given_keys
from lightning_kr.data import SkippedImagesReport
from lightning_kr.data.folder_layout import class_folders
from lightning_kr.layers import KRLayer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "configs"
DEFAULT_CONFIG = CONFIGS / "default.yaml"
EXAMPLE_ROW = "recipes/configs/resnet18_kr_1x.yaml"
ROW_GPU_HINT = (
    "A row's lr is for its global batch (8 GPUs x data.batch_size): on N GPUs scale --model.lr by "
    "N / 8; or give --data.root without --config, which fits the row to this machine."
)


class ThroughputMeter(Callback):
    """Training images per second over the whole fit: data loading and optimisation, not validation.

    Each epoch is timed from its start to the end of its last training batch; images are counted on
    every process and summed at the end (``images_per_second`` is the rate of all processes).
    """

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self.images_per_second: float | None = None
        self._epoch_start: float | None = None
        self._last_batch_end: float | None = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_start = self._last_batch_end = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.images += len(batch[0])
        self._last_batch_end = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._epoch_start is not None and self._last_batch_end is not None:
            self.seconds += self._last_batch_end - self._epoch_start
        self._epoch_start = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        count = torch.tensor(float(self.images), device=pl_module.device)  # NCCL needs the GPU
        images = trainer.strategy.reduce(count, reduce_op="sum")
        if self.seconds > 0:
            self.images_per_second = float(images) / self.seconds


class StageConfigSaver(SaveConfigCallback):
    """Save the resolved config as ``config.yaml`` for ``fit``, ``config_<stage>.yaml`` otherwise,
    so that validating or resuming into a run's folder keeps the config it was trained with."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        stage = getattr(stage, "value", stage)  # a TrainerFn
        self.config_filename = "config.yaml" if stage == "fit" else f"config_{stage}.yaml"
        super().setup(trainer, pl_module, stage)


@torch.inference_mode()
def inference_throughput(
    model: torch.nn.Module,
    example: torch.Tensor,
    batch_size: int,
    repeats: int = 5,
    budget_s: float = 2.0,
) -> float:
    """Images per second of ``model`` in eval mode on batches of ``batch_size`` copies of ``example``
    (1, C, H, W), on the model's device: the median of up to ``repeats`` timed passes after one
    warm-up, stopping early once ``budget_s`` seconds are spent (at least two passes)."""
    parameter = next(model.parameters())
    images = example.to(parameter.device, parameter.dtype).expand(batch_size, -1, -1, -1)
    images = images.contiguous()
    synchronize = torch.cuda.synchronize if parameter.device.type == "cuda" else lambda: None
    training = model.training
    model.eval()
    try:
        model(images)
        times: list[float] = []
        while len(times) < repeats and (len(times) < 2 or sum(times) < budget_s):
            synchronize()
            start = time.perf_counter()
            model(images)
            synchronize()
            times.append(time.perf_counter() - start)
    finally:
        model.train(training)
    return batch_size / statistics.median(times)


def _find(trainer: Trainer, kind: type) -> Any:
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def _scalar(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def _macs(trainer: Trainer) -> dict[str, float]:
    """MAC counts as ``FlopsOverhead`` logged them (``trainer.callback_metrics``) or kept them."""
    keys = ("flops/static_gmacs", "flops/kr_gmacs", "flops/overhead_pct")
    metrics = trainer.callback_metrics
    if all(key in metrics for key in keys):
        return {key: float(metrics[key]) for key in keys}
    flops = _find(trainer, FlopsOverhead)
    result = getattr(flops, "result", None)
    if result is None:
        return {}
    return {
        "flops/static_gmacs": result.static.gmacs,
        "flops/kr_gmacs": result.kr.gmacs,
        "flops/overhead_pct": result.overhead_pct,
    }


def collect_results(trainer: Trainer, classifier: KRClassifier, stage: str) -> dict[str, Any]:
    """The figures of the closing table, as plain numbers and strings."""
    metrics = trainer.callback_metrics
    prefix = "test" if stage == "test" else "val"
    kr = classifier.kr_model
    static_params = kr.report.params_before if kr is not None else _count(classifier.model)
    results: dict[str, Any] = {
        "model": str(classifier.hparams.get("model", type(classifier.model).__name__)),
        "mode": kr.config.mode if kr is not None else "static",
        "kernel_num": kr.config.kernel_num if kr is not None else None,
        "evaluated_on": "test set" if stage == "test" else "last validation",
        "acc_top1": _scalar(metrics, f"{prefix}/acc_top1"),
        "acc_top5": _scalar(metrics, f"{prefix}/acc_top5"),
        "params_static_m": static_params / 1e6,
        "params_m": _count(classifier.model) / 1e6,
        **_macs(trainer),
        "devices": trainer.world_size,
        "epochs": trainer.current_epoch,
        "wall_seconds": time.perf_counter() - START,
    }
    checkpoint = trainer.checkpoint_callback
    if isinstance(checkpoint, ModelCheckpoint) and stage == "fit":
        results["best_acc_top1"] = (
            float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None
        )
        results["best_checkpoint"] = checkpoint.best_model_path or None
        results["last_checkpoint"] = checkpoint.last_model_path or None
    meter = _find(trainer, ThroughputMeter)
    if stage == "fit" and meter is not None:
        results["train_images_per_second"] = meter.images_per_second
    # logger.log_dir, not trainer.log_dir: that one is a collective call and this runs on rank 0.
    if trainer.logger is not None and trainer.logger.log_dir:
        results["log_dir"] = trainer.logger.log_dir
    return results


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def results_table(results: dict[str, Any], title: str) -> Table:
    """A rich table of :func:`collect_results`' figures."""
    table = Table(title=title, title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("note")

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f} %"

    table.add_row("top-1 accuracy", percent(results.get("acc_top1")), results["evaluated_on"])
    if results.get("best_acc_top1") is not None:
        table.add_row("best top-1", percent(results["best_acc_top1"]), "best checkpoint")
    if results.get("acc_top5") is not None:
        table.add_row("top-5 accuracy", percent(results["acc_top5"]), "")
    added = 100 * (results["params_m"] / results["params_static_m"] - 1)
    table.add_row(
        "parameters",
        f"{results['params_m']:.2f} M",
        f"static {results['params_static_m']:.2f} M, {added:+.1f} %",
    )
    if "flops/kr_gmacs" in results:
        table.add_row(
            "MACs overhead",
            f"{results['flops/overhead_pct']:+.2f} %",
            f"{results['flops/static_gmacs']:.4g} → {results['flops/kr_gmacs']:.4g} GMACs per image "
            "(FlopsOverhead)",
        )
    else:
        table.add_row("MACs overhead", "-", "no FlopsOverhead result in this run")
    if results.get("train_images_per_second"):
        table.add_row(
            "training throughput",
            f"{results['train_images_per_second']:,.0f} img/s",
            f"{results['devices']} process(es), without validation",
        )
    if results.get("inference_images_per_second"):
        table.add_row(
            "inference throughput",
            f"{results['inference_images_per_second']:,.0f} img/s",
            results.get("inference_note", ""),
        )
    table.add_row("wall time", f"{results['wall_seconds']:.0f} s", "since the recipe started")
    for key, label in (
        ("last_checkpoint", "checkpoint"),
        ("log_dir", "logs, config"),
    ):
        if results.get(key):
            table.add_row(label, "", str(results[key]))
    return table


def _applies(callback: Callback, classifier: Any) -> bool:
    """Whether a KR callback has anything to act on in this model."""
    if not isinstance(classifier, KRClassifier):
        return True
    kr = classifier.kr_model
    if isinstance(callback, TemperatureAnnealing):
        return any(isinstance(m, KRLayer) for m in classifier.modules())
    if isinstance(callback, KernelEmbeddings):
        if kr is None:
            return callback.depths is None and callback.layers is None
        return callback.depths is None or kr.stem is not None
    return True


def _root_without_config(args: list[str]) -> bool:
    """``args`` (subcommand first) give a data root but neither a config nor a data class."""
    options = [a.split("=", 1)[0] for a in args[1:] if isinstance(a, str)]
    root = any(o in ("--data.root", "--data.init_args.root") for o in options)
    chosen = any(o in ("--config", "-c", "--data", "--data.class_path") for o in options)
    return bool(args) and args[0] in ("fit", "validate", "test", "predict") and root and not chosen


def _class_path(config: Namespace, key: str) -> str:
    value = config.get(key)
    return str(value.get("class_path", "")) if isinstance(value, Namespace) else ""


class KRRecipeCLI(RecipeCLI):
    """LightningCLI with the KR callbacks on by default, data-driven class count and image size,
    resumable runs (``--ckpt_path last`` continues the latest run's folder) and a closing table.

    A :class:`~lightning_kr.cli.RecipeCLI`: the callbacks give way to the Trainer's flags (no
    checkpoint callback under ``--trainer.enable_checkpointing false``, no LR monitor without a
    logger) and a GPU run on a machine without those GPUs is refused before anything is built.
    ``fit --data.root R`` alone trains the poster's row :data:`EXAMPLE_ROW` on this machine
    (:func:`~lightning_kr.cli.machine.fit_to_machine`: Lightning's ``auto`` accelerator and devices,
    the row's hyper-parameters, the learning rate scaled by the global batch); its 8-GPU DDP
    settings apply with ``--config`` or ``--trainer.devices 8``.

    Callback groups (each configurable, e.g. ``--temperature.epochs 10``): ``checkpoint``
    (ModelCheckpoint), ``flops`` (FlopsOverhead), ``temperature`` (TemperatureAnnealing),
    ``embeddings`` (KernelEmbeddings), ``skipped_images`` (SkippedImagesReport). Temperature
    annealing and kernel embeddings are left out, with a note, for models they cannot act on (the
    static baseline; kernel representations in the ODConv ablation).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--cpu_threads",
            type=int | None,
            default=None,
            help="Intra-op CPU threads per process (torch.set_num_threads); null: torch's default. "
            "Small CPU models run about as fast on one thread, and one thread does not collapse "
            "when other processes share the cores.",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc_top1",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:03d}-top1{val/acc_top1:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(FlopsOverhead, "flops")
        parser.add_lightning_class_args(TemperatureAnnealing, "temperature")
        parser.add_lightning_class_args(KernelEmbeddings, "embeddings")
        parser.add_lightning_class_args(SkippedImagesReport, "skipped_images")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.image_size", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        self.implied_row: str | None = None
        self.machine: MachineFit | None = None
        given = sys.argv[1:] if args is None else args
        if isinstance(given, list) and _root_without_config(given):
            # `fit --data.root /imagenet` alone: the ImageNet counterpart of the embedded default,
            # on this machine.
            self.implied_row = EXAMPLE_ROW
            row = [given[0], f"--config={REPO / EXAMPLE_ROW}"]
            # Parsed twice: the settings this machine gets depend on the parsed batch size and
            # devices, and go in as options, so that --print_config and config.yaml show them.
            plain = [a for a in given[1:] if not str(a).startswith("--print_config")]
            first = parser.parse_args([*row, *plain])[given[0]]
            fitted = self._fit_to_machine(first, given_keys(given))
            self.config = parser.parse_args([*row, *fitted, *given[1:]])
        else:
            super().parse_arguments(parser, args)
        self._announce()

    def _fit_to_machine(self, config: Namespace, given: set[str]) -> list[str]:
        """The options that fit :data:`EXAMPLE_ROW` to this machine (:attr:`machine` says why)."""
        row = yaml.safe_load((REPO / EXAMPLE_ROW).read_text())
        self.machine = fit_to_machine(row, config.as_dict(), given)
        options = [f"--trainer.{key}={value}" for key, value in self.machine.trainer.items()]
        options += [f"--data.init_args.{key}={value}" for key, value in self.machine.data.items()]
        return [*options, f"--model.lr={self.machine.lr!r}"]

    @rank_zero_only
    def _announce(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else self.config
        if config is None:
            return
        data = _class_path(config, "data")
        model = config.get("model")
        kr = model.get("kr") if isinstance(model, Namespace) else None
        row = (
            f"{model.model} · " + (f"{kr.mode} {kr.kernel_num}x" if kr is not None else "static")
            if isinstance(model, Namespace)
            else "?"
        )
        console = Console(soft_wrap=True)  # no hard line breaks: the commands stay copyable
        if data.endswith("DigitsDataModule"):
            console.print(
                f"[bold]lightning-kr[/bold] · {subcommand} [bold]{row}[/bold] · no data root given: "
                "using the embedded default, the 1,797 handwritten digits bundled with "
                "scikit-learn (8×8 grey → small RGB images, 10 classes, fixed stratified split "
                "1,437 / 360).\n"
                "To train on ImageNet (root/train/<class>/*.JPEG, root/val/<class>/*.JPEG):\n"
                "  python recipes/imagenet.py fit --data.root /path/to/imagenet\n"
                f"trains the poster's row {EXAMPLE_ROW} on this machine (its 8-GPU DDP run: add "
                "--trainer.devices 8); any other row: --config recipes/configs/<row>.yaml.",
                markup=True,
                highlight=False,
            )
        else:
            if self.implied_row and self.machine is not None:
                console.print(
                    f"--data.root without --config: the poster's row {self.implied_row} "
                    f"{self.machine.describe()}. The row's 8-GPU DDP run: --trainer.devices 8 or "
                    f"--config {self.implied_row}.",
                    highlight=False,
                )
            root = config.data.init_args.get("root") if isinstance(config.data, Namespace) else None
            console.print(
                f"[bold]lightning-kr[/bold] · {subcommand} [bold]{row}[/bold] · "
                f"data {data.rsplit('.', 1)[-1]} {root or ''}",
                highlight=False,
            )

    def before_instantiate_classes(self) -> None:
        subcommand = self.subcommand
        config = self.config.get(subcommand) if subcommand else self.config
        imagenet = _class_path(config, "data").endswith("ImageNetDataModule")
        if imagenet:
            # Checked here too so that a wrong root reads as this error, not as jsonargparse's.
            class_folders(config.data.init_args.get("root"))
        self.gpu_hint = ROW_GPU_HINT if imagenet else ""
        super().before_instantiate_classes()  # GPUs asked for and not there: refused
        if config.get("ckpt_path"):
            pin_logger_version(config, str(config.ckpt_path))
        if config.get("cpu_threads"):
            torch.set_num_threads(config.cpu_threads)

    def after_instantiate_classes(self) -> None:
        kept = [c for c in self.trainer.callbacks if _applies(c, self.model)]
        dropped = [type(c).__name__ for c in self.trainer.callbacks if c not in kept]
        if dropped:
            rank_zero_only(Console(soft_wrap=True).print)(
                f"[dim]left out {', '.join(dropped)}: nothing to act on in a "
                f"{getattr(self.model.hparams, 'mode', '?')} model[/dim]"
            )
        self.trainer.callbacks = kept
        if self.subcommand == "fit":
            # A NaN loss stops the run before the weights, or any checkpoint, take it.
            self.trainer.callbacks += [ThroughputMeter(), StopOnNonFiniteLoss()]

    def after_fit(self) -> None:
        self._report("fit")

    def after_validate(self) -> None:
        self._report("validate")

    def after_test(self) -> None:
        self._report("test")

    def after_predict(self) -> None:
        predictions = self.trainer.predict_loop.predictions
        logger = self.trainer.logger
        if not predictions or logger is None or not logger.log_dir:  # fast_dev_run: no folder
            return
        probabilities = torch.cat([p.detach().cpu() for p in predictions])  # (N, K)
        name = (
            "predictions.pt"
            if self.trainer.world_size == 1
            else f"predictions_rank{self.trainer.global_rank}.pt"
        )
        path = Path(logger.log_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(probabilities, path)
        rank_zero_only(Console(soft_wrap=True).print)(
            f"predict: class probabilities of {len(probabilities)} images → {path}"
        )

    def _report(self, stage: str) -> None:
        if not self.trainer.is_global_zero or not isinstance(self.model, KRClassifier):
            return
        results = collect_results(self.trainer, self.model, stage)
        batch = getattr(self.datamodule, "batch_size", 64)
        # On the device the run used (Lightning moves the model back to the CPU after a run).
        device = self.trainer.strategy.root_device
        home = next(self.model.parameters()).device
        self.model.to(device)
        try:
            results["inference_images_per_second"] = inference_throughput(
                self.model, self.model.example_input_array, batch
            )
        finally:
            self.model.to(home)
        results["inference_note"] = f"eval, batch {batch}, {device.type}"
        log_dir = results.get("log_dir")
        if log_dir and Path(log_dir).is_dir():
            (Path(log_dir) / f"results_{stage}.json").write_text(json.dumps(results, indent=2))
        title = f"{results['model']} · {results['mode']}" + (
            f" {results['kernel_num']}x" if results["kernel_num"] else ""
        )
        Console().print(results_table(results, f"{stage}: {title}"))
        self.results = results


def pin_logger_version(config: Namespace, ckpt_path: str) -> str | None:
    """Make the logger write into the folder of the run being resumed; return that version.

    ``ckpt_path="last"``: the run under ``<save_dir>/<name>`` whose ``checkpoints/last*.ckpt`` is
    newest (without this, a new ``version_<n+1>`` would be opened and hold no ``last.ckpt``). A path
    ``<save_dir>/<name>/<version>/checkpoints/*.ckpt``: that version. Otherwise nothing changes.
    """
    logger = config.get("trainer", Namespace()).get("logger")
    if not isinstance(logger, Namespace) or not isinstance(logger.get("init_args"), Namespace):
        return None
    options = logger.init_args
    if options.get("version") is not None or options.get("save_dir") is None:
        return None
    run_root = Path(options.save_dir) / (options.get("name") or "lightning_logs")
    if ckpt_path == "last":
        candidates = [
            (path.stat().st_mtime, path.parent.parent.name)
            for path in run_root.glob("*/checkpoints/last*.ckpt")
        ]
        if not candidates:
            return None
        version = max(candidates)[1]
    else:
        path = Path(ckpt_path).resolve()
        if path.parent.name != "checkpoints" or path.parents[2] != run_root.resolve():
            return None
        version = path.parent.parent.name
    # "version_3" → 3, as the logger numbers its runs (and the progress bar shows v_num 3).
    number = version.removeprefix("version_")
    options.version = int(number) if number.isdigit() else version
    return version


def main(args: ArgsType = None, run: bool = True) -> KRRecipeCLI:
    """Run the recipe; ``args`` as on the command line, e.g. ``["fit", "--trainer.max_epochs=1"]``.

    A user's mistake (a flag combination Lightning refuses, a data root that cannot be trained on)
    ends it as a wrong option does: ``imagenet.py: error: ...`` on stderr, exit status 2; so does a
    non-finite training loss (:class:`~lightning_kr.callbacks.StopOnNonFiniteLoss`).
    """
    default_config = {"default_config_files": [str(DEFAULT_CONFIG)]}
    with exit_on_user_error("imagenet.py", also=(NonFiniteLossError,)):
        return KRRecipeCLI(
            KRClassifier,
            LightningDataModule,
            save_config_callback=StageConfigSaver,
            save_config_kwargs={"overwrite": True},
            subclass_mode_data=True,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            parser_kwargs={
                subcommand: default_config for subcommand in ("fit", "validate", "test", "predict")
            },
            args=args,
            run=run,
        )


if __name__ == "__main__":
    main()
