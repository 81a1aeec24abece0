"""``exit_on_user_error``: a user's mistake ends the command with one message, not a traceback."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from lightning_kr.checkpoint_file import CheckpointFileError
from lightning_kr.data.folder_layout import DataRootError

USER_ERRORS: tuple[type[Exception], ...] = (
    MisconfigurationException,
    DataRootError,
    CheckpointFileError,
)


@contextmanager
def exit_on_user_error(prog: str, also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Print a user's mistake as ``<prog>: error: <message>`` on stderr and exit with status 2.

    What argparse does for a wrong option, for the mistakes found later: a flag combination
    Lightning refuses (``MisconfigurationException``, whose message says what to change), a
    data root that cannot be trained on (:class:`~lightning_kr.data.DataRootError`) and a
    checkpoint truncated or corrupt on disk (:class:`~lightning_kr.checkpoint_file.CheckpointFileError`).
    Any other exception is a bug and keeps its traceback, but those of ``also`` (a recipe's own
    errors whose message says what to do, e.g. a non-finite training loss). A run stopped by
    SIGTERM (Lightning's ``SIGTERMException``, an exit with status 0) exits with status 143, as a
    terminated process does, so that a scheduler sees that it did not finish.

    Example::

        >>> with exit_on_user_error("imagenet.py"):  # doctest: +SKIP
        ...     main()
    """
    try:
        yield
    except (*USER_ERRORS, *also) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException:
        raise SystemExit(128 + signal.SIGTERM) from None
