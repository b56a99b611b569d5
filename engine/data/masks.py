"""Instance masks as COCO stores them: one place that encodes and decodes them (pycocotools.mask).

A mask in a sample's JSON record, the pool and the COCO export is compressed RLE with its counts
as text, {"size": [h, w], "counts": "..."}, which is what `pycocotools.mask.decode` reads. Readers
also take the other two COCO forms, so that instances are not lost on the way in (X-Paste's
copy-paste dropped polygon masks): uncompressed RLE (counts a list of run lengths) and polygons
(a list of [x0, y0, x1, y1, ...] rings). An empty or missing mask decodes to all zeros; a
malformed one is a MaskError naming the sample, never a crash inside pycocotools.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from pycocotools import mask as mask_utils

from engine.errors import UserError


# What the mask stage says of each box's mask: kept, or why not (engine.generation.masks).
MASK_STATUSES = ("ok", "low_iou", "low_fill", "high_fill", "empty")


class MaskError(UserError, ValueError):
    pass


def status_counts(records: list[dict]) -> dict[str, int]:
    """Per status, the masks of these sample records: a shard's manifest entry holds them."""
    counts = dict.fromkeys(MASK_STATUSES, 0)
    for meta in records:
        for status in meta.get("mask_status", ()):
            counts[status] = counts.get(status, 0) + 1
    return counts


def encode(mask: np.ndarray) -> dict:
    """A boolean (h, w) mask as compressed RLE with text counts (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode(segm, height: int, width: int, where: str = "a mask") -> np.ndarray:
    """A boolean (height, width) mask from any COCO segmentation (compressed or uncompressed RLE,
    polygons) or None / [] (empty). `where` names the instance in the error of a corrupt mask."""
    if segm is None or (isinstance(segm, (list, tuple)) and len(segm) == 0):
        return np.zeros((height, width), dtype=bool)
    fix = "; regenerate the masks (instagen generate with masks.enabled=true) or remove that instance"
    try:
        if isinstance(segm, dict):
            size = [int(v) for v in segm["size"]]
            if size != [height, width]:
                raise MaskError(f"{where} is {size[0]}x{size[1]}, but its image is {height}x{width}{fix}")
            counts = segm["counts"]
            if isinstance(counts, list):  # uncompressed RLE
                if sum(int(c) for c in counts) != height * width or any(int(c) < 0 for c in counts):
                    raise MaskError(f"{where} has run lengths that do not cover its {height}x{width} image{fix}")
                rle = mask_utils.frPyObjects({"size": size, "counts": [int(c) for c in counts]}, height, width)
            elif isinstance(counts, (str, bytes)):
                rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else bytes(counts)}
                if not _rle_covers(rle["counts"], height * width):
                    raise MaskError(f"{where} is a corrupt RLE (its runs do not cover its {height}x{width} image){fix}")
            else:
                raise MaskError(f"{where} has RLE counts of type {type(counts).__name__}{fix}")
        elif isinstance(segm, (list, tuple)):  # polygons
            rings = [[float(v) for v in ring] for ring in segm]
            if any(len(ring) < 6 or len(ring) % 2 for ring in rings):
                raise MaskError(f"{where} has a polygon with fewer than 3 points or an odd coordinate count{fix}")
            rle = mask_utils.merge(mask_utils.frPyObjects(rings, height, width))
        else:
            raise MaskError(f"{where} is a {type(segm).__name__}, not a COCO segmentation (RLE or polygons){fix}")
        return mask_utils.decode(rle).astype(bool)
    except MaskError:
        raise
    except (KeyError, TypeError, ValueError, UnicodeError) as e:
        raise MaskError(f"{where} is not a readable COCO segmentation ({type(e).__name__}: {e}){fix}") from None


def _rle_covers(counts: bytes, pixels: int) -> bool:
    """Whether compressed RLE counts (COCO's LEB128-like text, runs after the second stored as
    differences from the run two before) are runs >= 0 summing to exactly `pixels`. pycocotools
    checks neither: a cut-short string decodes silently into a wrong mask, and runs longer than
    the image write past its buffer."""
    runs, i = [], 0
    while i < len(counts):
        x, k, more = 0, 0, True
        while more:
            if i >= len(counts):
                return False
            c = counts[i] - 48
            if not 0 <= c < 64:
                return False
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return False
        runs.append(x)
    return sum(runs) == pixels


def bbox(mask: np.ndarray) -> Optional[list[float]]:
    """The xyxy pixel box (right and bottom edges exclusive, as the detector's boxes) of a mask's
    pixels, or None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def fill(mask: np.ndarray, box: list[float]) -> float:
    """Mask area / box area: how much of its box a mask covers (above 1 where it spills out)."""
    x0, y0, x1, y1 = box
    area = max(x1 - x0, 0.0) * max(y1 - y0, 0.0)
    return float(mask.sum()) / area if area > 0 else 0.0
