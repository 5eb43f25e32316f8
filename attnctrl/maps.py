"""`AttentionMapResult`: aggregated per-token attention maps of a run, and their rendering."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .state import prompt_index

if TYPE_CHECKING:  # pragma: no cover
    from .state import TextEncoders

# anchor colours of a perceptual "inferno"-like colormap, low → high
_CMAP = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float32,
)


def colorize(m: np.ndarray) -> np.ndarray:
    """Map an array in [0, 1] to RGB uint8 with the built-in colormap."""
    x = np.clip(m, 0.0, 1.0) * (len(_CMAP) - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, len(_CMAP) - 1)
    frac = (x - lo)[..., None]
    return (_CMAP[lo] * (1 - frac) + _CMAP[hi] * frac).astype(np.uint8)


def grey_base(picture: Image.Image, size: int) -> Image.Image:
    """The picture under a heatmap: RGB, resized (bicubic) to size × size, then greyed (heat reads
    better on grey)."""
    base = picture.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return ImageOps.grayscale(base).convert("RGB")


def overlay(m: torch.Tensor, base: Image.Image | None, size: int, alpha: float = 0.55) -> Image.Image:
    """A word's map `m` (H, W) as a size × size heatmap: min-max normalised, coloured
    (`colorize`), resized (bicubic) and blended with `alpha` over `base` (`grey_base`), or the bare
    heatmap when `base` is None."""
    a = m.float().numpy()
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
    heat = Image.fromarray(colorize(a)).resize((size, size), Image.Resampling.BICUBIC)
    return Image.blend(base, heat, alpha) if base is not None else heat


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


class AttentionMapResult:
    """Mean attention maps per resolution: ``by_res[(h, w)]`` is a float tensor (images, text tokens, h, w).

    At every pixel, the values over the text tokens sum to 1 (a distribution over the prompt's
    tokens, BOS/EOS/padding included). Words are looked up with `attnctrl.tokens`, so
    ``result.word(0, "sheep")`` is the map of the word "sheep" in image 0's prompt: `text` is the
    run's `attnctrl.state.TextEncoders` (its tokenizers and T5 length), `family` the model family.
    """

    def __init__(
        self, by_res: dict, prompts: Sequence[str] = (), text: TextEncoders | None = None, family: str | None = None
    ):
        self.by_res = dict(sorted(by_res.items()))
        self.prompts = list(prompts)
        self._text = text
        self._family = family

    # ---- access ------------------------------------------------------------------------------
    @property
    def resolutions(self) -> list[tuple[int, int]]:
        return list(self.by_res)

    @property
    def num_images(self) -> int:
        return next(iter(self.by_res.values())).shape[0] if self.by_res else 0

    def __bool__(self) -> bool:
        return bool(self.by_res)

    def combined(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Average over resolutions, each upsampled (bilinear) to `size` (default: the largest): (images, T, H, W)."""
        if not self.by_res:
            raise ValueError("no attention maps were recorded (did any selected layer run?)")
        size = size or max(self.by_res, key=lambda s: s[0] * s[1])
        ups = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in self.by_res.values()]
        return torch.stack(ups).mean(0)

    def prompt_of(self, image: int) -> str:
        """Prompt of image `image` (images are prompt-major: num_images_per_prompt per prompt)."""
        if not self.prompts:
            raise ValueError("this result has no prompts recorded; pass token indices instead of words")
        return self.prompts[prompt_index(image, self.num_images, len(self.prompts))]

    def token_indices(self, image: int, word) -> list[int]:
        """Indices of `word` (a word, phrase, "word#2" or raw indices) in the text tokens the layers saw."""
        if isinstance(word, int) or (isinstance(word, (list, tuple)) and all(isinstance(i, int) for i in word)):
            return [word] if isinstance(word, int) else list(word)
        from .tokens import joint_text_indices

        text = self._text
        if text is None or self._family is None:
            raise ValueError("this result has no tokenizers to resolve words with; pass token indices")
        return joint_text_indices(
            text, self.prompt_of(image), word, self._family, max_sequence_length=text.max_sequence_length
        )

    def word(self, image: int, word, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Map (H, W) of a word: the sum of its tokens' maps."""
        maps = self.combined(size)[image]
        return maps[self.token_indices(image, word)].sum(0)

    def words(self, image: int, size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Map of every word of image `image`'s prompt that the encoder saw, in prompt order (repeats
        as "word#2"); words cut off by the encoder's length are left out (`truncated` lists them)."""
        maps = self.combined(size)[image]  # once, not per word
        return {label: maps[idx].sum(0) for label, idx in self._resolved(image)[0].items()}

    def truncated(self, image: int) -> list[str]:
        """Words of image `image`'s prompt (labels as in `words`) that lie wholly or partly beyond the
        text encoder's length, so the model never saw them (or all of them)."""
        if self._text is None or self._family is None or not self.prompts:
            return []  # no tokenizers recorded: nothing to tell
        return self._resolved(image)[1]

    def _resolved(self, image: int) -> tuple[dict[str, list[int]], list[str]]:
        """Image `image`'s word labels: the token indices of those the encoder saw, and those it cut."""
        from .tokens import TruncatedError, word_labels

        kept: dict[str, list[int]] = {}
        cut = []
        for label in word_labels(self.prompt_of(image)):
            try:
                kept[label] = self.token_indices(image, label)
            except TruncatedError:
                cut.append(label)
        return kept, cut

    # ---- rendering ---------------------------------------------------------------------------
    def render(
        self, image: int = 0, picture: Image.Image | None = None, tile: int = 160, alpha: float = 0.55
    ) -> Image.Image:
        """A labelled grid: the picture (if given), then one heatmap per word, overlaid on the picture."""
        maps = self.words(image)
        base = picture.convert("RGB").resize((tile, tile), Image.Resampling.BICUBIC) if picture is not None else None
        tiles = [("image", base)] if base is not None else []
        grey = grey_base(picture, tile) if picture is not None else None
        for w, m in maps.items():
            tiles.append((w, overlay(m, grey, tile, alpha)))
        title = self.prompt_of(image)
        cut = self.truncated(image)
        if cut:
            title = f"{title} [truncated by the text encoder: {len(cut)} word(s) from {cut[0]!r}]"
        return _grid(tiles, tile, title=title)

    def save(self, path: str | Path, image: int = 0, picture: Image.Image | None = None) -> Path:
        """Render image `image`'s maps and write them as PNG to `path`."""
        path = Path(path)
        self.render(image, picture).save(path)
        return path


def _grid(tiles: list[tuple[str, Image.Image]], tile: int, title: str = "", cols: int = 6) -> Image.Image:
    label_h, title_h, pad = 22, 26 if title else 0, 4
    cols = max(1, min(cols, len(tiles)))
    rows = (len(tiles) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * (tile + pad) + pad, title_h + rows * (tile + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 4), title, fill="black", font=_font(16))
    for i, (label, img) in enumerate(tiles):
        r, c = divmod(i, cols)
        x, y = pad + c * (tile + pad), title_h + pad + r * (tile + label_h + pad)
        canvas.paste(img, (x, y))
        draw.text((x + 2, y + tile + 3), label, fill="black", font=_font(14))
    return canvas
