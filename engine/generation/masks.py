"""The mask stage: instance masks for the labelled boxes of a shard row (Ray Data actors).

Optional (`masks.enabled`), after annotation: each sample's JSON record gains, parallel to its
`boxes`, `masks` (compressed RLE, engine.data.masks; null where the mask was rejected),
`mask_scores` (the segmenter's predicted IoU), `mask_fill` (mask area / box area) and
`mask_status` ("ok" or why it was rejected: "low_iou", "low_fill", "high_fill", "empty"), and
`mask_prompt` ("box" or "background"). A rejected mask leaves its box in place: the box is still a
label for detection; only the mask is unfit for cut-outs. The shard's manifest entry counts the
statuses (engine.data.shards).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from engine.config import MaskConfig
from engine.data import masks as rle
from engine.generation.annotation import RecordStage
from engine.models.segmenter import build_segmenter
from engine.runtime.cluster import PoolPlan

def plan_mask_pool(cfg: MaskConfig, annot: PoolPlan) -> PoolPlan:
    """The mask actors' pool: beside the annotation actors on GPUs; on CPU one actor (or
    masks.num_actors) holding a quarter CPU, the share plan_pools leaves for Ray Data's tasks,
    so that the pools never together ask for more CPUs than the cluster has (they would wait
    forever)."""
    if annot.num_gpus > 0:
        return PoolPlan(cfg.num_actors or annot.size, 1.0, cfg.gpus_per_actor)
    return PoolPlan(cfg.num_actors or 1, 0.25, 0.0)


def judge(mask: np.ndarray, score: float, box: list[float], cfg: MaskConfig) -> tuple[str, float]:
    """A mask's status (MASK_STATUSES) under the thresholds, and its fill."""
    fill = rle.fill(mask, box)
    if not mask.any():
        return "empty", fill
    if score < cfg.min_iou:
        return "low_iou", fill
    if fill < cfg.min_fill:
        return "low_fill", fill
    if fill > cfg.max_fill:
        return "high_fill", fill
    return "ok", fill


class Masker(RecordStage):
    """A Ray Data actor: adds the masks to each JSON record of a shard row (see module docstring)."""

    def __init__(self, cfg: MaskConfig, threads: int = 0):
        super().__init__(threads)
        self.cfg = cfg
        self.segmenter = build_segmenter(cfg.model, cfg.seed)

    def update(self, meta: dict, jpeg: bytes) -> dict:
        if not meta["boxes"]:
            return {**meta, "masks": [], "mask_scores": [], "mask_fill": [], "mask_status": [], "mask_prompt": "box"}
        image = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        return {**meta, **self.segment(image, meta["boxes"])}

    def segment(self, image: np.ndarray, boxes: list[list[float]]) -> dict:
        if self.cfg.prompt == "background" and len(boxes) == 1:
            mask, score = self.segmenter.segment_background(image)
            masks, scores, prompt = mask[None], np.array([score]), "background"
        else:
            masks, scores, prompt = *self.segmenter.segment_boxes(image, boxes), "box"
        out = {"masks": [], "mask_scores": [], "mask_fill": [], "mask_status": [], "mask_prompt": prompt}
        for mask, score, box in zip(masks, scores, boxes):
            status, fill = judge(mask, float(score), box, self.cfg)
            out["masks"].append(rle.encode(mask) if status == "ok" else None)
            out["mask_scores"].append(round(float(score), 4))
            out["mask_fill"].append(round(fill, 4))
            out["mask_status"].append(status)
        return out
