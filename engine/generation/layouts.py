"""Layout rows: prompts whose boxes are known before the image exists.

After "Data Augmentation for Object Detection by BLIP-2 and GLIGEN" (seed 003) and its peers
(GeoDiffusion, InstanceDiffusion, Gen2Det): real images of a COCO-format dataset are selected by
the seed's criteria (at most `layout.max_objects` boxes, of one category only if
`layout.one_category`, every box at least `layout.min_box_side` pixels), and each row carries one
such image's boxes, normalised to [0, 1], for GLIGEN to draw into a new image; the boxes become
the sample's labels (labeller `layout`).

Rows per category: `uniform` (`layout.rows_per_category` each) or `to_target`: a category gets
rows until the dataset's instances of it plus the boxes of it in its rows reach
`layout.target_instances`, so the rarest categories get the most rows (the seed's "imbalance
ratio", made a rule). A row made for category c carries a qualifying image holding c; the images
of c are visited in an order shuffled per pass from `layout.seed`, so every image is used once
before any is used twice.

Categories the dataset has no boxes of (`layout.borrow_for`, the novel ones) borrow the other
categories' layouts: `layout.borrow_rows` rows each, made from any qualifying image, whose most
frequent category is relabelled to the borrowing one (recorded as `relabelled` in the row's source).

As PromptPlan's, each row is a pure function of the config and its id (the category from the id's
place in the budget, the image from the seeded order, the jitter from a hash of seed and id), so
any worker makes any range of rows without the ones before it. Jitter and rescale move each box
inside the image (`layout.jitter`, `layout.scale_min` / `scale_max`), so layouts are not copies of
the real ones; the draws and the source image are recorded in the row.
"""
from __future__ import annotations

import hashlib
import json
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass
from itertools import accumulate
from typing import Iterator, Optional, Union

import numpy as np

from engine.config import Config, ConfigError, LayoutConfig
from engine.data.datasets import BAD_BOX, DetectionDataset, load_detection_dataset, missing_files
from engine.generation.prompts import MAX_PROMPT_CHARS, PromptPlan, PromptSpec


class LayoutError(ConfigError):
    pass


@dataclass(frozen=True)
class Layout:
    """One row's boxes: normalised xyxy (0..1 of the image's width and height), a category per box,
    and where they came from (`source`: the real image's id, file and size, its boxes as they were,
    and each box's recorded jitter (dx, dy as fractions of the box side) and scale)."""
    boxes: tuple[tuple[float, float, float, float], ...]
    labels: tuple[str, ...]
    source: dict

    def to_json(self) -> str:
        return json.dumps({"boxes": [list(b) for b in self.boxes], "labels": list(self.labels), "source": self.source})

    @staticmethod
    def from_json(text: str) -> "Layout":
        d = json.loads(text)
        return Layout(tuple(tuple(float(v) for v in b) for b in d["boxes"]), tuple(d["labels"]), d["source"])


@dataclass(frozen=True)
class LayoutSpec(PromptSpec):
    """A PromptSpec with the layout GLIGEN draws and the labels it gives."""
    layout: Optional[Layout] = None

    def to_row(self) -> dict:
        row = super().to_row()
        row["layout"] = self.layout.to_json()
        return row


@dataclass(frozen=True)
class Candidate:
    """A real image that qualifies as a layout."""
    id: int
    file: str
    width: int
    height: int
    boxes: tuple[tuple[float, float, float, float], ...]  # xyxy pixels
    labels: tuple[str, ...]


def select_images(ds: DetectionDataset, cfg: LayoutConfig) -> tuple[list[Candidate], Counter]:
    """The images the seed's criteria keep, in id order, and per reason how many were refused."""
    kept, refused = [], Counter()
    for r in ds.records:
        if not r.boxes:
            refused["no boxes"] += 1
        elif len(r.boxes) > cfg.max_objects:
            refused[f"more than {cfg.max_objects} objects"] += 1
        elif cfg.one_category and len(set(r.labels)) > 1:
            refused["more than one category"] += 1
        elif min(min(b[2] - b[0], b[3] - b[1]) for b in r.boxes) < cfg.min_box_side:
            refused[f"a box under {cfg.min_box_side:g} px"] += 1
        else:
            kept.append(Candidate(r.id, r.file, r.width, r.height, tuple(tuple(b) for b in r.boxes), tuple(r.labels)))
    return kept, refused


