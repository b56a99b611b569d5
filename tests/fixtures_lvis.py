"""A tiny LVIS-shaped dataset for tests: real JPEGs found through `coco_url` as LVIS v1 gives them
(<root>/train2017/x.jpg), categories with frequency groups, synonyms, definitions, parenthesised
senses ("bat_(animal)") and image / instance counts, and images with neg_category_ids and
not_exhaustive_category_ids.

    train, val, root = make_lvis_dataset(tmp_path, n_categories=12)

Frequent categories show in most images, rare ones in one or two, as in LVIS.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from tests.fixtures_coco import draw_image

WORDS = ["ball", "box", "cup", "kite", "lamp", "mug", "pen", "ring", "sock", "vase", "drum", "fan", "hat", "jar",
         "key", "log", "net", "pot", "rug", "saw", "tap", "urn", "wok", "yak"]


def lvis_categories(n: int, names: Sequence[str] = ()) -> list[dict]:
    """`n` categories in LVIS v1's proportions (405 frequent, 461 common, 337 rare of 1,203), in that
    order; two share a word in two senses, as LVIS's bat_(animal) and bat_(sports_equipment) do.
    `names`: real LVIS names for the first (frequent) categories; the made-up ones avoid them."""
    cats = []
    n_f, n_fc = round(n * 405 / 1203), round(n * 866 / 1203)
    for i in range(n):
        name = WORDS[i % len(WORDS)] + ("" if i < len(WORDS) else f"_{i // len(WORDS)}")
        if i == 1:
            name = "bat_(animal)"
        if i == n - 1:
            name = "bat_(sports_equipment)"
        if i < len(names):
            name = names[i]
        while i >= len(names) and name in names:
            name += "_x"
        frequency = "f" if i < n_f else "c" if i < n_fc else "r"
        cats.append({"id": 1 + 2 * i, "name": name, "frequency": frequency, "synset": f"{name}.n.01",
                     "synonyms": [name, f"{name.split('_(')[0]} thing"],
                     "def": f"an object called {name.split('_(')[0]} used in tests"})
    return cats


def _split(tmp_path: Path, root: Path, cats: list[dict], n_images: int, first_id: int, seed: int,
           size: int, all_categories: bool) -> dict:
    rng = random.Random(seed)
    frequent = [c for c in cats if c["frequency"] != "r"]
    images, annotations = [], []
    for k in range(n_images):
        image_id = first_id + k
        if all_categories and k < len(cats):
            chosen = [cats[k]]  # the evaluation split shows every category at least once
        else:
            chosen = [rng.choice(frequent)]
        chosen.append(rng.choice(frequent))
        objects = []
        for j, c in enumerate(chosen):
            side = size // 3
            x0, y0 = 4 + j * (size // 2), 4 + (k % 2) * (size // 3)
            objects.append((cats.index(c), [float(x0), float(y0), float(x0 + side), float(y0 + side)]))
        name = f"{image_id:012d}.jpg"
        draw_image(str(root / "train2017" / name), size, objects)
        present = {cats[i]["id"] for i, _ in objects}
        images.append({"id": image_id, "width": size, "height": size,
                       "coco_url": f"http://images.cocodataset.org/train2017/{name}",
                       "neg_category_ids": sorted(c["id"] for c in rng.sample(cats, 3) if c["id"] not in present),
                       "not_exhaustive_category_ids": []})
        for i, (x0, y0, x1, y1) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cats[i]["id"],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
    counted = [dict(c, image_count=len({a["image_id"] for a in annotations if a["category_id"] == c["id"]}),
                    instance_count=sum(1 for a in annotations if a["category_id"] == c["id"])) for c in cats]
    return {"images": images, "annotations": annotations, "categories": counted}


def make_lvis_dataset(tmp_path, n_categories: int = 12, train_images: int = 12, val_images: int = 12,
                      size: int = 64, declared_counts: bool = False, names: Sequence[str] = ()) -> tuple[str, str, str]:
    """Write train and val LVIS JSONs and their JPEGs; returns (train JSON, val JSON, image root).
    `declared_counts`: each category's image_count as the full LVIS train set would give it (rare 1-10
    images, common 11-100, frequent more) rather than counted from these few images."""
    tmp_path = Path(tmp_path)
    root = tmp_path / "lvis_images"
    (root / "train2017").mkdir(parents=True, exist_ok=True)
    cats = lvis_categories(n_categories, names)
    paths = []
    for split, n, first, all_cats in (("train", train_images, 1, False), ("val", val_images, 10_001, True)):
        data = _split(tmp_path, root, cats, n, first, seed=len(split), size=size, all_categories=all_cats)
        if declared_counts:
            for i, c in enumerate(data["categories"]):
                c["image_count"] = {"r": 1 + i % 10, "c": 11 + i % 90, "f": 101 + 7 * i}[c["frequency"]]
                c["instance_count"] = 2 * c["image_count"]
        path = tmp_path / f"lvis_v1_{split}.json"
        path.write_text(json.dumps(data))
        paths.append(str(path))
    return paths[0], paths[1], str(root)
