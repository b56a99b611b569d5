"""Export: COCO and LVIS-style JSON built from the shards, the images as files, a preview sheet.

Boxes in shards are xyxy pixels; COCO wants [x, y, width, height]. Category ids follow the run's
category order (base, then novel, then prompts.extra's), starting at 1 as COCO does. Extra
categories (category diversity) are kept, left out, or relabelled to the category each stands for
(`extra`: keep | drop | map), as DiverGen maps its 1,453 training categories to LVIS's 1,203.

Export is a Ray Data job so that no process holds the dataset: one task per shard checks the
shard against its manifest's checksum (without images, only its headers and records, which is all
it reads), copies its JPEGs byte for byte (no decode, no second lossy compression) and writes the
shard's image and annotation records as small JSON parts; the driver then copies the parts, in
shard order, into coco.json and lvis.json, never holding more than one. Annotation ids are fixed
per shard from the manifest's box counts, so the parts are independent and the result is the same
whatever order the tasks finish in. Everything is staged in a hidden folder under the destination
and moved into place only when every shard is whole: an export is of whole shards or none.
"""
from __future__ import annotations

import io
import json
import uuid
from itertools import accumulate
from typing import Optional

import fsspec
from PIL import Image

from engine.config import RayConfig
from engine.data.masks import decode as decode_mask
from engine.data.shards import ShardError, ShardStore, finished_shards, samples_in_tar, usable
from engine.data.sheet import BASE_COLOUR, NOVEL_COLOUR, REFUSED_COLOUR, Tile, contact_sheet
from engine.runtime.cluster import connect, quiet_data_context, raise_as_one_line
from engine.runtime.storage import replace_folder, url_of

STAGING = ".export-"  # prefix of the hidden folder an export is staged in
IMAGE_LABELS = "image_labels.jsonl"  # one line per image: its file and prompted categories
EXTRA_RULES = ("keep", "drop", "map")


def export_names(run: dict, extra: str) -> dict[str, Optional[str]]:
    """Each category of the run -> its name in the export, or None where it is left out."""
    if extra not in EXTRA_RULES:
        raise ShardError(f"export --extra {extra!r}: choose keep, drop or map")
    targets = {} if extra == "keep" else run.get("extra", {})  # extra category -> its target or ""
    return {c: ((targets[c] or None) if extra == "map" else None) if c in targets else c for c in run["categories"]}


def lvis_frequency(image_count: int) -> str:
    """LVIS's own split: rare <= 10 training images, common <= 100, frequent above."""
    return "r" if image_count <= 10 else ("c" if image_count <= 100 else "f")