class LayoutPlan:
    """The layout rows of one config, made on demand like PromptPlan's (same attributes: len, row,
    rows, categories, counts, base, novel, all_categories, summary)."""

    layouts = True

    def __init__(self, cfg: LayoutConfig, dataset: Optional[DetectionDataset] = None):
        self.cfg = cfg
        ds = dataset or _read(cfg)
        unknown = [c for c in cfg.categories if c not in ds.categories]
        if unknown:
            raise LayoutError(f"layout.categories names {unknown[0]!r}, which {cfg.annotations!r} does not have; "
                              f"its categories are {', '.join(ds.categories[:20])}{' ...' if len(ds.categories) > 20 else ''}")
        wanted = list(cfg.categories) or [c for c in ds.categories if c not in cfg.borrow_for]
        instances = Counter(label for r in ds.records for label in r.labels)
        candidates, self.refused = select_images(ds, cfg)
        # A category's pool: the qualifying images that hold it, in id order (the order is then
        # shuffled per pass from the seed, so the pool's own order only has to be stable).
        self.pools = {c: [x for x in candidates if c in x.labels] for c in wanted}
        empty = [c for c in cfg.categories if not self.pools[c]]
        if empty:
            raise LayoutError(f"no image of {cfg.annotations!r} qualifies as a layout of {empty[0]!r} (at most "
                              f"{cfg.max_objects} objects{', one category' if cfg.one_category else ''}, boxes of at "
                              f"least {cfg.min_box_side:g} px); loosen layout.max_objects / one_category / "
                              f"min_box_side, or remove it from layout.categories")
        budget = {c: self._rows_for(c, instances[c]) for c in wanted if self.pools[c]}
        # Categories without boxes in the dataset borrow the others' layouts (relabelled).
        # (A category the file lists without any box of it, as open-vocabulary splits list their
        # novel ones, is one to borrow for.)
        known = [c for c in cfg.borrow_for if instances[c]]
        if known:
            raise LayoutError(f"layout.borrow_for names {known[0]!r}, which {cfg.annotations!r} has boxes of: its own "
                              f"layouts serve it; remove it from layout.borrow_for (or from the dataset)")
        donors = sorted({x for c in wanted for x in self.pools[c]}, key=lambda x: x.id)
        self.borrowed = list(cfg.borrow_for) if donors else []
        for c in self.borrowed:
            self.pools[c], budget[c] = donors, cfg.borrow_rows
        self.categories = [c for c in wanted + self.borrowed if budget.get(c)]
        if not self.categories:
            raise LayoutError(f"layout rows: no category of {cfg.annotations!r} gets a row (qualifying images: "
                              f"{len(candidates)}, refused: {dict(self.refused) or 'none'}"
                              + (f"; every category already has layout.target_instances={cfg.target_instances}"
                                 if cfg.balance == "to_target" and candidates else "") + ")")
        if cfg.captioner or cfg.mode == "inpainting":  # the source pixels are read: they must be there
            used = sorted({x.file for c in self.categories for x in self.pools[c]})
            missing = missing_files(used)
            if missing:
                raise LayoutError(f"{len(missing)} layout source image(s) are missing (e.g. {missing[0]!r}); "
                                  f"layout.captioner and layout.mode=inpainting read them: fix layout.image_root")
        self.counts = [budget[c] for c in self.categories]
        self.starts = list(accumulate(self.counts, initial=0))
        self.base, self.novel = [c for c in ds.categories if c not in self.borrowed], list(self.borrowed)
        self.words: dict = {}
        self.extra: dict = {}  # prompts.extra does not apply to layout rows
        self.instances = {c: instances[c] for c in wanted}
        self.summary = {"layouts": {"images_qualifying": len(candidates), "images_refused": dict(self.refused),
                                    "rows": dict(zip(self.categories, self.counts)),
                                    "dataset_instances": self.instances,
                                    "no_qualifying_image": [c for c in wanted if not self.pools[c]]}}
        self._check_lengths()

    def _rows_for(self, category: str, have: int) -> int:
        cfg = self.cfg
        if cfg.balance == "uniform":
            return cfg.rows_per_category
        missing = cfg.target_instances - have
        if missing <= 0:
            return 0
        # Whole passes over the pool first (each adds the pool's instances of the category), then
        # the fewest rows of the next pass that close the gap: the count is exact, not a mean.
        pool = self.pools[category]
        per_pass = sum(x.labels.count(category) for x in pool)
        passes, rest = divmod(missing, per_pass)
        rows = passes * len(pool)
        if rest:
            order = self._order(category, passes)
            got = 0
            for k in order:
                rows += 1
                got += pool[k].labels.count(category)
                if got >= rest:
                    break
        return rows

    def __len__(self) -> int:
        return self.starts[-1]

    @property
    def all_categories(self) -> list[str]:
        return list(dict.fromkeys(self.base + self.novel + self.categories))

    def fingerprint_data(self) -> list:
        """What the rows depend on beyond the config: the pools' images and boxes (the dataset file
        may change under the same path)."""
        digest = hashlib.sha256()
        for c in self.categories:
            for x in self.pools[c]:
                digest.update(json.dumps([c, x.id, x.width, x.height, x.boxes, x.labels]).encode())
        return [self.categories, self.counts, digest.hexdigest()]

    def _order(self, category: str, cycle: int) -> list[int]:
        """The pool's order in pass `cycle`: a permutation drawn from (seed, category, pass). A
        shard's rows share one or two passes, so the last few are kept."""
        cache = self.__dict__.setdefault("_orders", {})
        if (category, cycle) not in cache:
            if len(cache) >= 8:
                cache.clear()
            h = hashlib.blake2b(f"{self.cfg.seed}:{category}:{cycle}".encode(), digest_size=8).digest()
            cache[category, cycle] = np.random.default_rng(int.from_bytes(h, "little")).permutation(
                len(self.pools[category])).tolist()
        return cache[category, cycle]

    def row(self, i: int) -> LayoutSpec:
        cfg = self.cfg
        ci = bisect_right(self.starts, i) - 1
        cat, j = self.categories[ci], i - self.starts[ci]
        pool = self.pools[cat]
        x = pool[self._order(cat, j // len(pool))[j % len(pool)]]
        digest = hashlib.blake2b(f"{cfg.seed}:{i}".encode(), digest_size=16).digest()
        seed = int.from_bytes(digest[:8], "little") % 2**31
        rng = np.random.default_rng(int.from_bytes(digest[8:], "little"))
        boxes, moves = [], []
        for b in x.boxes:
            box, move = _move(b, x.width, x.height, cfg, rng)
            boxes.append(box)
            moves.append(move)
        source = {"image_id": x.id, "file": x.file, "width": x.width, "height": x.height,
                  "boxes": [list(b) for b in x.boxes], "moves": moves}
        labels = x.labels
        if cat in self.borrowed:  # the image's most frequent category becomes the borrowing one
            donor = max(dict.fromkeys(x.labels), key=x.labels.count)
            labels = tuple(cat if label == donor else label for label in x.labels)
            source["relabelled"] = [donor, cat]
        names = list(dict.fromkeys(labels))
        layout = Layout(tuple(boxes), labels, source)
        return LayoutSpec(i, seed, tuple(names), cfg.template.format(c1=" and ".join(names)), layout)

    def rows(self, start: int = 0, stop: Optional[int] = None) -> Iterator[LayoutSpec]:
        return (self.row(i) for i in range(start, min(len(self), len(self) if stop is None else stop)))

    def _check_lengths(self) -> None:
        longest = max((x for c in self.categories for x in self.pools[c]), key=lambda x: len(" and ".join(set(x.labels))))
        text = self.cfg.template.format(c1=" and ".join(dict.fromkeys(longest.labels)))
        if len(text) > MAX_PROMPT_CHARS:
            raise LayoutError(f"a layout prompt is {len(text)} characters; the text encoder reads 77 tokens, "
                              f"shorten layout.template")


def _move(box, width: int, height: int, cfg: LayoutConfig, rng) -> tuple[tuple[float, ...], list[float]]:
    """A pixel box, normalised, its sides scaled and its centre moved by the drawn amounts, and
    kept inside the image (shifted back, never cut, so its size stays what was drawn)."""
    x0, y0, x1, y1 = box[0] / width, box[1] / height, box[2] / width, box[3] / height
    w, h = x1 - x0, y1 - y0
    s = float(rng.uniform(cfg.scale_min, cfg.scale_max)) if cfg.scale_max > cfg.scale_min else cfg.scale_min
    dx, dy = (rng.uniform(-cfg.jitter, cfg.jitter, 2).tolist() if cfg.jitter > 0 else [0.0, 0.0])
    if s == 1.0 and dx == 0.0 and dy == 0.0:
        return (round(x0, 6), round(y0, 6), round(x1, 6), round(y1, 6)), [0.0, 0.0, 1.0]
    nw, nh = min(w * s, 1.0), min(h * s, 1.0)
    cx = min(max((x0 + x1) / 2 + dx * w, nw / 2), 1 - nw / 2)
    cy = min(max((y0 + y1) / 2 + dy * h, nh / 2), 1 - nh / 2)
    out = (cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2)
    return tuple(round(min(max(v, 0.0), 1.0), 6) for v in out), [round(dx, 6), round(dy, 6), round(s, 6)]


def _read(cfg: LayoutConfig) -> DetectionDataset:
    """The layout dataset. A box outside its image is an error here, not a skipped item: a layout
    that silently lost a box would draw an object and not label it."""
    ds = load_detection_dataset(cfg.annotations, cfg.image_root, cfg.format, check_images=False)
    if ds.skipped.counts.get(BAD_BOX):
        example = "; ".join(ds.skipped.examples.get(BAD_BOX, [])[:1])
        raise LayoutError(f"layout.annotations {cfg.annotations!r} has {ds.skipped.counts[BAD_BOX]} box(es) outside "
                          f"their image or of no area ({example}); fix or remove them in the file")
    return ds


def make_plan(cfg: Config) -> Union[PromptPlan, LayoutPlan]:
    """The rows a generate run draws: layout rows when layout.annotations is set, else prompts."""
    return LayoutPlan(cfg.layout) if cfg.layout.annotations else PromptPlan(cfg.prompts)
