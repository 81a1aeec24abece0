"""``KernelEmbeddings``: per-sample kernel descriptors and pooled features, embedded and scored."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_kr import KRModel
from lightning_kr.conversion.targets import matches
from lightning_kr.kr_model import find_kr_models
from lightning_kr.layers import ATTENTION_KINDS, Attentions
from lightning_kr.utilities.distributed import gather_rows, sampler_layout
from lightning_kr.utilities.embeddings import cluster_scores, plot_embeddings, tsne_panel
from lightning_kr.utilities.loggers import log_image, log_projector

LABEL_KEYS = ("label", "labels", "target", "targets", "y")
TITLES = {"kernel": "kernel representations", "feature": "pooled features"}


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
    * the **pooled features**: the input of the final classifier (``feature_module``, else the one
      the conversion report names, ``KRModel.report.classifier``, else the last ``nn.Linear``);
    * the labels (``label_fn(batch)``; default: ``batch[1]`` or a dict's ``label``/``target`` key).

    Every rank collects its own samples and takes part in the gather; samples are identified by their
    position in the validation sampler's order, so the padding ``DistributedSampler`` adds (and the
    copies a non-distributed sampler gives every rank) are removed: each sample appears once
    (:func:`~lightning_kr.utilities.distributed.gather_rows`).
    On global rank zero:

    * ``<dirpath>/epoch_<E>.npz`` holds ``kernels``, ``features``, ``labels``, ``sample_index``;
    * ``<dirpath>/tsne_epoch_<E>.png``: a 2-D t-SNE of kernels and features side by side, coloured
      by class, logged as an image to a ``TensorBoardLogger`` (``add_image``) or ``WandbLogger``;
    * with a ``TensorBoardLogger``, two projector entries (``kernel_embeddings/kernels``,
      ``kernel_embeddings/features``) with the labels as metadata;
    * scalars ``embeddings/kernel_silhouette``, ``embeddings/kernel_knn_purity``,
      ``embeddings/feature_silhouette``, ``embeddings/feature_knn_purity`` for every logger
      (silhouette score and k-NN purity of the standardised vectors, classes as clusters:
      :func:`~lightning_kr.utilities.embeddings.cluster_scores`).

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
        if self._kr is not None and self._kr.report.classifier is not None:
            return self._kr.backbone.get_submodule(self._kr.report.classifier)
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
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        self._world, self._rank, self._total = sampler_layout(loader)
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

    def _gather(self, pl_module: pl.LightningModule) -> dict[str, np.ndarray]:
        """Every rank's rows on every rank, each sample once (sampler padding removed), in order."""

        def all_gather(x: Tensor) -> Tensor:
            return pl_module.all_gather(x.to(pl_module.device))

        def rows(key: str, empty: Tensor | None = None) -> Tensor | None:
            return torch.cat(self._rows[key]) if self._rows[key] else empty

        no_ids = torch.zeros(0, dtype=torch.long)
        local = {
            "index": rows("index", no_ids),
            "labels": rows("labels", no_ids),
            "kernels": rows("kernels"),
            "features": rows("features"),
        }
        return gather_rows(local, all_gather if pl_module.trainer.world_size > 1 else None)

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
        scores = {name: cluster_scores(x, labels, self.knn) for name, x in spaces.items()}
        metrics = {
            f"embeddings/{name}_{score}": value
            for name, space_scores in scores.items()
            for score, value in space_scores.items()
        }
        png_path = self._dir / f"tsne_epoch_{epoch:03d}.png"
        image = self._plot_tsne(spaces, scores, labels, png_path, epoch)
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        if image is not None:
            log_image(trainer.loggers, "kernel_embeddings/tsne", image, png_path, step)
        if self.projector:
            for name, x in spaces.items():
                log_projector(trainer.loggers, f"kernel_embeddings/{name}s", x, labels, step)
        self.last = {
            **data,
            "metrics": metrics,
            "arrays_path": arrays_path,
            "png_path": png_path if image is not None else None,
        }

    def _plot_tsne(
        self,
        spaces: dict[str, np.ndarray],
        scores: dict[str, dict[str, float]],
        labels: np.ndarray,
        path: Path,
        epoch: int,
    ) -> np.ndarray | None:
        """Save the side-by-side t-SNE scatter; returns the image (H, W, 3) uint8."""
        if len(labels) < 5:
            rank_zero_warn(f"KernelEmbeddings: {len(labels)} samples are too few for a t-SNE plot")
            return None
        panels = [
            tsne_panel(TITLES[name], x, scores[name], self.perplexity, self.seed)
            for name, x in spaces.items()
        ]
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


__all__ = ["KernelEmbeddings", "default_labels"]
