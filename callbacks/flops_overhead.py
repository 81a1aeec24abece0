"""``FlopsOverhead``: what the KR layers cost on top of the static network, counted once per fit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from rich.console import Console
from torch import Tensor, nn

from lightning_kr.kr_model import find_kr_models
from lightning_kr.utilities.mac_count import Handle, MacOverhead, count_overhead


class FlopsOverhead(Callback):
    """Count the multiply-accumulates of the model and of its static counterpart, once per fit.

    When every ``fit`` starts training, on global rank zero only, the model runs one traced forward
    (eval mode, ``no_grad``; every submodule's train/eval mode is restored after) for one sample,
    counted with fvcore's ``FlopCountAnalysis`` and the handles of
    :mod:`lightning_kr.utilities.mac_count`, which cover every operator the KR layers, the FFT stem
    and the joint head run (the convention is in that module's docstring: one per multiply-add for
    convolutions and matrix products, one per output element for elementwise arithmetic). The static
    counterpart is the same module with every ``KRModel`` replaced by ``KRModel.to_static()`` (the
    architecture before ``kr_convert``); a module without KR layers has an overhead of 0.

    Logged to every attached logger (and put in rank zero's ``trainer.callback_metrics``):
    ``flops/static_gmacs``, ``flops/kr_gmacs``, ``flops/overhead_pct``, ``params/static_m``,
    ``params/kr_m``. A rich table of the ``top_n`` layers by added MACs is printed; operators that
    have no handle are listed in a warning (and in the table's caption), never dropped silently.
    The :class:`~lightning_kr.callbacks.MacOverhead` stays in :attr:`result` on rank zero.

    Args:
        input_size: the input to count with: an image side ``224``, ``(H, W)`` or ``(C, H, W)``; one
            sample is built with the channels of the KR model (3 without one). By default the
            module's ``example_input_array`` is used (its first sample).
        module: qualified name of the submodule to count (``"model"``); by default the
            ``LightningModule``'s own ``forward``, or its ``KRModel`` if it has no ``forward``.
        top_n: rows of the printed table.
        handles: extra fvcore handles ``{"aten::op": handle or None}`` for custom operators.
        print_table: print the rich table (rank zero).

    Raises:
        MisconfigurationException: if there is no input to count with (neither ``input_size`` nor
            ``example_input_array``), or ``module`` names no submodule.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_kr.callbacks import FlopsOverhead
        >>> trainer = Trainer(callbacks=[FlopsOverhead(input_size=224)])
    """

    def __init__(
        self,
        input_size: int | Sequence[int] | None = None,
        module: str | None = None,
        top_n: int = 10,
        handles: Mapping[str, Handle | None] | None = None,
        print_table: bool = True,
    ) -> None:
        if input_size is not None:
            sizes = (input_size,) if isinstance(input_size, int) else tuple(input_size)
            if not 1 <= len(sizes) <= 3 or any(int(s) < 1 for s in sizes):
                raise MisconfigurationException(
                    f"FlopsOverhead(input_size={input_size!r}) must be an image side (224), (H, W) "
                    "or (C, H, W) with positive sizes"
                )
        if top_n < 1:
            raise MisconfigurationException(f"FlopsOverhead(top_n={top_n}) must be at least 1")
        self.input_size = input_size
        self.module = module
        self.top_n = top_n
        self.handles = dict(handles or {})
        self.print_table = print_table
        self.result: MacOverhead | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            # Resolved on every rank, so that a misconfiguration stops every process alike.
            self._target(pl_module)
            self._example_input(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        target = self._target(pl_module)
        self.result = result = count_overhead(
            target, self._example_input(pl_module), handles=self.handles
        )
        metrics = {
            "flops/static_gmacs": result.static.gmacs,
            "flops/kr_gmacs": result.kr.gmacs,
            "flops/overhead_pct": result.overhead_pct,
            "params/static_m": result.static.params / 1e6,
            "params/kr_m": result.kr.params / 1e6,
        }
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        unsupported = {**result.static.unsupported, **result.kr.unsupported}
        if unsupported:
            rank_zero_warn(
                "FlopsOverhead counted these operators as 0 (no fvcore handle): "
                + ", ".join(f"{op} ×{n}" for op, n in sorted(unsupported.items()))
                + ". Pass FlopsOverhead(handles={'aten::op': handle}) to count them."
            )
        if self.print_table:
            Console().print(result.table(self.top_n))

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.module is not None:
            try:
                return pl_module.get_submodule(self.module)
            except AttributeError as error:
                raise MisconfigurationException(
                    f"FlopsOverhead(module={self.module!r}): {type(pl_module).__name__} has no such "
                    "submodule; pass the qualified name of the model to count (e.g. 'model')"
                ) from error
        if type(pl_module).forward is not pl.LightningModule.forward:
            return pl_module
        kr_models = find_kr_models(pl_module)
        if len(kr_models) == 1:
            return kr_models[0][1]
        raise MisconfigurationException(
            f"FlopsOverhead: {type(pl_module).__name__} defines no forward and holds "
            f"{len(kr_models)} KR models; pass FlopsOverhead(module='name') with the model to count"
        )

    def _example_input(self, pl_module: pl.LightningModule) -> Tensor | tuple[Tensor, ...]:
        reference = next(pl_module.parameters(), None)
        device = reference.device if reference is not None else torch.device("cpu")
        dtype = reference.dtype if reference is not None and reference.is_floating_point() else None
        if self.input_size is not None:
            sizes = (
                (self.input_size,) if isinstance(self.input_size, int) else tuple(self.input_size)
            )
            if len(sizes) < 3:
                kr_models = find_kr_models(pl_module)
                channels = kr_models[0][1].in_channels if kr_models else 3
                sizes = (channels, *(sizes * 2 if len(sizes) == 1 else sizes))
            return torch.zeros(1, *map(int, sizes), device=device, dtype=dtype)
        example: Any = pl_module.example_input_array
        if example is None:
            raise MisconfigurationException(
                f"FlopsOverhead needs an input to count with: set `self.example_input_array` in "
                f"{type(pl_module).__name__} (e.g. torch.zeros(1, 3, 224, 224)) or pass "
                "FlopsOverhead(input_size=224)"
            )
        if isinstance(example, Tensor):
            return example[:1].to(device)
        if isinstance(example, list | tuple) and all(isinstance(x, Tensor) for x in example):
            batch = example[0].shape[0] if example and example[0].dim() else None
            return tuple(
                x[:1].to(device) if x.dim() and x.shape[0] == batch else x.to(device)
                for x in example
            )
        raise MisconfigurationException(
            f"FlopsOverhead can count with a tensor or a tuple of tensors as example_input_array, "
            f"not {type(example).__name__}; pass FlopsOverhead(input_size=...) instead"
        )
