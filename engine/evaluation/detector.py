"""A trained detector, evaluated: predictions on COCO-format ground truth, scored by
engine.evaluation.metrics (COCO AP with base / novel AP50, or LVIS AP), with a report and a
picture of its predictions.

    metrics = evaluate_detector(cfg.detector)   # cfg.detector.eval_annotations -> OUT/report.md
"""
from __future__ import annotations

import os
import time
from typing import Optional

from engine.config import ConfigError, DetectorConfig
from engine.data.datasets import check_dataset, image_file, missing_files, open_image
from engine.evaluation.metrics import (
    draw_predictions,
    evaluate_coco,
    evaluate_lvis,
    load_ground_truth,
    resolve_splits,
    save_detections,
    write_report,
)
from engine.models.detectors import Detector, load_detector
from engine.training.detection import DetectionDataError


def load_trained(cfg: DetectorConfig, folder: Optional[str] = None, attention: Optional[str] = None) -> Detector:
    """The detector saved in `folder` (default cfg.output_dir): its kind and categories from the folder."""
    folder = folder or cfg.output_dir
    if not os.path.isdir(folder):
        raise DetectionDataError(f"no trained detector at {folder!r}; train one first (instagen train-detector) "
                                 f"or point detector.output_dir at one")
    return load_detector(folder, attention or cfg.attention, cfg.image_size)


def predict_coco(det: Detector, gt: dict, files: dict, batch_size: int = 8,
                 threshold: float = 0.0) -> tuple[list[dict], dict[int, list[dict]]]:
    """COCO results entries for every image of the ground truth `gt` (`files`: each image's file by
    id). Detections of a category the ground truth does not list cannot be scored and are left out."""
    by_name = {c["name"]: c["id"] for c in gt["categories"]}
    results, per_image = [], {}
    images = gt["images"]
    for s in range(0, len(images), batch_size):
        chunk = images[s:s + batch_size]
        pics = [open_image(files[im["id"]]) for im in chunk]
        for im, found in zip(chunk, det.predict(pics, threshold=threshold)):
            entries = [{"image_id": im["id"], "category_id": by_name[f["category"]],
                        "bbox": [f["bbox"][0], f["bbox"][1], f["bbox"][2] - f["bbox"][0], f["bbox"][3] - f["bbox"][1]],
                        "score": f["score"]} for f in found if f["category"] in by_name]
            results += entries
            per_image[im["id"]] = entries
    return results, per_image


def check_evaluation_inputs(cfg: DetectorConfig) -> tuple[dict, dict]:
    """What evaluate_detector reads, checked before it predicts or writes anything (train-detector
    checks it before training too: a bad path should not wait for the end of training): the ground
    truth as the metrics read it, the base / novel split, and every image listed. Returns the
    ground truth and each image's file by id."""
    if not (cfg.eval_annotations and cfg.eval_image_root):
        raise ConfigError("set detector.eval_annotations and detector.eval_image_root to evaluate")
    check_dataset(cfg.eval_annotations, cfg.eval_image_root, ("detector.eval_annotations", "detector.eval_image_root"))
    gt = load_ground_truth(cfg.eval_annotations, lvis=cfg.eval_format == "lvis")
    if cfg.eval_format == "coco":
        resolve_splits(gt, cfg.base or None, cfg.novel or None)
    files = {im["id"]: image_file(cfg.eval_image_root, im, cfg.eval_format) for im in gt["images"]}
    unnamed = [i for i, f in files.items() if f is None]
    if unnamed:
        raise DetectionDataError(f"image {unnamed[0]!r} of detector.eval_annotations names no file (file_name"
                                 f"{', or coco_url for LVIS' if cfg.eval_format == 'lvis' else ''}); add it")
    # Every image counts: one left out would take its ground-truth boxes out of the scores.
    missing = missing_files(list(files.values()))
    if missing:
        raise DetectionDataError(f"{len(missing)} image(s) listed in detector.eval_annotations are missing under "
                                 f"detector.eval_image_root (e.g. {missing[0]!r}); point eval_image_root at the "
                                 f"folder that holds them")
    return gt, files


def evaluate_detector(cfg: DetectorConfig, folder: Optional[str] = None, out_dir: Optional[str] = None) -> dict:
    """Predict on cfg.eval_annotations, then write OUT/detections.json (COCO results), OUT/report.json
    and .md (engine.evaluation.metrics), and OUT/predictions.png. Returns the metrics."""
    gt, files = check_evaluation_inputs(cfg)
    out_dir = out_dir or cfg.eval_dir or os.path.join(cfg.output_dir, "eval")
    det = load_trained(cfg, folder)
    start = time.time()
    detections, per_image = predict_coco(det, gt, files, cfg.eval_batch_size, cfg.eval_threshold)
    predict_s = time.time() - start
    save_detections(os.path.join(out_dir, "detections.json"), detections)
    if cfg.eval_format == "lvis":
        metrics = evaluate_lvis(gt, detections)
    else:
        metrics = evaluate_coco(gt, detections, base=cfg.base or None, novel=cfg.novel or None)
    metrics["predict_s"] = round(predict_s, 3)
    metrics["eval_s"] = round(time.time() - start - predict_s, 3)
    write_report(metrics, out_dir)
    shown = gt["images"][:cfg.draw_images]
    if shown:
        pairs = [(open_image(files[im["id"]]), per_image[im["id"]]) for im in shown]
        draw_predictions(pairs, {c["id"]: c["name"] for c in gt["categories"]},
                         os.path.join(out_dir, "predictions.png"), score_threshold=cfg.draw_threshold)
    return metrics
