"""``load_rgb``: any image file a data set may hold, as the 8-bit RGB image the transforms expect."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Read an image file as 8-bit RGB, whatever its colour mode.

    Grey, grey with alpha, palette, CMYK, YCbCr, LAB and RGBA become RGB by PIL's conversion (alpha
    dropped, a palette's transparency too). 16-bit grey (PNG ``I;16``, or ``I`` holding 16-bit
    values) is scaled from 0..65535 to 0..255: PIL's own conversion would clip it at 255.

    Raises:
        OSError: the file is not an image PIL can decode, or it is truncated (``UnidentifiedImageError``
            is an ``OSError``); what :class:`~lightning_kr.data.SkipUnreadableImageFolder` skips.
    """
    with open(path, "rb") as file:
        image = Image.open(file)
        image.load()
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")
