"""Real detection datasets: COCO-format (COCO, Objects365) through pycocotools, LVIS through
lvis-api, from local paths or fsspec URLs (s3://, gs://, ...).

    ds = load_detection_dataset("instances_train2017.json", "/data/coco/train2017")
    base = split_records(ds, cfg.prompts.base)   # only base-category boxes and images
    print(ds.skipped.summary())

Whole-file problems (not JSON, a missing `images` / `annotations` / `categories` field, a
requested category the file does not have) are a `DatasetError` naming the file and the fix.
Problems of single items (a missing or corrupt image, a box outside the image or of no area, an
unknown category id, a duplicated image id) are counted in a `SkipReport` and the item skipped:
one bad picture among 100k must not stop a fine-tuning run.

Boxes come out as xyxy pixels (COCO stores xywh), clipped to the image.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import fsspec
from PIL import Image
from pycocotools.coco import COCO

from engine.errors import UserError
from engine.runtime.storage import read_bytes, read_json

FORMATS = ("coco", "lvis")
REQUIRED_FIELDS = ("images", "annotations", "categories")

# Skip reasons (SkipReport keys).
MISSING_IMAGE = "missing image"
CORRUPT_IMAGE = "corrupt image"
SIZE_MISMATCH = "image size differs from annotation"
BAD_BOX = "box outside image or of zero/negative area"
UNKNOWN_CATEGORY = "unknown category id"
UNKNOWN_IMAGE = "annotation of unknown image id"
DUPLICATE_IMAGE = "duplicated image id"
MALFORMED = "malformed entry"
CROWD = "crowd annotation"


class DatasetError(UserError, ValueError):
    """The annotation file as a whole is unusable; the message names the file and the fix."""


@dataclass
class ImageRecord:
    id: int
    file: str  # local path or fsspec URL
    width: int
    height: int
    boxes: list[list[float]]  # xyxy pixels
    labels: list[str]  # category name per box


@dataclass
class SkipReport:
    """Items skipped, by reason, with a few examples of each so the user can go and look."""
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def add(self, reason: str, example: str = "", n: int = 1) -> None:
        self.counts[reason] += n
        if example:
            shown = self.examples.setdefault(reason, [])
            if len(shown) < self.max_examples:
                shown.append(example)

    def merge(self, other: "SkipReport") -> "SkipReport":
        for reason, n in other.counts.items():
            self.counts[reason] += n
            for ex in other.examples.get(reason, []):
                shown = self.examples.setdefault(reason, [])
                if len(shown) < self.max_examples:
                    shown.append(ex)
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "SkipReport":
        return cls(Counter(data.get("counts", {})), {k: list(v) for k, v in data.get("examples", {}).items()})

    def summary(self) -> str:
        if not self.total:
            return "nothing skipped"
        parts = []
        for reason, n in sorted(self.counts.items(), key=lambda kv: -kv[1]):
            ex = self.examples.get(reason)
            parts.append(f"{n} {reason}" + (f" (e.g. {'; '.join(ex)})" if ex else ""))
        return f"skipped {self.total}: " + ", ".join(parts)


@dataclass
class DetectionDataset:
    records: list[ImageRecord]
    categories: list[str]
    skipped: SkipReport = field(default_factory=SkipReport)

    @property
    def num_boxes(self) -> int:
        return sum(len(r.boxes) for r in self.records)


# ---------------------------------------------------------------------------------------------
# Files


def _is_url(path: str) -> bool:
    return "://" in path


def resolve_file(image_root: str, file_name: str) -> str:
    if _is_url(file_name) or os.path.isabs(file_name):
        return file_name
    if _is_url(image_root):
        return image_root.rstrip("/") + "/" + file_name
    return os.path.join(os.path.expanduser(image_root), file_name)


def _exists(path: str) -> bool:
    if _is_url(path):
        fs, p = fsspec.core.url_to_fs(path)
        return fs.exists(p)
    return os.path.isfile(path)


def decode_image(data: bytes) -> Image.Image:
    """Fully decode (a truncated JPEG only fails when its pixels are read) into RGB."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def open_image(file: str) -> Image.Image:
    """An RGB PIL image from a local path or fsspec URL, fully decoded; a file that is gone or not
    an image is a DatasetError naming it."""
    try:
        return decode_image(read_bytes(file))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"image {file!r} cannot be read as an image ({e}); replace it, or remove it "
                           f"from the annotations") from None


