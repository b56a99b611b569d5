"""Copy-paste augmentation (X-Paste, DiverGen): pool instances pasted onto real training images.

`load_pool_index` (driver) reads an instance pool's manifest (engine.generation.pool) into the
instances of each category to paste, checked against the detector's categories first: a
requested category the pool has no instance of is one line, before Ray starts. `CopyPaste`
(in the detector's Augmenter, on Ray Data workers) pastes `per_image` instances onto a real
image:

- sampling: a category drawn category-balanced (each equally likely whatever its instance
  count; the `rare` ones `rare_boost` times as likely), then one of its instances uniformly;
- placement: the instance's longer side drawn in [min_size, max_size] of the image's shorter
  side, its position uniform over the image, its RGBA mask composited over what lies beneath;
- occlusion: every object already there (real boxes, as box-shaped masks or their own masks
  where the row has them; earlier pasted instances, as their masks) loses the pixels a paste
  covers; one with less than `min_visible` of its area left is dropped, the others get the box
  of what stays visible. A pasted instance's box is its visible mask's bounding box.

Draws come from a generator seeded by (copy_paste.seed, the sample's seed in this epoch), so the
same run pastes the same instances and each epoch draws new ones, and each pasted instance is recorded (pool key, category, box). Masks are read
through engine.data.masks: RLE (compressed or not), polygons and empty masks alike; an instance
whose mask is empty once scaled is skipped and counted, never silently kept as a box.
"""
from __future__ import annotations

import io
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

from engine.config import CopyPasteConfig
from engine.data import masks as rle
from engine.data.shards import ShardStore, iter_samples
from engine.errors import UserError


class CopyPasteError(UserError, ValueError):
    pass


@dataclass
class PoolIndex:
    """Per category to paste: its instances as (pool shard url, key)."""
    instances: dict[str, list[tuple[str, str]]]
    weights: dict[str, float]  # the category's sampling weight (balanced, rare boosted)


def load_pool_index(cfg: CopyPasteConfig, detector_categories: list[str]) -> PoolIndex:
    where = f"detector.copy_paste.pool {cfg.pool!r}"
    store = ShardStore(cfg.pool)
    info = store.run_info()
    if info is None or info.get("kind") != "instance pool":
        raise CopyPasteError(f"{where} is no instance pool (no run.json of `instagen pool`); build one with "
                             f"`instagen pool --from OUTPUT --output {cfg.pool}`")
    entries = store.finished()
    if store.damaged:
        shard, why = sorted(store.damaged.items())[0]
        raise CopyPasteError(f"{where}: {shard} is damaged ({why}); rerun the `instagen pool` command that built it")
    instances: dict[str, list[tuple[str, str]]] = {}
    for index in sorted(entries):
        url = store.shard_url(index)
        for key, label in zip(entries[index]["keys"], entries[index]["labels"]):
            instances.setdefault(label, []).append((url, key))
    wanted = list(cfg.categories) or sorted(c for c in instances if c in set(detector_categories))
    unknown = [c for c in wanted + list(cfg.rare) if c not in detector_categories]
    if unknown:
        raise CopyPasteError(f"detector.copy_paste names category {unknown[0]!r}, which is not one of the "
                             f"detector's categories ({', '.join(detector_categories[:10])}); remove it")
    missing = [c for c in wanted if not instances.get(c)]
    if missing:
        have = ", ".join(f"{c} {len(v)}" for c, v in sorted(instances.items())) or "no instances at all"
        raise CopyPasteError(f"{where} has no instance of category {missing[0]!r} (it holds {have}); build the "
                             f"pool from an output that generated it, or leave it out of detector.copy_paste.categories")
    if not wanted:
        raise CopyPasteError(f"{where} has no instance of any of the detector's categories; build it from an "
                             f"output generated for them")
    return PoolIndex({c: instances[c] for c in wanted},
                     {c: cfg.rare_boost if c in cfg.rare else 1.0 for c in wanted})


@dataclass
class Instance:
    rgb: np.ndarray  # (h, w, 3) uint8
    mask: np.ndarray  # (h, w) bool
    category: str
    key: str


