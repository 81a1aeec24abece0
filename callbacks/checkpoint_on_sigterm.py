"""``CheckpointOnSigterm``: a run stopped by SIGTERM saves ``last.ckpt`` before it ends."""

from __future__ import annotations

import signal
import subprocess
import time
from types import FrameType

import lightning.pytorch as pl
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn


class CheckpointOnSigterm(Callback):
    """Save the ``ModelCheckpoint``'s last checkpoint when SIGTERM stops training mid-epoch.

    SIGTERM is how a scheduler, ``kill`` or a container runtime asks a job to stop. Lightning
    finishes the current training batch and raises ``SIGTERMException``; without this callback the
    run then ends and everything since the last checkpoint (up to an epoch) is lost. Here process 0
    writes ``last.ckpt`` (weights, optimiser, schedulers, callbacks, progress after the last whole
    batch) and ``fit --ckpt_path last`` goes on from there. A SIGKILL cannot be caught; what it
    loses is what came after the last checkpoint written.

    Under DDP (CPU or GPU) no collective call is made once SIGTERM has arrived, so that no process
    can wait forever on another one that is already stopping: Lightning's own SIGTERM handler, which
    broadcasts from inside the signal handler (and deadlocks when a process gets SIGTERM twice, from
    the job's process group and again from process 0), is replaced for the fit by one that only
    records the signal and passes it on to the processes that process 0 started; the replicas are
    identical, so process 0 saves alone, then gives the others a few seconds to end before it ends
    them. Strategies whose state is sharded (FSDP, DeepSpeed) save collectively, as Lightning does.

    Nothing is saved outside ``fit``, under ``fast_dev_run``, or without a ``ModelCheckpoint``.

    Args:
        grace: seconds process 0 waits for the processes it started to end after saving.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning.pytorch.callbacks import ModelCheckpoint
        >>> trainer = Trainer(callbacks=[ModelCheckpoint(save_last=True), CheckpointOnSigterm()])
    """

    def __init__(self, grace: float = 10.0) -> None:
        self.grace = grace
        self.saved: str | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registered its handlers just before the fit loop: swap its SIGTERM notifier.
        connector = trainer._signal_connector
        handler = signal.getsignal(signal.SIGTERM)
        handlers = getattr(handler, "signal_handlers", None)
        if not isinstance(handlers, list):
            return

        def notice(signum: int, frame: FrameType | None) -> None:
            if not connector.received_sigterm and trainer.strategy.launcher is not None:
                trainer.strategy.launcher.kill(signum)  # the processes this one started
            connector.received_sigterm = True

        handler.signal_handlers = [
            notice if h == connector._sigterm_notifier_fn else h for h in handlers
        ]

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        checkpoint = trainer.checkpoint_callback
        if (
            trainer.fast_dev_run
            or trainer.sanity_checking
            or not isinstance(checkpoint, ModelCheckpoint)
        ):
            rank_zero_warn("SIGTERM: training stopped; no checkpoint callback, nothing saved")
            return
        candidates = checkpoint._monitor_candidates(trainer)
        path = checkpoint.format_checkpoint_name(candidates, checkpoint.CHECKPOINT_NAME_LAST)
        if not isinstance(trainer.strategy, DDPStrategy | SingleDeviceStrategy):
            checkpoint.last_model_path = path
            trainer.save_checkpoint(path)  # collective: every process takes part
        elif trainer.is_global_zero:
            checkpoint.last_model_path = path  # part of the state saved, as ModelCheckpoint does
            state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            trainer.strategy.checkpoint_io.save_checkpoint(state, path)
            self._end_started_processes(trainer)
        self.saved = path
        rank_zero_info(
            f"SIGTERM: training stopped at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}; saved {path}. Resume with: fit --ckpt_path last"
        )

    def _end_started_processes(self, trainer: pl.Trainer) -> None:
        processes: list[subprocess.Popen] = getattr(trainer.strategy.launcher, "procs", [])
        deadline = time.monotonic() + self.grace
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()  # waiting on process 0 in a collective: it holds nothing unsaved