def image_file(image_root: str, img: dict, fmt: str) -> Optional[str]:
    """Where the image of an `images` entry lies, under image_root; None when it names no file."""
    name = _file_name(img, fmt)
    return None if name is None else resolve_file(image_root, name)


def missing_files(files: list[str], threads: int = 8) -> list[str]:
    """Those of `files` (local paths or fsspec URLs) that are not there, looked up in threads."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return [f for f, there in zip(files, pool.map(_exists, files)) if not there]


def check_dataset(annotations: str, image_root: str, keys: tuple[str, str]) -> None:
    """The up-front check of a dataset a command reads, before Ray starts or anything is written:
    the annotation file is a file and the image root (when set) a folder. `keys` are the two
    settings, so that the message names what to change. Whether the file is COCO/LVIS is checked
    as it is read (load_detection_dataset, load_captions), also before Ray starts."""
    ann_key, root_key = keys
    kind = _kind(annotations, ann_key)
    if kind != "file":
        raise DatasetError(f"{ann_key} {annotations!r} {'is a folder' if kind else 'does not exist'}; set it to "
                           f"a COCO/LVIS JSON file")
    kind = _kind(image_root, root_key) if image_root else "directory"
    if kind != "directory":
        raise DatasetError(f"{root_key} {image_root!r} {'is a file' if kind else 'does not exist'}; set it to the "
                           f"folder that holds the images {ann_key} lists")


def _kind(path: str, key: str) -> Optional[str]:
    """"file", "directory", or None when nothing is there: a local path or fsspec URL."""
    try:
        fs, p = fsspec.core.url_to_fs(path)
        return fs.info(p)["type"]
    except FileNotFoundError:
        return None
    except (OSError, ImportError, ValueError) as e:  # no permission; an unknown protocol or its package missing
        raise DatasetError(f"{key} {path!r} cannot be reached ({e})") from None


# ---------------------------------------------------------------------------------------------
# Loading


def _load_json(path: str) -> dict:
    data = read_json(path, "annotation file", DatasetError,
                     "set the dataset's annotations path to a COCO/LVIS instances JSON")
    if not isinstance(data, dict):
        raise DatasetError(f"annotation file {path!r} holds a JSON {type(data).__name__}, not the COCO/LVIS "
                           f"object with images, annotations and categories")
    for name in REQUIRED_FIELDS:
        if name not in data:
            raise DatasetError(f"annotation file {path!r} has no {name!r} field; a COCO/LVIS instances file "
                               f"needs images, annotations and categories (a results or captions file "
                               f"will not do)")
        if not isinstance(data[name], list):
            raise DatasetError(f"annotation file {path!r}: field {name!r} must be a list, "
                               f"got {type(data[name]).__name__}")
    return data


def _file_name(img: dict, fmt: str) -> Optional[str]:
    if isinstance(img.get("file_name"), str):
        return img["file_name"]
    # LVIS v1 gives only coco_url (http://images.cocodataset.org/train2017/x.jpg): the image
    # lives at <image_root>/train2017/x.jpg, as in detectron2's LVIS loader.
    if fmt == "lvis" and isinstance(img.get("coco_url"), str):
        return "/".join(img["coco_url"].split("/")[-2:])
    return None


def _clean(data: dict, path: str, fmt: str, skipped: SkipReport) -> tuple[dict, set]:
    """Drop malformed and duplicated entries before the reference API indexes the file (both
    index by id and would silently keep only the last of two images with one id)."""
    cats = []
    for c in data["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise DatasetError(f"annotation file {path!r}: category {c!r} needs an integer 'id' and a "
                               f"string 'name'")
        cats.append(c)
    if not cats:
        raise DatasetError(f"annotation file {path!r} lists no categories")

    id_counts = Counter(img.get("id") for img in data["images"] if isinstance(img, dict))
    images = []
    for img in data["images"]:
        if not isinstance(img, dict) or not isinstance(img.get("id"), int) or _file_name(img, fmt) is None \
                or not isinstance(img.get("width"), (int, float)) or not isinstance(img.get("height"), (int, float)):
            skipped.add(MALFORMED, f"image {str(img)[:80]}")
            continue
        if id_counts[img["id"]] > 1:
            # Which annotations belong to which copy cannot be told: drop every copy.
            skipped.add(DUPLICATE_IMAGE, f"id {img['id']}")
            continue
        images.append(img)

    anns = []
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or not isinstance(a.get("image_id"), int) \
                or not isinstance(a.get("category_id"), int) or not isinstance(a.get("bbox"), list):
            skipped.add(MALFORMED, f"annotation {str(a)[:80]}")
            continue
        anns.append({**a, "id": a.get("id", f"_{i}")})
    duplicated = {i for i, n in id_counts.items() if n > 1}
    return {**data, "categories": cats, "images": images, "annotations": anns}, duplicated


def _index(data: dict, fmt: str):
    """(images by id, annotations by image id, categories by id) over the cleaned dict: pycocotools'
    own index for COCO; for LVIS the same three maps lvis-api builds (its LVIS() reads only a path)."""
    if fmt == "coco":
        api = COCO()
        api.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            api.createIndex()
        return api.imgs, api.imgToAnns, api.cats
    by_image = defaultdict(list)
    for a in data["annotations"]:
        by_image[a["image_id"]].append(a)
    return {im["id"]: im for im in data["images"]}, by_image, {c["id"]: c for c in data["categories"]}


def _box(bbox: list, width: float, height: float) -> Optional[list[float]]:
    """xywh -> xyxy clipped to the image; None when nothing of positive area is left."""
    if len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    if not (w > 0 and h > 0):
        return None
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    return [x0, y0, x1, y1]


def _check_image(file: str, width: int, height: int) -> Optional[str]:
    """None if the image decodes fully at the annotated size, else the skip reason."""
    try:
        data = read_bytes(file)
    except (FileNotFoundError, IsADirectoryError):
        return MISSING_IMAGE
    except OSError:
        return MISSING_IMAGE if not _exists(file) else CORRUPT_IMAGE
    try:
        img = decode_image(data)
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad files
        return CORRUPT_IMAGE
    if img.size != (width, height):
        return SIZE_MISMATCH
    return None


def load_detection_dataset(annotations: str, image_root: str, fmt: str = "coco",
                           categories: Optional[list[str]] = None, check_images: bool = True,
                           threads: int = 8) -> DetectionDataset:
    """Read a COCO- or LVIS-format instances file into ImageRecords.

    `categories`: keep only boxes of these names (all the file's categories if None); a name
    the file does not have is a DatasetError. `check_images`: decode every image once (in
    `threads` threads) so missing and corrupt files are counted here; without it they are only
    found (and skipped) when the training data pipeline decodes them.
    """
    if fmt not in FORMATS:
        raise DatasetError(f"dataset format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    skipped = SkipReport()
    data, duplicated = _clean(_load_json(annotations), annotations, fmt, skipped)
    imgs, img_anns, cats = _index(data, fmt)

    names = [c["name"] for c in sorted(cats.values(), key=lambda c: c["id"])]
    if categories is not None:
        missing = [c for c in categories if c not in set(names)]
        if missing:
            raise DatasetError(f"categories {missing} are not in {annotations!r}; its categories are "
                               f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
        keep = set(categories)
    else:
        keep = set(names)
    for a in data["annotations"]:
        if a["image_id"] not in imgs and a["image_id"] not in duplicated:
            skipped.add(UNKNOWN_IMAGE, f"annotation {a['id']} -> image {a['image_id']}")

    records = []
    for img_id, img in imgs.items():
        w, h = int(img["width"]), int(img["height"])
        boxes, labels = [], []
        for a in img_anns.get(img_id, []):
            cat = cats.get(a["category_id"])
            if cat is None:
                skipped.add(UNKNOWN_CATEGORY, f"annotation {a['id']} category {a['category_id']}")
                continue
            if a.get("iscrowd", 0):
                # A crowd box covers many objects of a kind, not one object; not a label.
                skipped.add(CROWD)
                continue
            box = _box(a["bbox"], w, h)
            if box is None:
                skipped.add(BAD_BOX, f"annotation {a['id']} bbox {a['bbox']} in {w}x{h}")
                continue
            if cat["name"] in keep:
                boxes.append(box)
                labels.append(cat["name"])
        records.append(ImageRecord(int(img_id), resolve_file(image_root, _file_name(img, fmt)), w, h, boxes, labels))

    if check_images and records:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            problems = list(pool.map(lambda r: _check_image(r.file, r.width, r.height), records))
        for r, problem in zip(records, problems):
            if problem:
                skipped.add(problem, r.file)
        records = [r for r, problem in zip(records, problems) if not problem]
    records.sort(key=lambda r: r.id)
    kept = [n for n in names if n in keep]
    return DetectionDataset(records, kept, skipped)


def split_records(dataset: DetectionDataset, base: list[str]) -> DetectionDataset:
    """Only base-category boxes, and only images holding at least one of them (the paper
    fine-tunes on base-category images, so novel categories are never named in a prompt)."""
    unknown = [c for c in base if c not in set(dataset.categories)]
    if unknown:
        raise DatasetError(f"base categories {unknown} are not among the dataset's categories "
                           f"({', '.join(dataset.categories[:20])}{' ...' if len(dataset.categories) > 20 else ''}); "
                           f"fix prompts.base or the dataset")
    keep = set(base)
    records = []
    for r in dataset.records:
        idx = [i for i, label in enumerate(r.labels) if label in keep]
        if idx:
            records.append(ImageRecord(r.id, r.file, r.width, r.height, [list(r.boxes[i]) for i in idx],
                                       [r.labels[i] for i in idx]))
    return DetectionDataset(records, [c for c in dataset.categories if c in keep],
                            SkipReport().merge(dataset.skipped))


@dataclass
class CaptionRecord:
    file: str  # local path or fsspec URL
    width: int
    height: int
    caption: str


def load_captions(path: str, image_root: str, check_images: bool = True,
                  threads: int = 8) -> tuple[list[CaptionRecord], SkipReport]:
    """Image-caption pairs from a COCO captions file (`images` + `annotations` holding
    `image_id` and `caption`); an image with several captions gives one pair per caption.
    Malformed entries, and (with `check_images`) missing or corrupt images, are skipped and
    counted."""
    try:
        data = json.loads(read_bytes(path))
    except FileNotFoundError:
        raise DatasetError(f"captions file {path!r} does not exist; set finetune.captions to a COCO "
                           f"captions JSON") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"captions file {path!r} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise DatasetError(f"captions file {path!r} must be a JSON object with lists 'images' and "
                           f"'annotations' (COCO captions format)")
    skipped = SkipReport()
    images = {}
    for img in data["images"]:
        try:
            images[img["id"]] = (resolve_file(image_root, img["file_name"]), int(img["width"]), int(img["height"]))
        except (KeyError, TypeError, ValueError):
            skipped.add(MALFORMED, str(img)[:80])
    records = []
    for a in data["annotations"]:
        img = images.get(a.get("image_id")) if isinstance(a, dict) else None
        caption = a.get("caption") if isinstance(a, dict) else None
        if img is None or not isinstance(caption, str) or not caption.strip():
            skipped.add(MALFORMED, str(a)[:80])
            continue
        records.append(CaptionRecord(img[0], img[1], img[2], caption.strip()))
    if check_images and records:
        files = sorted({r.file: (r.width, r.height) for r in records}.items())
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            problems = dict(zip([f for f, _ in files], pool.map(lambda fw: _check_image(fw[0], *fw[1]), files)))
        for f, problem in problems.items():
            if problem:
                skipped.add(problem, f)
        records = [r for r in records if not problems[r.file]]
    if not records:
        raise DatasetError(f"captions file {path!r} holds no usable image-caption pair; {skipped.summary()}")
    return records, skipped
