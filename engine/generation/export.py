"""Export: COCO and LVIS-style JSON built from the shards, the images as files, a preview sheet.

Boxes in shards are xyxy pixels; COCO wants [x, y, width, height]. Category ids follow the run's
category order (base, then novel), starting at 1 as COCO does.
"""
from __future__ import annotations

import io
import json
from typing import Optional

import fsspec
from PIL import Image

from engine.data.shards import ShardError, ShardStore, iter_samples
from engine.data.sheet import BASE_COLOUR, NOVEL_COLOUR, Tile, contact_sheet
from engine.runtime.storage import write_atomic

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0)]


def lvis_frequency(image_count: int) -> str:
    """LVIS's own split: rare <= 10 training images, common <= 100, frequent above."""
    return "r" if image_count <= 10 else ("c" if image_count <= 100 else "f")


def export(output: str, dest: Optional[str] = None, write_images: bool = True,
           preview_images: int = 16) -> dict:
    """Write coco.json, lvis.json, images/ and preview.png for the shards under `output`."""
    store = ShardStore(output)
    dest = (dest or output).rstrip("/")
    run = store.run_info()
    if run is None:
        raise ShardError(f"{output!r} holds no generated dataset (no run.json); run `instagen generate` "
                         f"with output.path={output} first")
    entries = store.finished()
    if store.damaged:
        shard, why = next(iter(store.damaged.items()))
        raise ShardError(f"{len(store.damaged)} shard(s) under {output!r} are damaged ({shard}: {why}); rerun "
                         f"`instagen generate` with the same config to redo them, then export")
    if not entries:
        raise ShardError(f"no finished shards under {output!r}; run `instagen generate` first")
    for entry in entries.values():  # before a byte is written: an export is of whole shards or none
        store.verify(entry)
    cat_id = {name: i + 1 for i, name in enumerate(run["categories"])}
    fs, root = fsspec.core.url_to_fs(dest)
    if write_images:
        fs.makedirs(f"{root}/images", exist_ok=True)
    images, annotations, previews = [], [], []
    for sample in iter_samples([store.shard_url(i) for i in sorted(entries)]):
        meta = sample["json"]
        image_id = int(meta["id"])
        file_name = f"images/{sample['__key__']}.jpg"
        if write_images:
            buf = io.BytesIO()
            sample["jpg"].save(buf, format="JPEG", quality=95)
            with fs.open(f"{root}/{file_name}", "wb") as f:
                f.write(buf.getvalue())
        images.append({"id": image_id, "file_name": file_name, "width": meta["width"],
                       "height": meta["height"], "prompt": meta["prompt"], "seed": meta["seed_used"]})
        for box, label, score, who in zip(meta["boxes"], meta["labels"], meta["scores"], meta["labellers"]):
            if label not in cat_id:
                raise ShardError(f"sample {sample['__key__']} has a box of category {label!r}, which this "
                                 f"run does not know; the shard does not belong to {output!r}")
            x0, y0, x1, y1 = box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[label],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                "iscrowd": 0, "score": score, "labeller": who})
        if len(previews) < preview_images:
            previews.append((sample["jpg"], meta))
    novel = set(run.get("novel", []))
    categories = [{"id": i, "name": n, "split": "novel" if n in novel else "base"} for n, i in cat_id.items()]
    coco = {"info": {"description": f"InstaGen synthetic dataset {run.get('name', '')}"},
            "images": images, "annotations": annotations, "categories": categories}
    write_atomic(fs, f"{root}/coco.json", json.dumps(coco).encode())
    write_atomic(fs, f"{root}/lvis.json", json.dumps(_to_lvis(coco)).encode())
    write_atomic(fs, f"{root}/preview.png", contact_sheet([preview_tile(img, meta, novel) for img, meta in previews]))
    return {"images": len(images), "annotations": len(annotations), "coco": f"{dest}/coco.json",
            "lvis": f"{dest}/lvis.json", "preview": f"{dest}/preview.png"}


def _to_lvis(coco: dict) -> dict:
    per_cat_images: dict[int, set] = {}
    per_cat_boxes: dict[int, int] = {}
    for a in coco["annotations"]:
        per_cat_images.setdefault(a["category_id"], set()).add(a["image_id"])
        per_cat_boxes[a["category_id"]] = per_cat_boxes.get(a["category_id"], 0) + 1
    cats = [{**c, "synset": c["name"].replace(" ", "_"), "image_count": len(per_cat_images.get(c["id"], ())),
             "instance_count": per_cat_boxes.get(c["id"], 0),
             "frequency": lvis_frequency(len(per_cat_images.get(c["id"], ())))} for c in coco["categories"]]
    # Generated images are labelled only for their prompt's categories: LVIS's federated protocol
    # expresses exactly that with not_exhaustive / neg category lists, left empty here.
    images = [{**im, "neg_category_ids": [], "not_exhaustive_category_ids": []} for im in coco["images"]]
    anns = [{k: v for k, v in a.items() if k != "iscrowd"} for a in coco["annotations"]]
    return {"info": coco["info"], "images": images, "annotations": anns, "categories": cats}


def preview_tile(image: Image.Image, meta: dict, novel: set) -> Tile:
    """A generated image with its boxes and scores (base green, novel orange, as in the paper's
    figures), its prompt and box count beneath."""
    boxes = [(box, f"{label} {score:.2f}", NOVEL_COLOUR if label in novel else BASE_COLOUR)
             for box, label, score in zip(meta["boxes"], meta["labels"], meta["scores"])]
    return Tile(image, boxes, [meta["prompt"][:40], f"{len(meta['boxes'])} boxes"])
