"""Contact sheets: rows of image tiles with a caption under each, as one PNG.

A tile is cut from the decoded cache the features were computed from (the centred square the
backbone saw), or decoded again from the file when the folder was read without a cache; a
file that cannot be read by then is a grey tile, so a sheet is always drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from lowres_ssl.data.cache import ArrayImages
from lowres_ssl.data.folders import BadImage, decode_image
from lowres_ssl.files import write_atomic

TILE = 96
PAD = 6
CAPTION = 26  # two lines of the small font
TITLE = 28
BACKGROUND = (255, 255, 255)
MISSING = (200, 200, 200)
QUERY_FRAME = (220, 60, 20)


@dataclass
class Tile:
    image: Image.Image
    caption: str = ""
    frame: tuple[int, int, int] | None = None  # a coloured border (the query of a row)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


class Thumbnails:
    """The tile of each feature row of an :class:`~lowres_ssl.explore.embeddings.Embedded`."""

    def __init__(self, embedded, size: int = TILE):
        self.embedded = embedded
        self.size = size
        self._cache: dict[int, Image.Image] = {}

    def __call__(self, i: int) -> Image.Image:
        if i not in self._cache:
            self._cache[i] = self._make(i)
        return self._cache[i]

    def of_file(self, path: str | Path) -> Image.Image:
        try:
            pixels = decode_image(path, self.size)
        except (BadImage, OSError):
            return Image.new("RGB", (self.size, self.size), MISSING)
        return Image.fromarray(pixels.permute(1, 2, 0).numpy())

    def _make(self, i: int) -> Image.Image:
        images = self.embedded.opened.images
        # The decoded cache where it is as sharp as a tile; a smaller one (32-px models) would
        # be a blur, so the file is decoded again at the tile's size.
        if isinstance(images, ArrayImages) and images.load_size >= self.size:
            pixels = images.images[int(self.embedded.rows[i])].cpu()
            im = Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())
            if im.size != (self.size, self.size):
                im = im.resize((self.size, self.size), Image.Resampling.BICUBIC)
            return im
        return self.of_file(self.embedded.file(i))


def short(text: str, width: int = 16) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def draw_sheet(rows: list[list[Tile]], path: Path, *, title: str = "", tile: int = TILE) -> Path:
    """Write the rows of tiles as one PNG (atomically) and return its path."""
    columns = max((len(r) for r in rows), default=1)
    top = TITLE if title else PAD
    width = PAD + columns * (tile + PAD)
    height = top + len(rows) * (tile + CAPTION + PAD) + PAD
    sheet = Image.new("RGB", (max(width, 240), height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    small, big = _font(10), _font(14)
    if title:
        draw.text((PAD, 7), title, fill=(0, 0, 0), font=big)
    for r, row in enumerate(rows):
        y = top + r * (tile + CAPTION + PAD)
        for c, t in enumerate(row):
            x = PAD + c * (tile + PAD)
            im = t.image if t.image.size == (tile, tile) else t.image.resize((tile, tile))
            sheet.paste(im, (x, y))
            if t.frame:
                draw.rectangle([x - 2, y - 2, x + tile + 1, y + tile + 1], outline=t.frame, width=3)
            for n, line in enumerate(t.caption.split("\n")[:2]):
                draw.text((x, y + tile + 2 + 12 * n), line, fill=(40, 40, 40), font=small)
    return write_atomic(path, lambda tmp: sheet.save(tmp, format="PNG"))


__all__ = ["TILE", "Thumbnails", "Tile", "draw_sheet", "short"]
