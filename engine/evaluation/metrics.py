"""Detector evaluation: box AP on COCO-format (COCO, Objects365) and LVIS ground truth.

    metrics = evaluate_coco("instances_val2017.json", "detections.json",
                            base=["person", "car"], novel=["dog"])
    write_report(metrics, "outputs/eval")

Both evaluators wrap the reference implementations (pycocotools, lvis-api) so the numbers are
the ones papers report; this module only adds what those libraries lack:

* validation with errors that say what is wrong and how to fix it, instead of the libraries'
  bare asserts and KeyErrors deep inside evaluation;
* empty detections, which both libraries crash on (they index ``results[0]``); a detector that
  finds nothing scores 0 on every category that has ground truth;
* quiet runs: pycocotools prints progress to stdout, so it is captured and numbers returned;
* the open-vocabulary split metric (AP50 on base and on novel categories).

Conventions of the returned dicts:

* Values are fractions in [0, 1] (papers print them x100).
* A metric with no ground truth to score against (pycocotools and lvis-api report -1, e.g. APr
  when no rare category has a box, or AP50 of a category absent from this split) is ``None``
  everywhere: JSON ``null``, "n/a" in tables. ``None`` (unlike -1 or NaN) cannot be silently
  averaged into another number.
* ``per_category_AP50`` maps category *name* to AP50 (or ``None``).

Detection caps: pycocotools keeps the 100 highest-scoring detections per image *and category*
(``maxDets``); lvis-api keeps the 300 highest-scoring per image over all categories
(``max_dets_per_image`` below), so a detector that emits more loses its low-scoring boxes.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tempfile
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from engine.data.sheet import Tile, contact_sheet
from engine.errors import UserError
from engine.runtime.storage import read_json, write_file

PathLike = Union[str, "os.PathLike[str]"]
Detection = dict[str, Any]

GT_FIELDS = ("images", "annotations", "categories")
DETECTION_KEYS = ("image_id", "category_id", "bbox", "score")
LVIS_IMAGE_FIELDS = ("not_exhaustive_category_ids", "neg_category_ids")
LVIS_FREQUENCIES = ("r", "c", "f")


class EvaluationError(UserError, ValueError):
    """Ground truth or detections are unusable; the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------
# Public API: evaluation
# --------------------------------------------------------------------------------------------

def evaluate_coco(gt: Union[PathLike, dict], detections: Union[PathLike, list[Detection]],
                  base: Optional[list[str]] = None,
                  novel: Optional[list[str]] = None) -> dict[str, Any]:
    """Box AP of ``detections`` against COCO-format ground truth (COCO, Objects365).

    ``gt`` is a COCO instances JSON path or the loaded dict; ``detections`` a COCO results JSON
    path or list of ``{image_id, category_id, bbox: [x, y, w, h], score}``. ``base`` / ``novel``
    are category names; for each given split the result has ``AP50_base`` / ``AP50_novel``:
    AP50 over that split's categories only, from the same detections (novel AP50 is the
    open-vocabulary COCO metric).

    Returns AP, AP50, AP75, APs, APm, APl, the split AP50s, ``per_category_AP50`` (by name),
    ``num_images`` and ``num_detections``.
    """
    dataset = load_ground_truth(gt, lvis=False)
    dets = _prepare_detections(detections, dataset)
    names = {c["id"]: c["name"] for c in dataset["categories"]}
    splits = resolve_splits(dataset, base=base, novel=novel)

    # pycocotools prints progress for every step; only the numbers are wanted. (redirect_stdout
    # swaps sys.stdout process-wide, so don't evaluate from two threads at once.)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()  # built from the validated dict: COCO(path) would re-read the file
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_dt = _coco_results(coco_gt, dets)
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()

    params = coco_eval.params
    stats = coco_eval.stats  # the standard 12 COCO numbers; 0..5 are the APs
    # precision: [iou threshold, recall threshold, category, area range, maxDets]. AP50 per
    # category is the same slice summarize() averages for stats[1]: IoU 0.5, all areas, 100 dets.
    ap50 = coco_eval.eval["precision"][_index_of(params.iouThrs, 0.5), :, :,
                                       params.areaRngLbl.index("all"), len(params.maxDets) - 1]
    column = {cat_id: k for k, cat_id in enumerate(params.catIds)}

    metrics: dict[str, Any] = {
        "AP": _metric(stats[0]), "AP50": _metric(stats[1]), "AP75": _metric(stats[2]),
        "APs": _metric(stats[3]), "APm": _metric(stats[4]), "APl": _metric(stats[5]),
    }
    # Categories are evaluated independently (useCats=1: a detection only ever matches boxes
    # of its own category), so averaging the split's columns equals re-running COCOeval with
    # params.catIds restricted to the split, without evaluating twice.
    for split, cat_ids in splits.items():
        metrics[f"AP50_{split}"] = _mean_valid(ap50[:, [column[c] for c in cat_ids]])
    metrics["per_category_AP50"] = {names[c]: _mean_valid(ap50[:, k]) for c, k in column.items()}
    metrics["num_images"] = len(dataset["images"])
    metrics["num_detections"] = len(dets)
    return metrics