def export(output: str, dest: Optional[str] = None, write_images: bool = True,
           preview_images: int = 16, ray: Optional[RayConfig] = None, extra: str = "keep") -> dict:
    """Write coco.json, lvis.json, image_labels.jsonl, images/ and preview.png for the shards under
    `output`; `extra` says what becomes of prompts.extra's categories (EXTRA_RULES)."""
    import ray as ray_lib

    store, entries = finished_shards(output)  # a whole output, or one line saying what is wrong
    run = store.run_info()
    dest = (dest or output).rstrip("/")
    names = export_names(run, extra)
    categories = list(dict.fromkeys(n for n in names.values() if n))
    novel, extras = set(run.get("novel", [])), set(run.get("extra", {}))
    order = sorted(entries)
    first_ann = [0, *accumulate(entries[i]["boxes"] for i in order)]
    fs, root = fsspec.core.url_to_fs(dest)
    for stale in fs.glob(f"{root}/{STAGING}*"):  # left by an export that was killed
        fs.rm(stale, recursive=True)
    staging = f"{root}/{STAGING}{uuid.uuid4().hex}"
    for folder in ("parts", "images") if write_images else ("parts",):
        fs.makedirs(f"{staging}/{folder}", exist_ok=True)
    try:
        connect(ray or RayConfig())
        quiet_data_context()
        tasks = ray_lib.data.from_items(
            [{"entry": json.dumps(entries[i]), "first_ann": first_ann[k]} for k, i in enumerate(order)],
            override_num_blocks=len(order))
        stats = tasks.map(export_shard, num_cpus=0.5, fn_kwargs={
            "output": output, "staging": url_of(fs, staging), "names": names, "write_images": write_images})
        images = annotations = 0
        per_cat_images, per_cat_boxes = [0] * len(categories), [0] * len(categories)
        for row in stats.iter_rows():
            images += row["images"]
            annotations += row["annotations"]
            per_cat_images = [a + b for a, b in zip(per_cat_images, json.loads(row["per_cat_images"]))]
            per_cat_boxes = [a + b for a, b in zip(per_cat_boxes, json.loads(row["per_cat_boxes"]))]
        cats = [{"id": k + 1, "name": n, "split": "novel" if n in novel else "extra" if n in extras else "base"}
                for k, n in enumerate(categories)]
        info = {"description": f"InstaGen synthetic dataset {run.get('name', '')}"}
        lvis_cats = [{**c, "synset": c["name"].replace(" ", "_"), "image_count": per_cat_images[k],
                      "instance_count": per_cat_boxes[k], "frequency": lvis_frequency(per_cat_images[k])}
                     for k, c in enumerate(cats)]
        for name, categories_json in (("coco", cats), ("lvis", lvis_cats)):
            with fs.open(f"{staging}/{name}.json", "wb") as f:  # the staging folder is the temporary
                join_parts(f, fs, [f"{staging}/parts/{i:06d}.{name}" for i in order], info, categories_json)
        with fs.open(f"{staging}/{IMAGE_LABELS}", "wb") as f:
            for i in order:
                f.write(fs.cat_file(f"{staging}/parts/{i:06d}.labels"))
        fs.pipe_file(f"{staging}/preview.png", contact_sheet(preview_tiles(store, entries, preview_images, novel)))
        # Every shard was whole: move the export into place.
        if write_images:
            replace_folder(fs, f"{staging}/images", f"{root}/images")
        for name in ("coco.json", "lvis.json", IMAGE_LABELS, "preview.png"):
            fs.mv(f"{staging}/{name}", f"{root}/{name}")
    except Exception as e:
        raise_as_one_line(e)
    finally:
        fs.rm(staging, recursive=True)
    return {"images": images, "annotations": annotations, "coco": f"{dest}/coco.json",
            "lvis": f"{dest}/lvis.json", "image_labels": f"{dest}/{IMAGE_LABELS}", "preview": f"{dest}/preview.png"}


def export_shard(row: dict, output: str, staging: str, names: dict[str, Optional[str]], write_images: bool) -> dict:
    """A Ray task: one shard's records into `staging`/parts/<index>.<coco|lvis>-<images|annotations>
    and, if asked, its JPEGs into `staging`/images/, after checking the shard against its manifest
    entry. `names`: export_names'."""
    entry = json.loads(row["entry"])
    store = ShardStore(output)
    # Raises if it differs from its manifest entry; without images, only the records are read and checked.
    data = store.read_shard(entry, records_only=not write_images)
    categories = list(dict.fromkeys(n for n in names.values() if n))
    ids = {name: k + 1 for k, name in enumerate(categories)}
    cat_id = {c: ids[n] for c, n in names.items() if n}  # the run's names -> exported ids
    fs, root = fsspec.core.url_to_fs(staging)
    images, annotations, unboxed, image_labels = [], [], [], []
    per_cat_images, per_cat_boxes = [0] * len(categories), [0] * len(categories)
    for sample in samples_in_tar(data):
        key, meta = sample["__key__"], json.loads(bytes(sample["json"]))
        if not usable(meta):  # refused by the quality filter: in the preview only
            continue
        file_name = f"images/{key}.jpg"
        if write_images:
            with fs.open(f"{root}/{file_name}", "wb") as f:  # inside the staging folder: no temporary needed
                f.write(sample["jpg"])
        # Image-level labels: the categories the prompt asked for, whether or not a box was found,
        # for detectors trained from image labels only (ImaginaryNet's weakly supervised setting).
        prompted = {cat_id[c] for c in meta.get("categories", ()) if c in cat_id}
        images.append({"id": int(meta["id"]), "file_name": file_name, "width": meta["width"],
                       "height": meta["height"], "prompt": meta["prompt"], "seed": meta["seed_used"],
                       "image_category_ids": sorted(prompted)})
        image_labels.append({"file_name": file_name, "categories": sorted(categories[i - 1] for i in prompted)})
        masks = meta.get("masks") or [None] * len(meta["boxes"])  # the mask stage's, where it ran
        for j, (box, label, score, who) in enumerate(zip(meta["boxes"], meta["labels"], meta["scores"],
                                                         meta["labellers"])):
            if label not in names:
                raise ShardError(f"sample {key} has a box of category {label!r}, which this run does not "
                                 f"know; the shard does not belong to {output!r}")
            if label not in cat_id:  # an extra category the export leaves out
                continue
            x0, y0, x1, y1 = box
            annotation = {"id": row["first_ann"] + len(annotations) + 1, "image_id": int(meta["id"]),
                          "category_id": cat_id[label], "bbox": [x0, y0, x1 - x0, y1 - y0],
                          "area": (x1 - x0) * (y1 - y0), "iscrowd": 0, "score": score, "labeller": who}
            if masks[j] is not None:
                # COCO's area is the mask's where there is one (its small/medium/large ranges).
                mask = decode_mask(masks[j], meta["height"], meta["width"], f"the mask of sample {key} box {j}")
                annotation.update(segmentation=masks[j], area=int(mask.sum()), mask_score=meta["mask_scores"][j])
            annotations.append(annotation)
            per_cat_boxes[cat_id[label] - 1] += 1
        boxed = {cat_id[label] for label in meta["labels"] if label in cat_id}
        for i in boxed:
            per_cat_images[i - 1] += 1
        unboxed.append(sorted(prompted - boxed))
    # LVIS's federated labels say per image which categories are known absent (neg) and which are
    # present but not all boxed (not exhaustive). A generated image was labelled for its prompt's
    # categories only: a prompted category without a box was drawn, most likely, and missed by the
    # labeller, so it is not exhaustive; nothing is known absent (an unprompted object may appear
    # in the background), so neg stays empty. LVIS has no iscrowd.
    lvis_images = [{**im, "neg_category_ids": [], "not_exhaustive_category_ids": missed}
                   for im, missed in zip(images, unboxed)]
    lvis_annotations = [{k: v for k, v in a.items() if k != "iscrowd"} for a in annotations]
    for name, records in (("coco-images", images), ("coco-annotations", annotations),
                          ("lvis-images", lvis_images), ("lvis-annotations", lvis_annotations)):
        fs.pipe_file(f"{root}/parts/{entry['index']:06d}.{name}", ", ".join(map(json.dumps, records)).encode())
    fs.pipe_file(f"{root}/parts/{entry['index']:06d}.labels", "".join(json.dumps(r) + "\n" for r in image_labels).encode())
    return {"images": len(images), "annotations": len(annotations),
            "per_cat_images": json.dumps(per_cat_images), "per_cat_boxes": json.dumps(per_cat_boxes)}


