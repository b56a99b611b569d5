"""A tiny but real COCO-format detection dataset for tests: JPEG files with coloured shapes drawn
at known boxes, and an instances JSON that pycocotools reads.

    ann, root = make_coco_dataset(tmp_path, n_images=6, categories=["red square", "blue disc"])

Image i holds one object of every category (placed on a grid, so boxes never overlap), plus a
second object of category 0 on odd images; each category has a fixed colour and shape, so a model
can in principle learn them. Ground truth is exact: the box is the drawn shape's bounding box.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw

# COCO 2017's 80 categories in id order; ids run 1..90 with these gaps.
COCO_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"]
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]

COLOURS = [(220, 40, 40), (40, 80, 220), (40, 180, 60), (230, 200, 30), (160, 60, 200), (30, 200, 200)]


def draw_image(path: str, size: int, objects: list[tuple[int, list[float]]]) -> None:
    """Draw (category index, xyxy box) objects on a grey background and save as JPEG."""
    img = Image.new("RGB", (size, size), (128, 128, 128))
    d = ImageDraw.Draw(img)
    for cat, (x0, y0, x1, y1) in objects:
        colour = COLOURS[cat % len(COLOURS)]
        # xyxy pixel boxes are exclusive at the far edge; PIL's are inclusive.
        shape = (x0, y0, x1 - 1, y1 - 1)
        if cat % 2 == 0:
            d.rectangle(shape, fill=colour)
        else:
            d.ellipse(shape, fill=colour)
    img.save(path, format="JPEG", quality=95)


def make_coco_dataset(tmp_path, n_images: int = 6, categories: Optional[list[str]] = None,
                      size: int = 64, first_category_id: int = 1) -> tuple[str, str]:
    """Write `n_images` JPEGs and a COCO instances JSON under `tmp_path`.

    Returns (annotation JSON path, image root). Category ids start at `first_category_id` and
    step by 2, so code that confuses ids with indices fails.
    """
    categories = categories or ["red square", "blue disc"]
    root = Path(tmp_path) / "images"
    root.mkdir(parents=True, exist_ok=True)
    cat_ids = [first_category_id + 2 * i for i in range(len(categories))]
    images, annotations = [], []
    cells = len(categories) + 1  # grid cells per row: one spare for the extra object
    cell = size // cells
    side = max(4, int(cell * 0.8))
    for i in range(n_images):
        objects = []
        for c in range(len(categories)):
            x0 = c * cell + (cell - side) // 2
            y0 = (i % 2) * (size - side)  # top row on even images, bottom row on odd ones
            objects.append((c, [float(x0), float(y0), float(x0 + side), float(y0 + side)]))
        if i % 2 == 1:
            x0 = len(categories) * cell + (cell - side) // 2
            objects.append((0, [float(x0), 0.0, float(x0 + side), float(side)]))
        name = f"{i:06d}.jpg"
        draw_image(str(root / name), size, objects)
        images.append({"id": 100 + i, "file_name": name, "width": size, "height": size})
        for c, (x0, y0, x1, y1) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, "category_id": cat_ids[c],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                "iscrowd": 0})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": cid, "name": n, "supercategory": "shape"} for cid, n in zip(cat_ids, categories)]}
    ann = Path(tmp_path) / "instances.json"
    ann.write_text(json.dumps(data))
    return str(ann), str(root)


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