def evaluate_lvis(gt: Union[PathLike, dict], detections: Union[PathLike, list[Detection]],
                  max_dets_per_image: int = 300) -> dict[str, Any]:
    """Box AP of ``detections`` against LVIS ground truth, with lvis-api's federated rules.

    LVIS ground truth is COCO-format plus ``not_exhaustive_category_ids`` and
    ``neg_category_ids`` on every image and ``frequency`` ("r", "c" or "f") on every category.
    Federated rules: a detection of a category neither annotated nor listed as negative on its
    image is ignored, and so is an unmatched detection of a not-exhaustive category. Only the
    ``max_dets_per_image`` highest-scoring detections of each image count (300 is the official
    setting). APr is the open-vocabulary LVIS metric (rare categories are the novel ones).

    Returns AP, AP50, AP75, APs, APm, APl, APr, APc, APf, ``per_category_AP50`` (by name),
    ``num_images`` and ``num_detections``.
    """
    dataset = load_ground_truth(gt, lvis=True)
    dets = _prepare_detections(detections, dataset)
    names = {c["id"]: c["name"] for c in dataset["categories"]}

    # Imported here, not at the top: importing lvis calls logging.basicConfig() on the root
    # logger, which should not happen to every program that imports this module.
    from lvis import LVIS, LVISEval, LVISResults

    class NoResults(LVISResults):
        """No detections: LVISResults reads results[0] and fails on an empty list. The ground
        truth's images and categories without a box, through LVIS's own constructor, score every
        category that has ground truth 0, as any miss does."""

        def __init__(self, path: str):
            LVIS.__init__(self, path)

    with _quiet_lvis_logging(), _numpy_float_alias(), tempfile.TemporaryDirectory() as tmp:
        # lvis-api builds its objects from a file only (LVIS(path)): the validated dict goes
        # through one, so the evaluator reads exactly what was checked.
        lvis_gt = LVIS(_dump_json(dataset, os.path.join(tmp, "gt.json")))
        if dets:
            lvis_dt = LVISResults(lvis_gt, dets, max_dets=max_dets_per_image)
        else:
            lvis_dt = NoResults(_dump_json({**dataset, "annotations": []}, os.path.join(tmp, "none.json")))
        lvis_eval = LVISEval(lvis_gt, lvis_dt, iou_type="bbox")
        lvis_eval.run()

    results = lvis_eval.get_results()
    metrics: dict[str, Any] = {key: _metric(results[key]) for key in
                               ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")}
    params = lvis_eval.params
    # precision: [iou threshold, recall threshold, category, area range] (no maxDets axis).
    ap50 = lvis_eval.eval["precision"][_index_of(params.iou_thrs, 0.5), :, :,
                                       params.area_rng_lbl.index("all")]
    metrics["per_category_AP50"] = {names[c]: _mean_valid(ap50[:, k])
                                    for k, c in enumerate(params.cat_ids)}
    metrics["num_images"] = len(dataset["images"])
    metrics["num_detections"] = len(dets)
    return metrics


# --------------------------------------------------------------------------------------------
# Public API: files
# --------------------------------------------------------------------------------------------

def save_detections(path: PathLike, detections: list[Detection]) -> str:
    """Write detections as a COCO results JSON (list of {image_id, category_id, bbox, score}).

    Entries are validated first and written atomically, so a crash never leaves a half-written
    file that a later evaluation would misread. Returns the path.
    """
    clean = _validate_detection_entries(detections, source="detections to save")
    write_file(path, json.dumps(clean, allow_nan=False).encode())
    return os.fspath(path)


def load_detections(path: PathLike) -> list[Detection]:
    """Read a COCO results JSON written by save_detections (or any detector that emits one)."""
    data = read_json(path, "detections file", EvaluationError)
    return _validate_detection_entries(data, source=f"detections file {os.fspath(path)}")


def format_table(metrics: Mapping[str, Any]) -> str:
    """The metrics as Markdown: a table of the scalar metrics, then one of AP50 per category."""
    lines = ["| metric | value |", "| --- | --- |"]
    for key, value in metrics.items():
        if not isinstance(value, Mapping):
            lines.append(f"| {_md_cell(key)} | {_format_value(value)} |")
    per_category = metrics.get("per_category_AP50")
    if per_category:
        lines += ["", "| category | AP50 |", "| --- | --- |"]
        lines += [f"| {_md_cell(name)} | {_format_value(value)} |"
                  for name, value in per_category.items()]
    return "\n".join(lines) + "\n"


def write_report(metrics: Mapping[str, Any], out_dir: PathLike,
                 name: str = "report") -> tuple[str, str]:
    """Write ``out_dir/name.json`` (the metrics) and ``out_dir/name.md`` (format_table).

    Both are written atomically. Returns (json path, markdown path).
    """
    json_path = os.path.join(os.fspath(out_dir), f"{name}.json")
    md_path = os.path.join(os.fspath(out_dir), f"{name}.md")
    # allow_nan=False: None, never NaN, marks a missing metric, so the JSON stays standard.
    write_file(json_path, (json.dumps(metrics, indent=2, allow_nan=False) + "\n").encode())
    write_file(md_path, f"# {name}\n\n{format_table(metrics)}".encode())
    return json_path, md_path


def draw_predictions(images: Sequence[tuple[Image.Image, Sequence[Mapping[str, Any]]]],
                     categories: Mapping[int, str], path: PathLike,
                     score_threshold: float = 0.5, columns: int = 4,
                     max_side: int = 512) -> str:
    """Save a PNG contact sheet: each image with its boxes scoring >= ``score_threshold``.

    ``images`` pairs each PIL image with its detections (COCO results entries; bbox in that
    image's pixels). Images larger than ``max_side`` are shrunk (never enlarged) and laid out
    ``columns`` per row in cells the size of the largest one. Boxes are labelled with
    ``categories[category_id]`` and the score. Returns the path.
    """
    if not images:
        raise EvaluationError("draw_predictions got no images; pass at least one "
                              "(image, detections) pair")
    tiles = []
    for index, (image, dets) in enumerate(images):
        clean = _validate_detection_entries(list(dets), source=f"predictions of image {index}")
        boxes = [((x, y, x + w, y + h), f"{categories.get(d['category_id'], d['category_id'])} {d['score']:.2f}",
                  _color(d["category_id"]))
                 for d in clean if d["score"] >= score_threshold for x, y, w, h in [d["bbox"]]]
        tiles.append(Tile(image, boxes))
    png = contact_sheet(tiles, columns, side=max_side, enlarge=False, background=(40, 40, 40))
    write_file(path, png)
    return os.fspath(path)


# Distinct, bright box colours (dark label text stays readable on all of them).
_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (67, 99, 216), (245, 130, 49),
            (145, 30, 180), (66, 212, 244), (240, 50, 230), (191, 239, 69), (250, 190, 212)]


