"""The toy world: InstaGen's open-vocabulary setting drawn from coloured shapes, small enough that
every stage (generator pretraining, fine-tuning, grounding, detector training, evaluation) runs on
a CPU, yet written as the real files those stages read.

The paper needs three kinds of data, and the toy world draws one split for each:
  pretrain  the web data a base generator has seen: plain pictures of one or two objects of any
            category, with captions (COCO captions) and, so generated samples can be judged, boxes
  train     cluttered detection scenes of base categories only, annotated (COCO instances)
  test      the same kind of scenes with novel categories too, every object annotated
Categories are "<colour> <shape>"; every novel colour and shape also occurs in a base category,
so finding a "red circle" after training on red squares and blue circles is composition, which
is the open-vocabulary question.

    instagen toy-world --config configs/toy_world.yaml --draw-only   (engine/ablation.py runs the rest)

Every image comes from its own random stream (seed, split, index): any one can be redrawn alone
and a world is the same bytes wherever it is drawn. Boxes are the shapes' exact pixel extents.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np
from PIL import Image, ImageDraw

from engine.config import ConfigError
from engine.runtime.storage import atomic_folder

SPLITS = ("pretrain", "train", "test")  # a split's place here is part of its images' random streams
SHAPES = ("circle", "square", "triangle")  # what _draw_shape can draw
CAPTION = "a photograph of {categories}"  # finetune.template's default, so captions read as prompts do
JOINER = " and "  # finetune.joiner's default
IMAGE_NAME = "images/{split}_{index:06d}.jpg"  # image `index` of `split`, relative to the split's folder
JITTER = 20  # per-channel colour jitter of an object: a category is not one exact pixel value
PRETRAIN_NOISE = 3.0  # pixel noise std of pretrain pictures: clean, as most web photos of a thing are
FIELD_CELLS = 4  # a detection background is a FIELD_CELLS x FIELD_CELLS colour grid, smoothly upsampled
PLACE_TRIES = 50  # draws tried for an object (or clutter colour) before a crowded scene goes without it
# A clutter colour differs from every category colour by more than this in some channel, so with
# JITTER an unannotated blob never passes for an object.
CLUTTER_MARGIN = 60
DESCRIPTIONS = {
    "pretrain": "InstaGen toy world, pretrain split: plain pictures of one or two objects of any category",
    "train": "InstaGen toy world, train split: cluttered scenes of base categories only",
    "test": "InstaGen toy world, test split: cluttered scenes of all categories, every object annotated",
}

Box = list[int]  # [x, y, w, h], COCO's convention, in whole pixels


@dataclass
class WorldConfig:
    size: int = 64  # image side in px; a multiple of 8 so a VAE's latent grid divides it
    # colour name -> RGB; one word each, as category names are "<colour> <shape>"
    colors: dict[str, list[int]] = field(default_factory=lambda: {
        "red": [220, 40, 40], "green": [40, 180, 60], "blue": [50, 80, 220]})
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))  # any of circle, square, triangle
    # Categories held out of train; each one's colour and shape also occur among the base ones.
    novel: list[str] = field(default_factory=lambda: ["red circle", "green square", "blue triangle"])
    pretrain_images: int = 4000  # image-caption pairs standing for the generator's web data
    train_images: int = 2000  # detection scenes annotated with base categories
    test_images: int = 300  # detection scenes with every category annotated
    min_object: int = 12  # smallest object side in px
    max_object: int = 30  # largest object side in px
    max_objects: int = 3  # a detection scene holds 1..max_objects objects
    # Most of either box's area another box in the scene may cover (so their IoU is at most this
    # too): later objects are drawn on top, and an annotated object must stay mostly visible.
    max_overlap: float = 0.3
    distractors: int = 3  # at most this many unannotated grey/brown blobs or strokes per detection scene
    noise: float = 12.0  # std of per-pixel gaussian noise in detection scenes
    jpeg_quality: int = 95
    seed: int = 0

    @property
    def categories(self) -> list[str]:
        """Every "<colour> <shape>", colour-major; COCO category ids follow this order from 1."""
        return [f"{c} {s}" for c in self.colors for s in self.shapes]

    @property
    def base(self) -> list[str]:
        return [c for c in self.categories if c not in self.novel]

    def validate(self) -> None:
        need = _require
        need(self.size >= 16 and self.size % 8 == 0,
             f"world.size must be a multiple of 8 and at least 16, got {self.size}; e.g. 64")
        need(bool(self.colors), "world.colors is empty; give at least one, e.g. {red: [220, 40, 40]}")
        for name, rgb in self.colors.items():
            need(bool(name) and " " not in name,
                 f"world.colors key {name!r} must be one word, since categories are named '<colour> <shape>'")
            need(len(rgb) == 3 and all(0 <= v <= 255 for v in rgb),
                 f"world.colors.{name} must be three values in 0..255 (RGB), got {rgb}")
        need(bool(self.shapes) and all(s in SHAPES for s in self.shapes),
             f"world.shapes must be a non-empty list of {', '.join(SHAPES)}, got {self.shapes}")
        need(len(set(self.shapes)) == len(self.shapes), f"world.shapes lists a shape twice: {self.shapes}")
        need(bool(self.novel), "world.novel is empty; hold out at least one category, e.g. ['red circle']")
        need(len(set(self.novel)) == len(self.novel), f"world.novel lists a category twice: {self.novel}")
        for name in self.novel:
            parts = name.split(" ")
            need(len(parts) == 2, f"world.novel entry {name!r} must be '<colour> <shape>', e.g. 'red circle'")
            colour, shape = parts
            need(colour in self.colors, f"world.novel entry {name!r}: colour {colour!r} is not in world.colors "
                                        f"({', '.join(self.colors)}); add it there or fix the name")
            need(shape in self.shapes, f"world.novel entry {name!r}: shape {shape!r} is not in world.shapes "
                                       f"({', '.join(self.shapes)}); add it there or fix the name")
        base = [b.split(" ") for b in self.base]
        for name in self.novel:
            colour, shape = name.split(" ")
            need(any(c == colour for c, _ in base),
                 f"world.novel: colour {colour!r} occurs in no base category, so nothing could learn it; "
                 f"keep at least one {colour} category out of world.novel")
            need(any(s == shape for _, s in base),
                 f"world.novel: shape {shape!r} occurs in no base category, so nothing could learn it; "
                 f"keep at least one {shape} category out of world.novel")
        for key in ("pretrain_images", "train_images", "test_images", "max_objects"):
            need(getattr(self, key) >= 1, f"world.{key} must be at least 1, got {getattr(self, key)}")
        need(self.min_object >= 4,
             f"world.min_object must be at least 4 px, or shapes cannot be told apart; got {self.min_object}")
        need(self.min_object <= self.max_object,
             f"world.min_object ({self.min_object}) must not exceed world.max_object ({self.max_object})")
        need(self.max_object <= self.size,
             f"world.max_object ({self.max_object}) must not exceed world.size ({self.size}); objects lie "
             f"wholly inside the image")
        need(0.0 <= self.max_overlap <= 1.0, f"world.max_overlap must lie in [0, 1], got {self.max_overlap}")
        need(self.distractors >= 0, f"world.distractors must be >= 0, got {self.distractors}")
        need(self.noise >= 0, f"world.noise is a standard deviation and must be >= 0, got {self.noise}")
        need(1 <= self.jpeg_quality <= 100, f"world.jpeg_quality must lie in 1..100, got {self.jpeg_quality}")
        need(self.seed >= 0, f"world.seed must be >= 0 (numpy seeds are non-negative), got {self.seed}")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# ---------------------------------------------------------------------------------------------
# Drawing one image


def draw_scene(cfg: WorldConfig, split: str, index: int) -> tuple[Image.Image, list[tuple[str, Box]]]:
    """Image `index` of `split` and its objects as (category, box), in drawing order (later on top).
    Depends on nothing but its arguments."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    if split == "pretrain":
        pool = cfg.categories
        cats = [pool[k] for k in rng.choice(len(pool), size=int(rng.integers(1, 3)), replace=False)]
        img = Image.new("RGB", (cfg.size, cfg.size), tuple(int(v) for v in rng.integers(200, 256, 3)))
        noise = PRETRAIN_NOISE
    else:
        pool = cfg.base if split == "train" else cfg.categories
        cats = [pool[k] for k in rng.integers(len(pool), size=int(rng.integers(1, cfg.max_objects + 1)))]
        img = _background(rng, cfg)
        noise = cfg.noise
    draw = ImageDraw.Draw(img)
    objects: list[tuple[str, Box]] = []
    for cat in cats:
        box = _place(rng, cfg, [b for _, b in objects])
        if box is None:
            continue
        colour, shape = cat.split(" ")
        rgb = np.clip(np.array(cfg.colors[colour]) + rng.integers(-JITTER, JITTER + 1, 3), 0, 255)
        _draw_shape(draw, shape, box, tuple(int(v) for v in rgb))
        objects.append((cat, box))
    pixels = np.asarray(img, np.float32) + rng.normal(0.0, noise, (cfg.size, cfg.size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8)), objects


