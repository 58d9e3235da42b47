"""A decoded image -> the upright 8-bit RGB pixels a model is trained on.

Why: PIL's `convert("RGB")` alone ignores the EXIF Orientation tag, so a phone photo stored
sideways trained sideways, while transformers' `load_image` (what TRL feeds a model) and
`datasets`' Image feature rotate it; and it clips 16-bit greyscale at 255, so a mid-grey 16-bit
PNG trained as white. Here orientation is applied exactly as `load_image` does
(`PIL.ImageOps.exif_transpose`), 16-bit greyscale keeps its high byte (`value >> 8`, the reading
PIL itself gives 16-bit RGB PNGs, so a grey 16-bit PNG looks the same in either colour type),
and a mode with no standard 8-bit reading (32-bit float, integers beyond 16 bits) is refused
with a `DataError` naming the image and the mode instead of being clipped.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from cwdpo.errors import DataError

#: PIL's 16-bit greyscale modes (a 16-bit greyscale PNG opens as "I;16").
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_ORIENTATION = 0x0112  # PIL.ExifTags.Base.Orientation


def upright(img: Image.Image) -> Image.Image:
    """`img` turned as its EXIF Orientation tag says (`img` itself when there is nothing to
    turn), by the same call transformers' `load_image` makes."""
    if img.getexif().get(_ORIENTATION, 1) in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(img)
    return img


def eight_bit(img: Image.Image, where: str = "") -> Image.Image:
    """16-bit greyscale (`I;16*`, or `I` with values in 0..65535, PIL's mode for 16-bit PGM and
    signed 16-bit TIFF) as 8-bit "L" by `value >> 8`; other modes unchanged; `F` and `I` beyond
    16 bits refused (`where` names the image in the message)."""
    mode = img.mode
    if mode not in SIXTEEN_BIT_MODES and mode not in ("I", "F"):
        return img
    prefix = f"{where}: " if where else ""
    if mode == "F":
        raise DataError(
            f"{prefix}PIL mode F (32-bit float pixels) has no standard 8-bit reading; "
            "convert the image to 8-bit RGB (or 16-bit greyscale) first"
        )
    values = np.asarray(img)
    if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        raise DataError(
            f"{prefix}PIL mode I image with values {values.min()}..{values.max()}, outside "
            "16 bits (0..65535) and so with no standard 8-bit reading; convert it to 8-bit RGB"
        )
    return Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8))


def rgb_pixels(img: Image.Image, where: str = "") -> Image.Image:
    """Upright, 8-bit, RGB: what `ImageRef.load` returns and the image check decodes."""
    return eight_bit(upright(img), where).convert("RGB")
