"""engine.evaluation.metrics and jobs/evaluate.py on tiny hand-built COCO and LVIS ground truth.

The hand-computed cases follow COCO's AP definition: detections sorted by score, cumulative
precision/recall, precision replaced by its maximum at any higher recall (the envelope), then
read at the 101 recall thresholds 0.00, 0.01, ..., 1.00 (the first detection reaching at least
that recall; 0 when no detection reaches it) and averaged.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import fsspec.implementations.local
from engine.evaluation.metrics import (EvaluationError, draw_predictions, evaluate_coco, evaluate_lvis, format_table, load_detections, save_detections, write_report)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]


def coco_gt(boxes: dict[tuple[int, int], list[list[float]]], num_images: int = 3) -> dict:
    """COCO GT with 100x100 images 1..num_images; boxes maps (image_id, category_id) to bboxes."""
    annotations = []
    for (image_id, cat_id), bboxes in boxes.items():
        for bbox in bboxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": cat_id, "bbox": bbox,
                                "area": bbox[2] * bbox[3], "iscrowd": 0})
    return {
        "images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"}
                   for i in range(1, num_images + 1)],
        "annotations": annotations,
        "categories": copy.deepcopy(CATEGORIES),
    }


# Two boxes per category over three images.
BOXES = {
    (1, 1): [[10, 10, 30, 30]], (1, 2): [[50, 50, 40, 40]],
    (2, 1): [[20, 20, 30, 30]], (2, 3): [[5, 5, 20, 20]],
    (3, 2): [[0, 0, 50, 50]], (3, 3): [[60, 60, 30, 30]],
}


def perfect(gt: dict, categories: set[int] | None = None) -> list[dict]:
    """A detection exactly on every GT box (of the given categories), score 1."""
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 1.0}
            for a in gt["annotations"] if categories is None or a["category_id"] in categories]


def det(image_id: int, category_id: int, bbox: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


# ---------------------------------------------------------------------------------------------
# COCO metrics
# ---------------------------------------------------------------------------------------------

def test_perfect_detections_score_one():
    gt = coco_gt(BOXES)
    metrics = evaluate_coco(gt, perfect(gt))
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(1.0)
    assert metrics["per_category_AP50"] == {"cat": 1.0, "dog": 1.0, "bird": 1.0}
    assert metrics["num_images"] == 3 and metrics["num_detections"] == 6


def test_no_detections_score_zero():
    gt = coco_gt(BOXES)
    metrics = evaluate_coco(gt, [])
    assert (metrics["AP"], metrics["AP50"], metrics["AP75"]) == (0.0, 0.0, 0.0)
    assert metrics["per_category_AP50"] == {"cat": 0.0, "dog": 0.0, "bird": 0.0}


def test_metrics_without_ground_truth_are_none():
    # pycocotools says -1 when there is nothing to score; the API says None, never -1.
    gt = coco_gt({(1, 1): [[10, 10, 30, 30]]})  # only "cat" has a box, and it is small
    metrics = evaluate_coco(gt, [])
    assert metrics["AP"] == 0.0
    assert metrics["APm"] is None and metrics["APl"] is None
    assert metrics["per_category_AP50"] == {"cat": 0.0, "dog": None, "bird": None}
    assert evaluate_coco(coco_gt({}), [])["AP"] is None


def test_hand_computed_one_hit_one_false_positive():
    # "cat" has 2 GT boxes (images 1 and 2). Detections by score: 0.9 exact hit on image 1 (TP),
    # 0.8 on image 3, which has no cat (FP); the cat on image 2 is missed.
    #   cumulative TP = [1, 1], FP = [0, 1] -> recall [0.5, 0.5], precision [1.0, 0.5]
    #   envelope [1.0, 0.5]. Recall thresholds 0.00..0.50 (51 of them) are first reached by
    #   detection 1 -> precision 1.0; 0.51..1.00 (50) are never reached -> 0.
    #   AP50 = 51/101. The hit is exact, so every IoU threshold gives the same: AP = 51/101.
    gt = coco_gt({(1, 1): [[10, 10, 30, 30]], (2, 1): [[20, 20, 30, 30]]})
    dets = [det(1, 1, [10, 10, 30, 30], 0.9), det(3, 1, [10, 10, 30, 30], 0.8)]
    metrics = evaluate_coco(gt, dets)
    assert metrics["AP50"] == pytest.approx(51 / 101, abs=1e-6)
    assert metrics["AP"] == pytest.approx(51 / 101, abs=1e-6)
    # dog and bird have no GT: excluded from the mean, reported as None.
    assert metrics["per_category_AP50"] == {"cat": pytest.approx(51 / 101, abs=1e-6),
                                            "dog": None, "bird": None}


def test_hand_computed_precision_envelope():
    # "cat": 2 GT boxes. Detections by score: 0.9 hit (image 1), 0.8 FP (image 3), 0.7 hit
    # (image 2).
    #   TP = [1, 1, 2], FP = [0, 1, 1] -> recall [0.5, 0.5, 1.0], precision [1, 1/2, 2/3]
    #   envelope (max to the right): [1, 2/3, 2/3]
    #   thresholds 0.00..0.50 (51) -> detection 1 -> 1.0; 0.51..1.00 (50) -> detection 3 -> 2/3
    #   AP50 = (51 * 1 + 50 * 2/3) / 101 ≈ 0.83498 (not the 2-point 0.5 * 1 + 0.5 * 2/3).
    gt = coco_gt({(1, 1): [[10, 10, 30, 30]], (2, 1): [[20, 20, 30, 30]]})
    dets = [det(1, 1, [10, 10, 30, 30], 0.9), det(3, 1, [0, 0, 10, 10], 0.8),
            det(2, 1, [20, 20, 30, 30], 0.7)]
    assert evaluate_coco(gt, dets)["AP50"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-6)

    # FP first: TP = [0, 1, 2], FP = [1, 1, 1] -> recall [0, .5, 1], precision [0, 1/2, 2/3];
    # envelope [2/3, 2/3, 2/3], so every one of the 101 thresholds reads 2/3: AP50 = 2/3.
    # (Without the envelope: threshold 0 reads 0, 0.01..0.50 read 1/2 -> (25 + 33.3)/101.)
    dets[1]["score"] = 0.95
    assert evaluate_coco(gt, dets)["AP50"] == pytest.approx(2 / 3, abs=1e-6)


def test_hand_computed_iou_thresholds():
    # One GT box 100x100 and one detection covering its top 62 rows: IoU = 6200/10000 = 0.62.
    # It matches at IoU thresholds 0.50, 0.55, 0.60 (AP 1 each) and misses at 0.65..0.95 (0),
    # so AP50 = 1, AP75 = 0 and AP (mean over the 10 thresholds) = 3/10.
    gt = coco_gt({(1, 1): [[0, 0, 100, 100]]})
    metrics = evaluate_coco(gt, [det(1, 1, [0, 0, 100, 62], 0.5)])
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(0.0)
    assert metrics["AP"] == pytest.approx(0.3, abs=1e-6)


def test_base_novel_split():
    gt = coco_gt(BOXES)
    metrics = evaluate_coco(gt, perfect(gt, categories={1, 2}), base=["cat", "dog"],
                            novel=["bird"])
    assert metrics["AP50_base"] == pytest.approx(1.0)
    assert metrics["AP50_novel"] == pytest.approx(0.0)
    assert metrics["AP50"] == pytest.approx(2 / 3)  # all three categories
    assert "AP50_base" not in evaluate_coco(gt, perfect(gt))  # only splits that were asked for


def test_split_ap50_equals_cocoeval_restricted_to_the_split():
    # The split metric is defined as COCOeval with params.catIds = the split's ids; the
    # implementation reads it from one full evaluation. Check they agree on a mixed case.
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = coco_gt(BOXES)
    dets = perfect(gt) + [det(1, 3, [0, 0, 40, 40], 0.99), det(2, 2, [60, 60, 20, 20], 0.3)]
    dets[0]["bbox"] = [12, 12, 30, 30]  # a looser hit on one cat
    dets[5]["score"] = 0.2  # a bird hit ranked below the bird FP
    metrics = evaluate_coco(gt, dets, base=["cat", "dog"], novel=["bird"])

    def restricted_ap50(cat_ids: list[int]) -> float:
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), iouType="bbox")
        ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        return ev.stats[1]

    assert metrics["AP50_novel"] == pytest.approx(restricted_ap50([3]), abs=1e-9)
    assert metrics["AP50_base"] == pytest.approx(restricted_ap50([1, 2]), abs=1e-9)
    assert 0 < metrics["AP50_novel"] < 1


def test_unknown_split_category_is_named():
    gt = coco_gt(BOXES)
    with pytest.raises(EvaluationError, match=r"'zebra'.*known categories.*'bird'"):
        evaluate_coco(gt, perfect(gt), novel=["zebra"])
    with pytest.raises(EvaluationError, match="both base and novel"):
        evaluate_coco(gt, perfect(gt), base=["cat"], novel=["cat"])


def test_pycocotools_output_is_silenced(capsys):
    gt = coco_gt(BOXES)
    evaluate_coco(gt, perfect(gt))
    evaluate_coco(gt, [])
    assert capsys.readouterr().out == ""


def test_inputs_are_not_modified():
    gt = coco_gt(BOXES)
    dets = perfect(gt)
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    evaluate_coco(gt, dets)
    assert gt == gt_before and dets == dets_before


def test_gt_annotation_id_zero_and_missing_area_are_handled():
    # pycocotools treats annotation id 0 as "unmatched", which would turn this hit into a
    # false positive (AP50 0.5) unless ids are renumbered; area/iscrowd get defaults.
    gt = coco_gt(BOXES)
    for ann in gt["annotations"]:
        ann["id"] -= 1
        del ann["area"], ann["iscrowd"]
    assert evaluate_coco(gt, perfect(gt))["AP50"] == pytest.approx(1.0)


def test_paths_are_accepted(tmp_path):
    gt = coco_gt(BOXES)
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    det_path = save_detections(tmp_path / "dets.json", perfect(gt))
    assert evaluate_coco(str(gt_path), det_path)["AP"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    (det(999, 1, [1, 1, 5, 5], 0.5), r"image id.*\[999\]"),
    (det(1, 77, [1, 1, 5, 5], 0.5), r"category id.*\[77\].*known ids: \[1, 2, 3\]"),
    (det(1, 1, [1, 1, 5], 0.5), r"entry 6 has bbox \[1, 1, 5\]"),
    (det(1, 1, [1, 1, "5", 5], 0.5), r"bbox .*four finite numbers"),
    (det(1, 1, [10, 10, -3, 5], 0.5), r"negative width or height.*not \[x1, y1, x2, y2\]"),
    (det(1, 1, [1, 1, 5, 5], float("nan")), r"score nan"),
    ({"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}, r"entry 6 lacks score"),
    ("not a dict", r"entry 6 is a str"),
])
def test_bad_detections_are_named(bad, message):
    gt = coco_gt(BOXES)
    with pytest.raises(EvaluationError, match=message):
        evaluate_coco(gt, perfect(gt) + [bad])


def test_many_unknown_image_ids_list_a_few():
    gt = coco_gt(BOXES)
    dets = [det(100 + i, 1, [0, 0, 5, 5], 0.5) for i in range(20)]
    with pytest.raises(EvaluationError,
                       match=r"20 image id.*\[100, 101, 102, 103, 104\] and 15 more"):
        evaluate_coco(gt, dets)


def test_gt_that_would_give_wrong_numbers_is_refused():
    gt = coco_gt(BOXES)
    gt["images"].append(dict(gt["images"][0]))
    with pytest.raises(EvaluationError, match=r"images\[3\] repeats image id"):
        evaluate_coco(gt, [])
    gt = coco_gt(BOXES)
    gt["categories"].append({"id": 1, "name": "cow"})
    with pytest.raises(EvaluationError, match="repeats category id 1"):
        evaluate_coco(gt, [])
    for area in (float("nan"), -4.0, "big"):
        gt = coco_gt(BOXES)
        gt["annotations"][1]["area"] = area
        with pytest.raises(EvaluationError, match=r"annotations\[1\] has area"):
            evaluate_coco(gt, [])


@pytest.mark.parametrize("field", ["images", "annotations", "categories"])
def test_gt_missing_field_is_named(field):
    gt = coco_gt(BOXES)
    del gt[field]
    with pytest.raises(EvaluationError, match=f"lacks {field}"):
        evaluate_coco(gt, [])


def test_bad_gt_files_are_named(tmp_path):
    with pytest.raises(EvaluationError, match="does not exist"):
        evaluate_coco(str(tmp_path / "missing.json"), [])
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(EvaluationError, match="not valid JSON"):
        evaluate_coco(str(broken), [])
    gt = coco_gt(BOXES)
    gt["annotations"][0]["category_id"] = 9
    with pytest.raises(EvaluationError, match=r"annotations\[0\] names category 9"):
        evaluate_coco(gt, [])
    # A detections file passed as ground truth is a common mix-up.
    with pytest.raises(EvaluationError, match="JSON object.*looks like detections"):
        evaluate_coco([], [])  # type: ignore[arg-type]


def test_evaluation_error_is_a_value_error():
    assert issubclass(EvaluationError, ValueError)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def test_save_load_roundtrip_leaves_no_temp_file(tmp_path):
    dets = [det(1, 1, [1.5, 2, 3, 4], 0.25),
            {"image_id": np.int64(2), "category_id": np.int32(3), "bbox": np.array([0, 0, 1, 1.5]),
             "score": np.float32(0.5), "segmentation": [[0, 0, 1, 1]]}]
    path = tmp_path / "out" / "dets.json"
    save_detections(path, dets)
    assert os.listdir(tmp_path / "out") == ["dets.json"]
    loaded = load_detections(path)
    assert loaded == [det(1, 1, [1.5, 2.0, 3.0, 4.0], 0.25), det(2, 3, [0.0, 0.0, 1.0, 1.5], 0.5)]
    assert json.loads(path.read_text()) == loaded  # plain COCO results JSON


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "dets.json"
    save_detections(path, [det(1, 1, [0, 0, 1, 1], 0.5)])
    before = path.read_text()

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "mv", fail)
    with pytest.raises(OSError, match="disk full"):
        save_detections(path, [det(2, 2, [0, 0, 1, 1], 0.9)])
    assert path.read_text() == before  # old file intact
    assert os.listdir(tmp_path) == ["dets.json"]  # and no temp file left


def test_save_rejects_bad_detections_without_writing(tmp_path):
    with pytest.raises(EvaluationError, match="bbox"):
        save_detections(tmp_path / "dets.json", [det(1, 1, [0, 0, 1], 0.5)])
    assert os.listdir(tmp_path) == []


def test_load_rejects_non_list(tmp_path):
    path = tmp_path / "dets.json"
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(EvaluationError, match="must be a list"):
        load_detections(path)


def test_write_report(tmp_path):
    gt = coco_gt({(1, 1): [[10, 10, 30, 30]], (2, 1): [[20, 20, 30, 30]]})
    metrics = evaluate_coco(gt, [det(1, 1, [10, 10, 30, 30], 0.9)], base=["cat"], novel=["dog"])
    json_path, md_path = write_report(metrics, tmp_path / "eval", name="val")
    assert sorted(os.listdir(tmp_path / "eval")) == ["val.json", "val.md"]
    assert json.loads(open(json_path).read()) == metrics
    assert json.loads(open(json_path).read())["AP50_novel"] is None  # null, not -1 or NaN
    markdown = open(md_path).read()
    assert "| AP50 | 0.5050 |" in markdown
    assert "| AP50_novel | n/a |" in markdown
    assert "| cat | 0.5050 |" in markdown
    assert markdown.endswith(format_table(metrics))


def test_draw_predictions(tmp_path):
    black = Image.new("RGB", (64, 48))
    preds = [det(1, 1, [10, 10, 20, 20], 0.9),
             det(1, 2, [40, 30, 10, 10], 0.1)]  # below the threshold: not drawn
    path = draw_predictions([(black, preds), (Image.new("RGB", (32, 32)), [])],
                            {1: "cat", 2: "dog"}, tmp_path / "sheet.png", score_threshold=0.5)
    assert os.listdir(tmp_path) == ["sheet.png"]
    with Image.open(path) as sheet:
        assert sheet.format == "PNG"
        assert sheet.size == (2 * 64, 48)  # two cells side by side, each the largest image
        sheet = sheet.convert("RGB")
        assert sheet.getpixel((10, 25)) != (0, 0, 0)  # left edge of the drawn box
        assert sheet.getpixel((40, 35)) == (0, 0, 0)  # the low-score box is absent
        assert sheet.getpixel((64 + 40, 40)) != (0, 0, 0)  # background right of the 32x32 image

    # Large images shrink to max_side, and wrap to a new row after `columns`.
    big = Image.new("RGB", (200, 100))
    path = draw_predictions([(big, [det(1, 1, [0, 0, 100, 50], 1.0)])] * 3, {1: "cat"},
                            tmp_path / "big.png", columns=2, max_side=50)
    with Image.open(path) as sheet:
        assert sheet.size == (2 * 50, 2 * 25)
    with pytest.raises(EvaluationError, match="no images"):
        draw_predictions([], {}, tmp_path / "none.png")


# ---------------------------------------------------------------------------------------------
# LVIS
# ---------------------------------------------------------------------------------------------

def lvis_gt() -> dict:
    gt = coco_gt(BOXES)
    for cat, frequency in zip(gt["categories"], ["r", "c", "f"]):
        cat["frequency"] = frequency
    for image in gt["images"]:
        image["not_exhaustive_category_ids"] = []
        present = {a["category_id"] for a in gt["annotations"] if a["image_id"] == image["id"]}
        image["neg_category_ids"] = sorted({1, 2, 3} - present)  # verified absent
    return gt


def test_lvis_perfect_detections():
    gt = lvis_gt()
    metrics = evaluate_lvis(gt, perfect(gt))
    for key in ("AP", "AP50", "AP75", "APr", "APc", "APf"):
        assert metrics[key] == pytest.approx(1.0), key
    assert metrics["per_category_AP50"] == {"cat": 1.0, "dog": 1.0, "bird": 1.0}
    assert not hasattr(np, "float")  # the lvis-api compatibility alias does not leak


def test_lvis_no_detections_and_hand_case():
    gt = lvis_gt()
    metrics = evaluate_lvis(gt, [])
    assert (metrics["AP"], metrics["APr"], metrics["APc"], metrics["APf"]) == (0, 0, 0, 0)
    # Only the rare "cat" found, perfectly: APr = 1, APc = APf = 0, AP = mean = 1/3.
    metrics = evaluate_lvis(gt, perfect(gt, categories={1}))
    assert (metrics["APr"], metrics["APc"], metrics["APf"]) == (1.0, 0.0, 0.0)
    assert metrics["AP"] == pytest.approx(1 / 3)


def test_lvis_caps_detections_per_image():
    # Image 1 has a cat and a dog; capped at one detection per image, the dog (lower score)
    # is dropped: dog recall 1/2 at precision 1 -> AP50 51/101 (as in the COCO hand case).
    gt = lvis_gt()
    dets = perfect(gt)
    for d in dets:
        d["score"] = 0.5 if (d["image_id"], d["category_id"]) == (1, 2) else 1.0
    metrics = evaluate_lvis(gt, dets, max_dets_per_image=1)
    assert metrics["per_category_AP50"]["dog"] == pytest.approx(51 / 101, abs=1e-6)
    assert evaluate_lvis(gt, dets)["per_category_AP50"]["dog"] == pytest.approx(1.0)


def test_lvis_numbers_are_lvis_apis_own_from_files(tmp_path, monkeypatch):
    """evaluate_lvis gives exactly what lvis-api gives when it reads the same ground truth and
    detections from files itself (its documented use), on a case with misses, false positives,
    partial overlaps and a not-exhaustive category."""
    from lvis import LVIS, LVISEval, LVISResults
    gt = lvis_gt()
    gt["images"][2]["not_exhaustive_category_ids"] = [2]
    rng = np.random.default_rng(0)
    dets = [det(a["image_id"], a["category_id"], [v + float(rng.uniform(-6, 6)) for v in a["bbox"][:2]]
                + a["bbox"][2:], float(rng.uniform(0.2, 1))) for a in gt["annotations"]]
    dets += [det(int(rng.integers(1, 4)), int(rng.integers(1, 4)), [float(v) for v in rng.uniform(0, 60, 4)],
                 float(rng.uniform(0, 1))) for _ in range(12)]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    monkeypatch.setattr(np, "float", float, raising=False)  # lvis-api 0.5.3 still calls np.float
    reference = LVISEval(LVIS(str(tmp_path / "gt.json")), LVISResults(str(tmp_path / "gt.json"),
                                                                     str(tmp_path / "dets.json")), "bbox")
    reference.run()
    want = reference.get_results()
    monkeypatch.delattr(np, "float")
    metrics = evaluate_lvis(gt, dets)
    assert 0 < metrics["AP"] < 1
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"):
        assert metrics[key] == (None if want[key] < 0 else want[key]), key
    assert evaluate_lvis(str(tmp_path / "gt.json"), str(tmp_path / "dets.json")) == metrics

def test_lvis_gt_needs_lvis_fields():
    gt = lvis_gt()
    del gt["images"][1]["neg_category_ids"]
    with pytest.raises(EvaluationError, match=r"image 2 lacks the list 'neg_category_ids'"):
        evaluate_lvis(gt, [])
    gt = lvis_gt()
    gt["categories"][0]["frequency"] = "x"
    with pytest.raises(EvaluationError, match=r"'cat' has frequency 'x'"):
        evaluate_lvis(gt, [])
    with pytest.raises(EvaluationError, match="image id"):
        evaluate_lvis(lvis_gt(), [det(42, 1, [0, 0, 1, 1], 0.5)])


# ---------------------------------------------------------------------------------------------
# jobs/evaluate.py
# ---------------------------------------------------------------------------------------------

def run_job(*args: str) -> subprocess.CompletedProcess:
    # PYTHONPATH: the job must find `engine` whether or not the package is pip-installed.
    path = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, os.path.join(REPO, "jobs", "evaluate.py"), *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_job_help():
    result = run_job("--help")
    assert result.returncode == 0
    for flag in ("--gt", "--detections", "--format", "--base", "--novel", "--out"):
        assert flag in result.stdout


def test_job_writes_report(tmp_path):
    gt = coco_gt(BOXES)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    save_detections(tmp_path / "dets.json", perfect(gt, categories={1, 2}))
    result = run_job("--gt", str(tmp_path / "gt.json"), "--detections", str(tmp_path / "dets.json"),
                     "--base", "cat,dog", "--novel", "bird", "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr
    assert "| AP50_base | 1.0000 |" in result.stdout
    assert "| AP50_novel | 0.0000 |" in result.stdout
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["AP50_novel"] == 0.0 and report["AP50_base"] == 1.0
    assert (tmp_path / "eval" / "report.md").exists()


def test_job_lvis(tmp_path):
    gt = lvis_gt()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    save_detections(tmp_path / "dets.json", perfect(gt))
    result = run_job("--gt", str(tmp_path / "gt.json"), "--detections", str(tmp_path / "dets.json"),
                     "--format", "lvis", "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr
    assert "| APr | 1.0000 |" in result.stdout
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["APf"] == 1.0


def test_job_reports_errors_without_traceback(tmp_path):
    gt = coco_gt(BOXES)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    save_detections(tmp_path / "dets.json", [det(999, 1, [0, 0, 5, 5], 0.5)])
    result = run_job("--gt", str(tmp_path / "gt.json"), "--detections", str(tmp_path / "dets.json"),
                     "--out", str(tmp_path / "eval"))
    assert result.returncode == 2
    assert "999" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "eval").exists()