def join_parts(f, fs, parts: list[str], info: dict, categories: list[dict]) -> None:
    """A dataset JSON from its shards' parts, in order. A part holds its records serialised and
    comma-separated, so the parts are copied, not parsed: one in memory at a time."""
    f.write(b'{"info": ' + json.dumps(info).encode())
    for kind in ("images", "annotations"):
        f.write(f', "{kind}": ['.encode())
        first = True
        for part in parts:
            records = fs.cat_file(f"{part}-{kind}")
            if records:
                f.write(records if first else b", " + records)
                first = False
        f.write(b"]")
    f.write(b', "categories": ' + json.dumps(categories).encode() + b"}")


def preview_tiles(store: ShardStore, entries: dict[int, dict], n: int, novel: set) -> list[Tile]:
    """The first `n` samples' tiles, read from the first shards only (their tasks checked them)."""
    tiles = []
    for index in sorted(entries):
        for sample in samples_in_tar(store.read_shard(entries[index], check=False)):
            if len(tiles) == n:
                return tiles
            image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
            tiles.append(preview_tile(image, json.loads(bytes(sample["json"])), novel))
    return tiles


def preview_tile(image: Image.Image, meta: dict, novel: set) -> Tile:
    """A generated image with its boxes and scores (base green, novel orange, as in the paper's
    figures), its prompt and box count beneath. What was refused is drawn in its own colour: boxes
    (by layout verification or the CLIP filter) and, outlined whole, an image the filter refused."""
    boxes = [(box, f"{label} {score:.2f}", NOVEL_COLOUR if label in novel else BASE_COLOUR)
             for box, label, score in zip(meta["boxes"], meta["labels"], meta["scores"])]
    refused = meta.get("refused", [])
    boxes += [(r["bbox"], f"{r['category']} refused" + (f" clip {r['clip']:.2f}" if "clip" in r else ""),
               REFUSED_COLOUR) for r in refused]
    lines = [meta["prompt"][:40], f"{len(meta['boxes'])} boxes" + (f", {len(refused)} refused" if refused else "")]
    if not usable(meta):
        why = meta["refused_image"]
        boxes.append(([0, 0, image.width, image.height], "refused image", REFUSED_COLOUR))
        lines.append(f"refused: clip {why['clip']:.2f} ({why['category'][:20]})")
    return Tile(image, boxes, lines)
