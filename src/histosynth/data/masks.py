"""Reading label-mask images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..schema import RENAL, ClassSchema


def read_mask(path: str | Path, schema: ClassSchema = RENAL) -> np.ndarray:
    """A 2-D uint8 label mask from an image file, remapped and checked against the schema."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"mask file {path} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P", "I", "I;16", "1"):
                raise DataError(
                    f"{path}: a label mask must be a single-channel image of class ids, "
                    f"got mode {img.mode}; save the ids as an 8-bit grayscale PNG"
                )
            array = np.array(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot read as an image ({exc}); re-export the mask as PNG") from None
    return schema.apply_remap(array, source=str(path))
