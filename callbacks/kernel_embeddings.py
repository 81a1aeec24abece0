"""``KernelEmbeddings``: per-sample kernel descriptors and pooled features, embedded and scored."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from lightning_kr import KRModel
from lightning_kr.conversion.targets import matches
from lightning_kr.kr_model import find_kr_models
from lightning_kr.layers import ATTENTION_KINDS, Attentions
from lightning_kr.utilities.embeddings import cluster_scores, knn_purity, plot_embeddings, tsne_2d

LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def default_labels(batch: Any) -> Tensor:
    """Integer class labels of a batch: ``batch[1]`` of a tuple/list, or a dict's label key."""
    if isinstance(batch, dict):
        for key in LABEL_KEYS:
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    elif isinstance(batch, list | tuple) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return batch[1]
    raise MisconfigurationException(
        f"KernelEmbeddings found no labels in a batch of type {type(batch).__name__}; pass "
        "KernelEmbeddings(label_fn=lambda batch: batch[...]) returning the class ids (B,)"
    )


class KernelEmbeddings(Callback):
    """Embed what the KR layers generate per sample, next to the pooled features, every N epochs.

    During every ``every_n_epochs``-th validation epoch (sanity checks excluded) forward hooks collect,
    for the first ``max_samples`` validation samples of the first validation dataloader:

    * the **kernel descriptor** of each sample: the representations ``d`` at ``depths`` (``0`` is
      ``d_0`` from the FFT stem, ``i`` the ``d`` written by the ``i``-th KR layer in execution
      order, ``-1`` the last ``d``, the one the joint head sees) and/or the attention vectors
      (``attentions``) of the KR ``layers`` chosen, concatenated;
    * the **pooled features**: the input of the final classifier (the module ``kr_convert`` kept as
      the feature branch of the joint head, else the last ``nn.Linear``; or ``feature_module``);
    * the labels (``label_fn(batch)``; default: ``batch[1]`` or a dict's ``label``/``target`` key).

    Every rank collects its own samples and takes part in the gather; samples are identified by their
    position in the validation sampler's order, so the padding ``DistributedSampler`` adds (and the
    copies a non-distributed sampler gives every rank) are removed: each sample appears once.
    On global rank zero:

    * ``<dirpath>/epoch_<E>.npz`` holds ``kernels``, ``features``, ``labels``, ``sample_index``;
    * ``<dirpath>/tsne_epoch_<E>.png``: a 2-D t-SNE of kernels and features side by side, coloured
      by class, logged as an image to a ``TensorBoardLogger`` (``add_image``) or ``WandbLogger``;
    * with a ``TensorBoardLogger``, two projector entries (``kernel_embeddings/kernels``,
      ``kernel_embeddings/features``) with the labels as metadata;
    * scalars ``embeddings/kernel_silhouette``, ``embeddings/kernel_knn_purity``,
      ``embeddings/feature_silhouette``, ``embeddings/feature_knn_purity`` for every logger
      (silhouette score and k-NN purity of the standardised vectors, classes as clusters).

    Without a logger only the files are written (with a warning). :attr:`last` keeps the last
    arrays, scores and paths on rank zero.

    Args:
        every_n_epochs: collect on every N-th validation epoch.
        depths: which ``d`` form the kernel descriptor (an index or a list; ``None``: none).
        layers: KR layers whose attention vectors join the descriptor, by name in the converted
            backbone (``"layer4.1.conv2"``): a string is a full regex, a list matches exactly or as
            a dotted suffix; ``None``: none. Matching nothing is an error.
        attentions: which attention vectors of ``layers`` (``channel``, ``filter``, ``spatial``,
            ``kernel``); those a layer does not generate are skipped.
        features: collect the pooled features.
        feature_module: qualified name of the module whose input is the pooled features.
        kr_model: qualified name of the ``KRModel`` when the module holds several.
        max_samples: cap on the samples embedded (the first ones in sampler order).
        label_fn: ``batch -> (B,)`` integer class ids (a module-level function under
            ``ddp_spawn``, which pickles callbacks; not a lambda).
        dirpath: where files go (default: ``<trainer.log_dir>/kernel_embeddings``).
        perplexity: t-SNE perplexity (lowered for small sample counts).
        knn: ``k`` of the k-NN purity.
        projector: write TensorBoard projector entries.
        seed: t-SNE random state.

    Raises:
        MisconfigurationException: kernel descriptors are requested but the module holds no
            ``KRModel``; ``depths`` on a model without ``d`` (ODConv / DyConv ablations); ``layers``
            matches no KR layer; nothing to embed; no classifier for the features.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_kr.callbacks import KernelEmbeddings
        >>> embeddings = KernelEmbeddings(every_n_epochs=5, depths=[0, -1], max_samples=2000)
        >>> trainer = Trainer(callbacks=[embeddings])
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        depths: int | Sequence[int] | None = -1,
        layers: str | Sequence[str] | None = None,
        attentions: Sequence[str] = ATTENTION_KINDS,
        features: bool = True,
        feature_module: str | None = None,
        kr_model: str | None = None,
        max_samples: int = 1000,
        label_fn: Callable[[Any], Tensor] | None = None,
        dirpath: str | os.PathLike | None = None,
        perplexity: float = 30.0,
        knn: int = 5,
        projector: bool = True,
        seed: int = 0,
    ) -> None:
        if every_n_epochs < 1:
            raise MisconfigurationException(
                f"KernelEmbeddings(every_n_epochs={every_n_epochs}) must be >= 1"
            )
        if max_samples < 2:
            raise MisconfigurationException(
                f"KernelEmbeddings(max_samples={max_samples}) must be >= 2"
            )
        unknown = set(attentions) - set(ATTENTION_KINDS)
        if unknown:
            raise MisconfigurationException(
                f"KernelEmbeddings(attentions=...) has unknown kinds {sorted(unknown)}; choose from "
                f"{list(ATTENTION_KINDS)}"
            )
        self.every_n_epochs = every_n_epochs
        self.depths = (
            None if depths is None else ([depths] if isinstance(depths, int) else list(depths))
        )
        self.layers = layers
        self.attentions = tuple(attentions)
        self.features = features
        self.feature_module = feature_module
        self.kr_model = kr_model
        self.max_samples = max_samples
        self.label_fn = label_fn or default_labels
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.perplexity = perplexity
        self.knn = knn
        self.projector = projector
        self.seed = seed
        if self.depths is None and layers is None and not features:
            raise MisconfigurationException(
                "KernelEmbeddings has nothing to embed: set depths, layers or features=True"
            )
        self.last: dict[str, Any] = {}
        self._val_epochs = 0
        self._reset()

    # ------------------------------------------------------------------ resolution (every rank)
    def _reset(self) -> None:
        self._handles: list[Any] = []
        self._active = False
        self._reprs: list[Tensor] = []
        self._atts: dict[str, Attentions] = {}
        self._pooled: Tensor | None = None
        self._rows: dict[str, list[Tensor]] = {
            "kernels": [],
            "features": [],
            "labels": [],
            "index": [],
        }
        self._seen = 0

    @property
    def needs_logger(self) -> bool:
        """Whether this callback writes only into the logger's folder (no ``dirpath`` given).

        Without a logger it would write into ``default_root_dir``, the working folder by default:
        :func:`~lightning_kr.cli.callbacks_for_flags` leaves it out of such runs, with a warning.
        """
        return self.dirpath is None

    @property
    def wants_kernels(self) -> bool:
        return self.depths is not None or self.layers is not None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._kr: KRModel | None = self._find_kr_model(pl_module)
        self._layer_names: list[str] = []
        self._generators: dict[str, nn.Module] = {}
        if self.wants_kernels and self._kr is not None:  # _find_kr_model raised if it is None
            if self.depths is not None and self._kr.stem is None:
                raise MisconfigurationException(
                    f"KernelEmbeddings(depths={self.depths}): this KR model was converted with "
                    f"mode={self._kr.config.mode!r} and keeps no representation d; pass depths=None "
                    "and layers=... to embed attention vectors instead"
                )
            layers = dict(self._kr.kr_layers())
            self._generators = {name: layer.generator for name, layer in layers.items()}
            if self.layers is not None:
                self._layer_names = [n for n in layers if matches(n, self.layers)]
                if not self._layer_names:
                    raise MisconfigurationException(
                        f"KernelEmbeddings(layers={self.layers!r}) matched no KR layer; the KR layers "
                        f"are: {', '.join(layers)[:600]}"
                    )
                for name in self._layer_names:
                    if not any(kind in self._generators[name].heads for kind in self.attentions):
                        raise MisconfigurationException(
                            f"KernelEmbeddings: KR layer '{name}' generates none of the attentions "
                            f"{list(self.attentions)} (it has {list(self._generators[name].heads)})"
                        )
        self._classifier = self._find_classifier(pl_module) if self.features else None
        if not trainer.loggers:
            rank_zero_warn(
                "KernelEmbeddings: the Trainer has no logger; the t-SNE PNG and the arrays are "
                "written to files only and the cluster scores are not logged"
            )
        # trainer.log_dir broadcasts from rank zero: every rank resolves it.
        root = trainer.log_dir or trainer.default_root_dir
        self._dir = self.dirpath or Path(root) / "kernel_embeddings"

    def _find_kr_model(self, pl_module: nn.Module) -> KRModel | None:
        if self.kr_model is not None:
            try:
                module = pl_module.get_submodule(self.kr_model)
            except AttributeError as error:
                raise MisconfigurationException(
                    f"KernelEmbeddings(kr_model={self.kr_model!r}) names no submodule of "
                    f"{type(pl_module).__name__}"
                ) from error
            if not isinstance(module, KRModel):
                raise MisconfigurationException(
                    f"KernelEmbeddings(kr_model={self.kr_model!r}) is a {type(module).__name__}, "
                    "not a KRModel returned by kr_convert"
                )
            return module
        outermost = find_kr_models(pl_module)
        if len(outermost) > 1:
            raise MisconfigurationException(
                "KernelEmbeddings found several KR models ("
                + ", ".join(n for n, _ in outermost)
                + "); pass KernelEmbeddings(kr_model='name') to choose one"
            )
        if not outermost and self.wants_kernels:
            raise MisconfigurationException(
                f"KernelEmbeddings found no KRModel in {type(pl_module).__name__}, so there are no "
                "kernel descriptors to collect: convert the model with lightning_kr.kr_convert, or "
                "pass depths=None, layers=None to embed the pooled features only"
            )
        return outermost[0][1] if outermost else None

    def _find_classifier(self, pl_module: nn.Module) -> nn.Module:
        if self.feature_module is not None:
            try:
                return pl_module.get_submodule(self.feature_module)
            except AttributeError as error:
                raise MisconfigurationException(
                    f"KernelEmbeddings(feature_module={self.feature_module!r}) names no submodule "
                    f"of {type(pl_module).__name__}"
                ) from error
        if self._kr is not None:
            for decision in self._kr.report.skipped:
                if decision.reason.startswith("final classifier"):
                    return self._kr.backbone.get_submodule(decision.name)
        root = self._kr.backbone if self._kr is not None else pl_module
        linears = [m for m in root.modules() if type(m) is nn.Linear]
        if not linears:
            raise MisconfigurationException(
                "KernelEmbeddings found no classifier whose input are the pooled features; pass "
                "KernelEmbeddings(feature_module='name') or features=False"
            )
        return linears[-1]

    # ------------------------------------------------------------------ collection (every rank)
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (self._val_epochs + 1) % self.every_n_epochs:
            return
        self._remove_hooks()
        self._reset()
        self._active = True
        self._world, self._rank, self._total = self._sampler_layout(trainer)
        if self._kr is not None and self.wants_kernels:
            if self._kr.stem is not None:
                self._handles.append(self._kr.stem.register_forward_hook(self._on_stem))
            for name, generator in self._generators.items():
                self._handles.append(generator.register_forward_hook(self._generator_hook(name)))
        if self._classifier is not None:
            self._handles.append(self._classifier.register_forward_pre_hook(self._on_classifier))

    def _on_stem(self, module: nn.Module, args: Any, d0: Tensor) -> None:
        self._reprs = [d0]
        self._atts = {}

    def _generator_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Attentions) -> None:
            if out.repr_out is not None:
                self._reprs.append(out.repr_out)
            if name in self._layer_names:
                self._atts[name] = out

        return hook

    def _on_classifier(self, module: nn.Module, args: Any) -> None:
        self._pooled = args[0]

    @staticmethod
    def _sampler_layout(trainer: pl.Trainer) -> tuple[int, int, float]:
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        sampler = getattr(loader, "sampler", None)
        batch_sampler = getattr(loader, "batch_sampler", None)
        if not isinstance(sampler, DistributedSampler) and batch_sampler is not None:
            sampler = getattr(batch_sampler, "sampler", sampler)
        if isinstance(sampler, DistributedSampler):
            return sampler.num_replicas, sampler.rank, len(sampler.dataset)
        try:
            return 1, 0, len(loader.dataset)
        except (AttributeError, TypeError):
            return 1, 0, math.inf

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active or dataloader_idx != 0:
            return
        labels = torch.as_tensor(self.label_fn(batch))
        labels = labels.argmax(-1) if labels.dim() > 1 else labels
        size = labels.shape[0]
        index = (self._seen + torch.arange(size)) * self._world + self._rank
        self._seen += size
        keep = (index < min(self._total, self.max_samples)).nonzero().squeeze(1)
        if keep.numel() == 0:
            return
        if self.wants_kernels:
            kernels = self._kernel_descriptor(size)
            self._rows["kernels"].append(kernels[keep].detach().float().cpu())
        if self._classifier is not None:
            if self._pooled is None or self._pooled.shape[0] != size:
                raise RuntimeError(
                    "KernelEmbeddings: the classifier did not see this validation batch "
                    f"({size} samples); does validation_step call the model on the whole batch?"
                )
            pooled = self._pooled.reshape(size, -1)
            self._rows["features"].append(pooled[keep].detach().float().cpu())
        self._rows["labels"].append(labels[keep].long().cpu())
        self._rows["index"].append(index[keep])
        self._pooled = None
        if self._seen * self._world >= min(self._total, self.max_samples):
            self._remove_hooks()  # every later sample of this rank is past the cap

    def _kernel_descriptor(self, size: int) -> Tensor:
        parts = []
        if self.depths is not None:
            for depth in self.depths:
                try:
                    parts.append(self._reprs[depth])
                except IndexError:
                    raise MisconfigurationException(
                        f"KernelEmbeddings(depths={self.depths}): the model computed "
                        f"{len(self._reprs)} representations d_0..d_{len(self._reprs) - 1} in this "
                        "batch; choose depths in that range (negative counts from the end)"
                    ) from None
        for name in self._layer_names:
            att = self._atts.get(name)
            if att is None:
                raise RuntimeError(f"KernelEmbeddings: KR layer '{name}' did not run in this batch")
            parts += [
                getattr(att, kind) for kind in self.attentions if getattr(att, kind) is not None
            ]
        if not parts or parts[0].shape[0] != size:
            raise RuntimeError(
                f"KernelEmbeddings: the KR model did not run on this validation batch of {size}"
            )
        return torch.cat([p.reshape(size, -1) for p in parts], dim=1)

    # ------------------------------------------------------------------ gather and report
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._val_epochs += 1
        if not self._active:
            return
        self._remove_hooks()
        self._active = False
        data = self._gather(pl_module)
        if trainer.is_global_zero:
            self._report(trainer, data)
        self._reset()

    def _local_arrays(self) -> dict[str, Tensor]:
        rows = self._rows
        out = {
            "index": torch.cat(rows["index"])
            if rows["index"]
            else torch.zeros(0, dtype=torch.long),
            "labels": torch.cat(rows["labels"])
            if rows["labels"]
            else torch.zeros(0, dtype=torch.long),
        }
        for key in ("kernels", "features"):
            if rows[key]:
                out[key] = torch.cat(rows[key])
        return out

    def _gather(self, pl_module: pl.LightningModule) -> dict[str, np.ndarray]:
        """Every rank's rows on every rank, duplicates (sampler padding) removed, in sampler order."""
        local = self._local_arrays()
        world = pl_module.trainer.world_size
        if world > 1:
            device = pl_module.device
            count = local["index"].shape[0]
            dims = [local[k].shape[1] if k in local else -1 for k in ("kernels", "features")]
            meta = pl_module.all_gather(torch.tensor([count, *dims], device=device)).view(world, 3)
            counts = meta[:, 0].tolist()
            width = max(counts)
            ids = torch.stack([local["index"], local["labels"]], dim=1)
            floats = [
                local.get(k, torch.zeros(count, max(int(meta[:, i + 1].max()), 0)))
                for i, k in enumerate(("kernels", "features"))
            ]
            floats = torch.cat(floats, dim=1)

            def gather(x: Tensor) -> Tensor:
                padded = torch.zeros(width, x.shape[1], dtype=x.dtype)
                padded[: x.shape[0]] = x
                out = pl_module.all_gather(padded.to(device)).cpu()
                return torch.cat([out[r, : counts[r]] for r in range(world)])

            ids, floats = gather(ids), gather(floats)
            local = {"index": ids[:, 0], "labels": ids[:, 1]}
            split = max(int(meta[:, 1].max()), 0)
            if self.wants_kernels:
                local["kernels"] = floats[:, :split]
            if self._classifier is not None:
                local["features"] = floats[:, split:]
        index = local["index"].numpy()
        _, first = np.unique(index, return_index=True)  # sorted by sampler position
        return {k: v.numpy()[first] for k, v in local.items()}

    def _report(self, trainer: pl.Trainer, data: dict[str, np.ndarray]) -> None:
        epoch, step = trainer.current_epoch, trainer.fit_loop.epoch_loop._batches_that_stepped
        self._dir.mkdir(parents=True, exist_ok=True)
        arrays_path = self._dir / f"epoch_{epoch:03d}.npz"
        np.savez(
            arrays_path,
            sample_index=data["index"],
            **{k: v for k, v in data.items() if k != "index"},
        )
        labels = data["labels"]
        spaces = {
            name: data[key]
            for name, key in (("kernel", "kernels"), ("feature", "features"))
            if key in data
        }
        metrics: dict[str, float] = {}
        for name, x in spaces.items():
            for score, value in cluster_scores(x, labels, self.knn).items():
                metrics[f"embeddings/{name}_{score}"] = value
        png_path = self._dir / f"tsne_epoch_{epoch:03d}.png"
        image = self._plot_tsne(spaces, labels, metrics, png_path, epoch)
        for logger in trainer.loggers:
            if metrics:
                logger.log_metrics(metrics, step=step)
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                if image is not None:
                    writer.add_image("kernel_embeddings/tsne", image, step, dataformats="HWC")
                if self.projector:
                    metadata = [str(int(c)) for c in labels]
                    for name, x in spaces.items():
                        writer.add_embedding(
                            torch.from_numpy(x),
                            metadata=metadata,
                            global_step=step,
                            tag=f"kernel_embeddings/{name}s",
                        )
            elif isinstance(logger, WandbLogger) and image is not None:
                logger.log_image(key="kernel_embeddings/tsne", images=[str(png_path)], step=step)
        self.last = {
            **data,
            "metrics": metrics,
            "arrays_path": arrays_path,
            "png_path": png_path if image is not None else None,
        }

    def _plot_tsne(
        self,
        spaces: dict[str, np.ndarray],
        labels: np.ndarray,
        metrics: dict[str, float],
        path: Path,
        epoch: int,
    ) -> np.ndarray | None:
        """Save the side-by-side t-SNE scatter; returns the image (H, W, 3) uint8."""
        if len(labels) < 5:
            rank_zero_warn(f"KernelEmbeddings: {len(labels)} samples are too few for a t-SNE plot")
            return None
        titles = {"kernel": "kernel representations", "feature": "pooled features"}
        panels = []
        for name, x in spaces.items():
            scores = [
                f"{label} {metrics[key]:.2f}"
                for label, key in (
                    ("silhouette", f"embeddings/{name}_silhouette"),
                    ("k-NN purity", f"embeddings/{name}_knn_purity"),
                )
                if key in metrics
            ]
            panels.append(
                (
                    f"{titles[name]} ({x.shape[1]}-d)\n" + ", ".join(scores),
                    tsne_2d(x, self.perplexity, self.seed),
                )
            )
        return plot_embeddings(
            panels, labels, path, f"t-SNE at epoch {epoch}, {len(labels)} validation samples"
        )

    # ------------------------------------------------------------------ housekeeping
    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def state_dict(self) -> dict[str, Any]:
        return {"val_epochs": self._val_epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._val_epochs = int(state_dict.get("val_epochs", 0))

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles callbacks: hook handles and captured tensors stay behind.
        state = self.__dict__.copy()
        state["_handles"] = []
        state["_reprs"], state["_atts"], state["_pooled"] = [], {}, None
        return state


__all__ = ["KernelEmbeddings", "cluster_scores", "default_labels", "knn_purity"]
