"""Contact sheets: images in a grid with their boxes drawn and named, as PNG bytes. The one
renderer behind the export's preview, the evaluation's predictions and the toy world's samples:
people look at these before they read a number.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

Colour = tuple[int, int, int]
# The paper's figures: base categories green, novel ones orange.
BASE_COLOUR, NOVEL_COLOUR = (40, 220, 80), (255, 140, 0)
# What was refused: layout boxes a verifying detector refused (engine.generation.annotation,
# layout+detector), boxes and images the quality filter refused (engine.generation.filter).
REFUSED_COLOUR = (230, 30, 60)


@dataclass
class Tile:
    image: Image.Image
    boxes: Sequence[tuple[Sequence[float], str, Colour]] = ()  # (xyxy in the image's pixels, label, colour)
    caption: Sequence[str] = field(default_factory=list)  # lines under the image


def contact_sheet(tiles: Sequence[Tile], columns: int = 4, side: int = 256, enlarge: bool = True,
                  background: Colour = (255, 255, 255)) -> bytes:
    """The tiles `columns` to a row, each image scaled so its longer side is `side` (only ever
    shrunk when `enlarge` is False; small images are enlarged pixel by pixel, so a 64x64 image
    stays sharp), its boxes outlined and labelled on a band of the box's colour. No tiles: one
    empty cell."""
    if not tiles:  # e.g. a run whose every sample was dropped: an empty sheet, not no sheet
        tiles = [Tile(Image.new("RGB", (side, side), background))]
    font = ImageFont.load_default()
    line_h = _line_height(font)
    caption_h = max(len(t.caption) for t in tiles) * line_h
    drawn = [_draw(t, side, enlarge, font) for t in tiles]
    cell_w, cell_h = max(d.width for d in drawn), max(d.height for d in drawn) + caption_h
    columns = max(1, min(columns, len(drawn)))
    rows = (len(drawn) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), background)
    text = ImageDraw.Draw(sheet)
    ink = (0, 0, 0) if sum(background) > 384 else (230, 230, 230)
    for k, (tile, img) in enumerate(zip(tiles, drawn)):
        x, y = (k % columns) * cell_w, (k // columns) * cell_h
        sheet.paste(img, (x, y))
        for n, line in enumerate(tile.caption):
            text.text((x + 4, y + img.height + n * line_h), line, fill=ink, font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def _line_height(font) -> int:
    return font.getbbox("Ag")[3] + 3


def _draw(tile: Tile, side: int, enlarge: bool, font) -> Image.Image:
    img = tile.image.convert("RGB")
    scale = side / max(img.size)
    if scale < 1 or enlarge:
        resample = Image.NEAREST if scale >= 2 else Image.BILINEAR
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), resample)
    else:
        scale = 1.0
    draw = ImageDraw.Draw(img)
    for box, label, colour in tile.boxes:
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        _, _, right, bottom = draw.textbbox((0, 0), label, font=font)
        # Above the box when there is room, else just inside its top edge.
        ty = y0 - bottom if y0 >= bottom else y0
        draw.rectangle([x0, ty, x0 + right, ty + bottom], fill=colour)
        draw.text((x0, ty), label, fill=(0, 0, 0), font=font)
    return img