def _color(category_id: Any) -> tuple[int, int, int]:
    # crc32, not hash(): str hashes change between runs, and a category should keep its colour.
    key = category_id if isinstance(category_id, int) else zlib.crc32(str(category_id).encode())
    return _PALETTE[key % len(_PALETTE)]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def load_ground_truth(gt: Union[PathLike, dict], lvis: bool = False) -> dict[str, Any]:
    """Load and validate ground truth; return a copy safe to hand to the evaluators.

    The copy matters: both libraries write flags ("ignore", "_ignore") into the annotation
    dicts they are given, and a caller's dict must come back as it went in.
    """
    kind = "LVIS" if lvis else "COCO"
    source = f"ground truth {os.fspath(gt)}" if isinstance(gt, (str, os.PathLike)) \
        else "ground truth"
    data = read_json(gt, "ground truth file", EvaluationError) if isinstance(gt, (str, os.PathLike)) else gt
    if not isinstance(data, dict):
        raise EvaluationError(f"{source} must be a {kind} JSON object with "
                              f"{', '.join(GT_FIELDS)}; got a {type(data).__name__}"
                              + (" (a list looks like detections)" if isinstance(data, list)
                                 else ""))
    missing = [f for f in GT_FIELDS if not isinstance(data.get(f), list)]
    if missing:
        raise EvaluationError(
            f"{source} lacks {', '.join(missing)} (each must be a list); a {kind} instances "
            f"file has images, annotations and categories. Is this a detections file?")

    image_ids = set()
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image:
            raise EvaluationError(f"{source}: images[{i}] has no 'id'")
        if image["id"] in image_ids:
            # The evaluators index images by id: a second image of the same id would take the
            # first one's boxes, and every number would be wrong without a word.
            raise EvaluationError(f"{source}: images[{i}] repeats image id {image['id']!r}; image ids "
                                  f"must be unique")
        if lvis:
            for field in LVIS_IMAGE_FIELDS:
                if not isinstance(image.get(field), list):
                    raise EvaluationError(
                        f"{source}: image {image['id']!r} lacks the list {field!r} that LVIS "
                        f"evaluation needs; use --format coco for COCO-format ground truth, "
                        f"or add {', '.join(LVIS_IMAGE_FIELDS)} to every image")
        image_ids.add(image["id"])

    names: dict[str, Any] = {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise EvaluationError(f"{source}: categories[{i}] needs an 'id' and a 'name'")
        if cat["id"] in names.values():
            raise EvaluationError(f"{source}: categories[{i}] repeats category id {cat['id']!r}; category "
                                  f"ids must be unique")
        if cat["name"] in names:
            raise EvaluationError(f"{source}: category name {cat['name']!r} is used by ids "
                                  f"{names[cat['name']]!r} and {cat['id']!r}; names must be unique")
        if lvis and cat.get("frequency") not in LVIS_FREQUENCIES:
            raise EvaluationError(
                f"{source}: category {cat['name']!r} has frequency {cat.get('frequency')!r}; "
                f"LVIS evaluation needs 'r', 'c' or 'f' on every category")
        names[cat["name"]] = cat["id"]
    cat_ids = set(names.values())

    annotations = []
    for i, ann in enumerate(data["annotations"]):
        where = f"{source}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise EvaluationError(f"{where} is a {type(ann).__name__}, not an object")
        for key in ("image_id", "category_id", "bbox"):
            if key not in ann:
                raise EvaluationError(f"{where} has no {key!r}")
        if ann["image_id"] not in image_ids:
            raise EvaluationError(f"{where} names image {ann['image_id']!r}, which is not in "
                                  f"'images'")
        if ann["category_id"] not in cat_ids:
            raise EvaluationError(f"{where} names category {ann['category_id']!r}, which is "
                                  f"not in 'categories'")
        x, y, w, h = _check_bbox(ann["bbox"], where)
        area = ann.get("area", w * h)
        if not (_is_number(area) and math.isfinite(area) and area >= 0):
            # COCO sorts boxes into small / medium / large by area; a NaN area falls in all three.
            raise EvaluationError(f"{where} has area {_short(area)}; it must be a finite number >= 0 "
                                  f"(or left out: the box's w * h)")
        annotations.append({
            **ann,
            # Renumbered 1..N: pycocotools marks "unmatched" with id 0, so a ground-truth id of
            # 0 would silently turn its true positive into a false positive (and duplicate ids
            # would count one box twice). Nothing outside the evaluator reads these ids.
            "id": i + 1,
            "bbox": [x, y, w, h],
            # Defaults for files that omit them (our synthetic datasets may): the box area, as
            # COCO's own converters write it, and not-a-crowd.
            "area": area,
            "iscrowd": ann.get("iscrowd", 0),
        })
    return {**data, "annotations": annotations}


def _prepare_detections(detections: Union[PathLike, list[Detection]],
                        dataset: Mapping[str, Any]) -> list[Detection]:
    """Load and validate detections, then check every id they use exists in the ground truth."""
    if isinstance(detections, (str, os.PathLike)):
        dets = load_detections(detections)
    else:
        dets = _validate_detection_entries(detections, source="detections")
    image_ids = {image["id"] for image in dataset["images"]}
    cat_ids = {cat["id"] for cat in dataset["categories"]}
    unknown_images = _sorted({d["image_id"] for d in dets} - image_ids)
    if unknown_images:
        raise EvaluationError(
            f"detections name {len(unknown_images)} image id(s) not in the ground truth: "
            f"{_few(unknown_images)}; evaluate against the ground truth the detections were "
            f"made for, or drop those detections")
    unknown_cats = _sorted({d["category_id"] for d in dets} - cat_ids)
    if unknown_cats:
        raise EvaluationError(
            f"detections name {len(unknown_cats)} category id(s) not in the ground truth: "
            f"{_few(unknown_cats)}; known ids: {_few(_sorted(cat_ids), 20)}. Map the "
            f"detector's class indices to the ground truth's category ids")
    return dets


def _validate_detection_entries(detections: Any, source: str) -> list[Detection]:
    """Check the COCO results structure; return clean copies holding only the four keys.

    Copies, because pycocotools writes area/id/segmentation into the dicts it is given; only
    the four keys, so a stray "segmentation" can't switch pycocotools to mask handling.
    """
    if not isinstance(detections, list):
        raise EvaluationError(f"{source} must be a list of {{image_id, category_id, bbox, "
                              f"score}} objects; got a {type(detections).__name__}")
    clean = []
    for i, det in enumerate(detections):
        where = f"{source}: entry {i}"
        if not isinstance(det, Mapping):
            raise EvaluationError(f"{where} is a {type(det).__name__}, not an object")
        missing = [key for key in DETECTION_KEYS if key not in det]
        if missing:
            raise EvaluationError(f"{where} lacks {', '.join(missing)}; each detection needs "
                                  f"{', '.join(DETECTION_KEYS)}")
        for key in ("image_id", "category_id"):
            if not isinstance(_plain(det[key]), (int, str)) or isinstance(det[key], bool):
                raise EvaluationError(f"{where} has {key} {_short(det[key])}; ids are integers "
                                      f"(or strings) as in the ground truth")
        score = det["score"]
        if not _is_number(score) or not math.isfinite(score):
            raise EvaluationError(f"{where} has score {score!r}; it must be a finite number")
        clean.append({
            "image_id": _plain(det["image_id"]),
            "category_id": _plain(det["category_id"]),
            "bbox": list(_check_bbox(det["bbox"], where)),
            "score": float(score),
        })
    return clean


def _check_bbox(bbox: Any, where: str) -> tuple[float, float, float, float]:
    """A box must be [x, y, w, h]: four finite numbers with non-negative width and height."""
    if (not isinstance(bbox, (list, tuple, np.ndarray)) or len(bbox) != 4
            or not all(_is_number(v) and math.isfinite(v) for v in bbox)):
        raise EvaluationError(f"{where} has bbox {_short(bbox)}; it must be [x, y, w, h], "
                              f"four finite numbers")
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        raise EvaluationError(f"{where} has bbox {_short(bbox)} with negative width or height; "
                              f"boxes are [x, y, w, h], not [x1, y1, x2, y2]")
    return x, y, w, h


def resolve_splits(dataset: Mapping[str, Any], base: Optional[list[str]],
                   novel: Optional[list[str]]) -> dict[str, list[Any]]:
    """Category names of each given split -> ids; unknown or doubly-assigned names are errors."""
    by_name = {cat["name"]: cat["id"] for cat in dataset["categories"]}
    splits: dict[str, list[Any]] = {}
    for split, names in (("base", base), ("novel", novel)):
        if names is None:
            continue
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise EvaluationError(
                f"{split} categories {unknown} are not in the ground truth; known categories: "
                f"{_few(sorted(by_name), 30)}")
        splits[split] = [by_name[n] for n in names]
    if "base" in splits and "novel" in splits:
        both = sorted(set(base or []) & set(novel or []))
        if both:
            raise EvaluationError(f"categories {both} are in both base and novel; each category "
                                  f"belongs to one split")
    return splits


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _coco_results(coco_gt: COCO, dets: list[Detection]) -> COCO:
    """The detections as a pycocotools results object, including the empty case."""
    if dets:
        return coco_gt.loadRes(dets)
    # loadRes indexes anns[0] and crashes on an empty list. An empty results object lets
    # COCOeval score each category with ground truth as 0 (all missed), as for any other miss.
    results = COCO()
    results.dataset = {"images": list(coco_gt.dataset["images"]),
                       "categories": list(coco_gt.dataset["categories"]), "annotations": []}
    results.createIndex()
    return results


def _dump_json(data: Any, path: str) -> str:
    """`data` as JSON at `path` (NumPy scalars and arrays as plain values); returns the path."""
    def plain(value: Any) -> Any:
        if isinstance(value, (np.generic, np.ndarray)):
            return value.tolist()
        raise TypeError(f"{type(value).__name__} is not JSON data")
    with open(path, "w") as f:
        json.dump(data, f, default=plain)
    return path


@contextlib.contextmanager
def _numpy_float_alias() -> Iterator[None]:
    """lvis-api 0.5.3 calls ``np.float``, removed in NumPy 1.24: provide it only while it runs."""
    added = not hasattr(np, "float")
    if added:
        setattr(np, "float", float)
    try:
        yield
    finally:
        if added:
            delattr(np, "float")


@contextlib.contextmanager
def _quiet_lvis_logging() -> Iterator[None]:
    """lvis-api warns "Assuming user provided the results in correct format" (through the
    deprecated Logger.warn, a DeprecationWarning of its own) on every call with in-memory
    results, which these always are, and validated."""
    logger = logging.getLogger("lvis")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The 'warn' method is deprecated",
                                    DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _metric(value: float) -> Optional[float]:
    """pycocotools/lvis-api report -1 for "no ground truth to score"; that becomes None."""
    return None if value < 0 else float(value)


def _mean_valid(precision: np.ndarray) -> Optional[float]:
    """Mean over entries > -1, as the libraries' summarize() does; None when there are none."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else None


def _index_of(thresholds: np.ndarray, value: float) -> int:
    return int(np.flatnonzero(np.isclose(thresholds, value))[0])


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but True as a coordinate or score is a bug, not a number.
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    """NumPy scalars (common from model outputs) as Python ones, so ids hash and serialise."""
    return value.item() if isinstance(value, np.generic) else value


def _sorted(values: Any) -> list[Any]:
    """Sorted for stable messages; ids of mixed types (int and str) sort by their repr."""
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=repr)


def _few(values: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(v) for v in values[:limit])
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return f"[{shown}]{more}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _format_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|")