class CopyPaste:
    """Pastes pool instances onto images (module docstring). Instances are read a pool shard at a
    time and the last `cached_shards` kept: a Ray Data worker holds a few shards, not the pool."""

    def __init__(self, cfg: CopyPasteConfig, index: PoolIndex, cached_shards: int = 8):
        self.cfg, self.index, self.cached_shards = cfg, index, cached_shards
        self.categories = sorted(index.instances)
        weights = np.array([index.weights[c] for c in self.categories], dtype=np.float64)
        self.p = weights / weights.sum()
        self.shards: OrderedDict[str, dict[str, Instance]] = OrderedDict()
        self.skipped_empty = 0

    def instance(self, url: str, key: str) -> Instance:
        if url not in self.shards:
            loaded = {}
            for sample in iter_samples([url], decode=False):
                name = sample["__key__"].rsplit("/", 1)[-1]
                record = json.loads(sample["json"])
                rgba = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGBA"))
                mask = rle.decode(record.get("mask"), rgba.shape[0], rgba.shape[1], f"pool instance {name} in {url}")
                loaded[name] = Instance(rgba[..., :3], mask, record["category"], name)
            self.shards[url] = loaded
            while len(self.shards) > self.cached_shards:
                self.shards.popitem(last=False)
        self.shards.move_to_end(url)
        if key not in self.shards[url]:
            raise CopyPasteError(f"pool instance {key} is listed in the manifest of {url} but not in the shard; the "
                                 f"pool changed while training: rerun the `instagen pool` command that built it")
        return self.shards[url][key]

    def __call__(self, image: np.ndarray, boxes: list[list[float]], labels: list[str], seed: int,
                 masks: Optional[list] = None) -> tuple[np.ndarray, list[list[float]], list[str], list[dict]]:
        """(image, boxes, labels) with `per_image` instances pasted; `masks` are the real objects'
        COCO segmentations where known (None or missing: the box is the object). Returns the new
        image, boxes and labels (real objects first, in order, less the dropped), and a record of
        each paste."""
        # Drawn from (copy_paste.seed, the sample's seed): the detector's input pipeline gives each
        # planned sample of each epoch its own seed, so a run repeats and every epoch draws afresh.
        rng = np.random.default_rng([self.cfg.seed, seed])
        picks = []
        for _ in range(self.cfg.per_image):
            category = self.categories[int(rng.choice(len(self.categories), p=self.p))]
            url, key = self.index.instances[category][int(rng.integers(len(self.index.instances[category])))]
            picks.append(self.instance(url, key))
        return paste(image, boxes, labels, picks, rng, self.cfg, masks, self)


def paste(image: np.ndarray, boxes: list[list[float]], labels: list[str], picks: list[Instance],
          rng: np.random.Generator, cfg: CopyPasteConfig, masks: Optional[list] = None,
          counter: Optional[CopyPaste] = None):
    """Paste `picks` in order (see CopyPaste.__call__); positions and sizes drawn from `rng`."""
    h, w = image.shape[:2]
    out = np.array(image, dtype=np.uint8, copy=True)
    objects = []  # [full-size visible mask, original area, label]
    for j, (box, label) in enumerate(zip(boxes, labels)):
        segm = masks[j] if masks is not None and j < len(masks) else None
        if segm is None:
            full = np.zeros((h, w), dtype=bool)
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            full[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)] = True
        else:
            full = rle.decode(segm, h, w, f"the mask of real box {j}")
        objects.append([full, int(full.sum()), label])
    n_real = len(objects)
    pasted = []
    for inst in picks:
        side = rng.uniform(cfg.min_size, cfg.max_size) * min(h, w)
        r = side / max(inst.mask.shape)
        nh, nw = max(1, min(h, round(inst.mask.shape[0] * r))), max(1, min(w, round(inst.mask.shape[1] * r)))
        m = np.asarray(Image.fromarray(inst.mask.astype(np.uint8) * 255).resize((nw, nh), Image.NEAREST)) > 127
        if not m.any():
            if counter is not None:
                counter.skipped_empty += 1
            continue  # scaled to nothing: no box from an empty mask
        rgb = np.asarray(Image.fromarray(inst.rgb).resize((nw, nh), Image.BILINEAR))
        x, y = int(rng.integers(0, w - nw + 1)), int(rng.integers(0, h - nh + 1))
        region = out[y:y + nh, x:x + nw]
        region[m] = rgb[m]
        full = np.zeros((h, w), dtype=bool)
        full[y:y + nh, x:x + nw] = m
        for obj in objects:
            obj[0] &= ~full  # what lies beneath is hidden
        objects.append([full, int(full.sum()), inst.category])
        pasted.append({"key": inst.key, "category": inst.category, "at": [x, y, nw, nh], "area": int(m.sum())})
    new_boxes, new_labels = [], []
    for i, (visible, area, label) in enumerate(objects):
        left = int(visible.sum())
        kept = area > 0 and left > 0 and left >= cfg.min_visible * area
        if kept:
            # An object nothing covered keeps its box as it was (not rounded to its mask's pixels).
            new_boxes.append(list(boxes[i]) if i < n_real and left == area else rle.bbox(visible))
            new_labels.append(label)
        if i >= n_real:
            pasted[i - n_real]["box"] = new_boxes[-1] if kept else None  # None: hidden by a later paste
    return out, new_boxes, new_labels, pasted
