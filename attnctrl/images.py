"""Opening the images users give (a path or a PIL image), one way for the CLI, the app and the controls."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def open_image(image: Any, what: str = "image"):
    """An RGB PIL image from a PIL image or a path; None stays None.

    Errors name `what` (e.g. "reference image") and the path: a missing file or one PIL cannot read
    is a ValueError, anything else a TypeError."""
    if image is None:
        return None
    if isinstance(image, (str, Path)):
        from PIL import Image

        path = Path(image)
        if not path.is_file():
            raise ValueError(f"{what} {str(path)!r} does not exist")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError as err:
            raise ValueError(f"cannot read {what} {str(path)!r}: {err}") from None
    if hasattr(image, "convert") and hasattr(image, "size"):
        return image.convert("RGB")
    raise TypeError(f"{what.replace(' ', '_')} must be a PIL image or a path, got {type(image).__name__}")