def object_masks(objects: list[tuple[str, Box]], size: int) -> np.ndarray:
    """The visible pixels (n, size, size) of draw_scene's objects, later ones hiding earlier ones:
    the exact masks a segmenter is judged against."""
    masks = np.zeros((len(objects), size, size), dtype=bool)
    for i, (cat, box) in enumerate(objects):
        img = Image.new("L", (size, size))
        _draw_shape(ImageDraw.Draw(img), cat.split(" ")[1], box, 255)
        masks[i] = np.asarray(img) > 0
        masks[:i] &= ~masks[i]
    return masks


def _background(rng: np.random.Generator, cfg: WorldConfig) -> Image.Image:
    """A smooth muted colour field with grey/brown clutter: texture a detector must learn to ignore."""
    grey = rng.integers(70, 190, (FIELD_CELLS, FIELD_CELLS, 1))
    tint = rng.integers(-25, 26, (FIELD_CELLS, FIELD_CELLS, 3))
    cells = np.clip(grey + tint, 0, 255).astype(np.uint8)
    img = Image.fromarray(cells).resize((cfg.size, cfg.size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, cfg.distractors + 1))):
        rgb = _clutter_colour(rng, cfg)
        if rgb is None:
            continue
        cx, cy = (int(v) for v in rng.integers(0, cfg.size, 2))
        if rng.random() < 0.5:  # a blob: an ellipse of unequal axes, often cut by the image edge
            rx, ry = (int(v) for v in rng.integers(2, cfg.size // 8 + 3, 2))
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=rgb)
        else:  # a stroke
            ex, ey = (int(v) for v in rng.integers(0, cfg.size, 2))
            draw.line([(cx, cy), (ex, ey)], fill=rgb, width=int(rng.integers(1, 4)))
    return img


def _clutter_colour(rng: np.random.Generator, cfg: WorldConfig) -> Optional[tuple[int, int, int]]:
    for _ in range(PLACE_TRIES):
        v = int(rng.integers(50, 211))
        rgb = (v, v, v) if rng.random() < 0.5 else (v, int(v * 0.7), int(v * 0.4))  # grey or brown
        if all(max(abs(a - b) for a, b in zip(rgb, c)) > CLUTTER_MARGIN for c in cfg.colors.values()):
            return rgb
    return None  # custom category colours crowd out every grey and brown


def _place(rng: np.random.Generator, cfg: WorldConfig, taken: list[Box]) -> Optional[Box]:
    """A random box wholly inside the image that covers at most max_overlap of any taken one."""
    for _ in range(PLACE_TRIES):
        s = int(rng.integers(cfg.min_object, cfg.max_object + 1))
        x, y = (int(v) for v in rng.integers(0, cfg.size - s + 1, 2))
        box = [x, y, s, s]
        if all(_overlap(box, t) <= cfg.max_overlap for t in taken):
            return box
    return None


def _overlap(a: Box, b: Box) -> float:
    """Intersection over the smaller box's area: how much of the one underneath can be hidden."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0) / min(a[2] * a[3], b[2] * b[3])


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, rgb: tuple[int, int, int] | int) -> None:
    x, y, s, _ = box
    right, bottom = x + s - 1, y + s - 1  # PIL's corners are inclusive pixels: the extent is s wide
    if shape == "circle":
        draw.ellipse([x, y, right, bottom], fill=rgb)
    elif shape == "square":
        draw.rectangle([x, y, right, bottom], fill=rgb)
    else:  # upright isosceles triangle, apex at the top middle
        draw.polygon([(x + (s - 1) / 2, y), (x, bottom), (right, bottom)], fill=rgb)


# ---------------------------------------------------------------------------------------------
# Writing a world


def _save_jpeg(img: Image.Image, path: str, quality: int) -> None:
    img.save(path, format="JPEG", quality=quality)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _draw_split(root: str, cfg: WorldConfig, split: str,
                progress: Optional[Callable[[str, int, int], None]]) -> dict:
    """Images and COCO files of one split under root/split; returns its image and box counts."""
    count = {"pretrain": cfg.pretrain_images, "train": cfg.train_images, "test": cfg.test_images}[split]
    os.makedirs(os.path.join(root, split, "images"))
    cat_id = {c: i + 1 for i, c in enumerate(cfg.categories)}
    images, boxes, captions = [], [], []
    for i in range(count):
        img, objects = draw_scene(cfg, split, i)
        file_name = IMAGE_NAME.format(split=split, index=i)
        _save_jpeg(img, os.path.join(root, split, file_name), cfg.jpeg_quality)
        images.append({"id": i + 1, "file_name": file_name, "width": cfg.size, "height": cfg.size})
        for cat, box in objects:
            boxes.append({"id": len(boxes) + 1, "image_id": i + 1, "category_id": cat_id[cat], "bbox": box,
                          "area": box[2] * box[3], "iscrowd": 0})
        if split == "pretrain":
            captions.append({"id": i + 1, "image_id": i + 1,
                             "caption": CAPTION.format(categories=JOINER.join(c for c, _ in objects))})
        if progress is not None:
            progress(split, i + 1, count)
    info = {"description": DESCRIPTIONS[split], "base": cfg.base, "novel": list(cfg.novel)}
    categories = [{"id": cat_id[c], "name": c, "supercategory": c.split(" ")[0]} for c in cfg.categories]
    _write_json(os.path.join(root, split, "instances.json"),
                {"info": info, "images": images, "annotations": boxes, "categories": categories})
    if split == "pretrain":
        _write_json(os.path.join(root, split, "captions.json"),
                    {"info": info, "images": images, "annotations": captions})
    return {"images": count, "boxes": len(boxes)}


def merge_splits(world_dir: str, splits: list[str], out: str) -> dict:
    """The world's `splits` as one COCO file at `out`, each image's file_name under `world_dir`
    (so world_dir is its image root); returns its image and box counts. Ids are renumbered in
    order; each split keeps the boxes it has (the train split's are base only)."""
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown or not splits:
        raise ConfigError(f"cannot merge splits {splits!r}; choose from {', '.join(SPLITS)}")
    images, boxes, categories = [], [], None
    for split in splits:
        with open(os.path.join(world_dir, split, "instances.json"), encoding="utf-8") as f:
            data = json.load(f)
        categories = categories or data["categories"]
        ids = {}
        for im in data["images"]:
            ids[im["id"]] = len(images) + 1
            images.append({**im, "id": ids[im["id"]], "file_name": f"{split}/{im['file_name']}"})
        boxes += [{**a, "id": len(boxes) + k + 1, "image_id": ids[a["image_id"]]}
                  for k, a in enumerate(data["annotations"])]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    _write_json(out, {"info": {"description": f"the world's {' + '.join(splits)} splits"}, "images": images,
                      "annotations": boxes, "categories": categories})
    return {"images": len(images), "boxes": len(boxes)}


def _read_world(out: str) -> Optional[dict]:
    """What out/world.json holds; None where `out` is free to draw into. Refuses to let a draw
    replace a folder that is not a world, since atomic_folder swaps out whatever is there."""
    if not os.path.exists(out):
        return None
    if not os.path.isdir(out):
        raise ConfigError(f"{out!r} is a file, not a folder; choose another path for the toy world")
    path = os.path.join(out, "world.json")
    if not os.path.exists(path):
        if os.listdir(out):
            raise ConfigError(f"{out!r} holds files but no world.json, so it is not a toy world; "
                              f"choose another path or delete it")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            world = json.load(f)
    except ValueError as e:
        raise ConfigError(f"{path!r} is not valid JSON ({e}); choose another path or delete {out!r}") from None
    if not (isinstance(world, dict) and isinstance(world.get("config"), dict)
            and isinstance(world.get("summary"), dict) and isinstance(world["summary"].get("splits"), dict)):
        raise ConfigError(f"{path!r} is not a toy world's record; choose another path or delete {out!r}")
    return world


def draw_world(out: str, cfg: WorldConfig, splits: Iterable[str] = SPLITS,
               progress: Optional[Callable[[str, int, int], None]] = None) -> dict:
    """Draw `splits` of the world `cfg` into folder `out`, whole or not at all; returns a summary
    {path, categories, base, novel, splits: {split: {images, boxes}}}. A folder already holding
    this world is returned as it is (a split it lacks is added; the rest comes out the same bytes).
    `progress(split, done, total)` is called after every image."""
    cfg.validate()
    splits = set(splits)
    unknown = sorted(splits - set(SPLITS))
    if unknown:
        raise ConfigError(f"unknown split {unknown[0]!r}; choose from {', '.join(SPLITS)}")
    out = os.path.abspath(os.path.expanduser(out))
    config = dataclasses.asdict(cfg)
    world = _read_world(out)
    if world is not None:
        if world["config"] != config:
            changed = sorted(k for k in config if world["config"].get(k) != config[k])
            raise ConfigError(f"{out!r} holds another world (its config differs in "
                              f"{', '.join('world.' + k for k in changed) or 'its keys'}); choose another "
                              f"path or delete it")
        if splits <= set(world["summary"]["splits"]):
            return {"path": out, **world["summary"]}
        splits |= set(world["summary"]["splits"])
    summary = {"categories": cfg.categories, "base": cfg.base, "novel": list(cfg.novel), "splits": {}}
    with atomic_folder(out) as tmp:
        for split in (s for s in SPLITS if s in splits):
            summary["splits"][split] = _draw_split(tmp, cfg, split, progress)
        with open(os.path.join(tmp, "world.json"), "w", encoding="utf-8") as f:
            json.dump({"config": config, "summary": summary}, f, indent=1)
    return {"path": out, **summary}
