"""The quality filter: CLIP scores of each image and each box of a shard row (Ray Data actors).

Optional (`filter.enabled`), after annotation and before the mask stage (a refused box is never
segmented). Each sample's JSON record gains:

- `clip_image`: {category: score} for each category its prompt named;
- `clip_scores`: parallel to `boxes`, the score of the box's crop against its label.

Scores are CLIP's cosine similarities (engine.models.clip). A box under `filter.min_box_score`
leaves `boxes` (and its parallel lists) for the record's `refused` list, with its score, labeller,
CLIP score and the reason `low_box_score`. An image whose worst prompted category scores under
`filter.min_image_score` gets `refused_image` ({"reason": "low_image_score", "category", "clip"}):
it is still written, so that the preview shows it and nothing is silently lost, but its manifest
entry lists it under `refused_keys`, not `keys`, and every reader skips it
(engine.data.shards.usable). The entry counts both per reason (`filter`).
"""
from __future__ import annotations

import io
import math

from PIL import Image

from engine.config import FilterConfig
from engine.generation.annotation import RecordStage, columns
from engine.models.clip import build_clip
from engine.runtime.cluster import PoolPlan

LOW_IMAGE_SCORE = "low_image_score"
LOW_BOX_SCORE = "low_box_score"


def plan_filter_pool(cfg: FilterConfig, synth: PoolPlan, annot: PoolPlan) -> tuple[PoolPlan, PoolPlan]:
    """(synthesis pool, filter pool): beside the annotation actors on GPUs; on CPU one actor (or
    filter.num_actors) holding a quarter CPU taken from the synthesis actors, as the captioner's
    is, so that the pools never together ask for more CPUs than the cluster has (they would wait
    forever)."""
    if annot.num_gpus > 0:
        return synth, PoolPlan(cfg.num_actors or annot.size, 1.0, cfg.gpus_per_actor)
    size = cfg.num_actors or 1
    share = 0.25 * size
    return PoolPlan(synth.size, max(0.25, synth.num_cpus - share / synth.size), 0.0), PoolPlan(size, 0.25, 0.0)


def crop(image: Image.Image, box: list[float]) -> Image.Image:
    """The pixels of an xyxy box, at least one of them."""
    x0, y0 = math.floor(box[0]), math.floor(box[1])
    return image.crop((x0, y0, max(math.ceil(box[2]), x0 + 1), max(math.ceil(box[3]), y0 + 1)))


def apply(meta: dict, image_scores: dict[str, float], box_scores: list[float], cfg: FilterConfig) -> dict:
    """A sample record with its CLIP scores and the filter's verdicts (see module docstring).
    Scores are compared as recorded (rounded), so the record and the verdict always agree."""
    boxes = [{"bbox": b, "category": c, "score": s, "labeller": w}
             for b, c, s, w in zip(meta["boxes"], meta["labels"], meta["scores"], meta["labellers"])]
    kept = [j for j, s in enumerate(box_scores) if s >= cfg.min_box_score]
    refused = [{**boxes[j], "reason": LOW_BOX_SCORE, "clip": box_scores[j]}
               for j in range(len(boxes)) if j not in kept]
    out = {**meta, **columns([boxes[j] for j in kept]), "clip_scores": [box_scores[j] for j in kept],
           "clip_image": image_scores}
    if refused:
        out["refused"] = meta.get("refused", []) + refused
    if image_scores:
        worst = min(image_scores, key=image_scores.get)
        if image_scores[worst] < cfg.min_image_score:
            out["refused_image"] = {"reason": LOW_IMAGE_SCORE, "category": worst, "clip": image_scores[worst]}
    return out


class QualityFilter(RecordStage):
    """A Ray Data actor: scores and filters each JSON record of a shard row (see module docstring)."""

    def __init__(self, cfg: FilterConfig, threads: int = 0):
        super().__init__(threads)
        self.cfg = cfg
        self.scorer = build_clip(cfg.model, cfg.seed)

    def update(self, meta: dict, jpeg: bytes) -> dict:
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        return apply(meta, *self.score(image, meta), self.cfg)

    def score(self, image: Image.Image, meta: dict) -> tuple[dict[str, float], list[float]]:
        """({prompted category: image score}, [score of each box's crop against its label]), in one
        CLIP batch: the image and the crops against every name either needs."""
        names = list(dict.fromkeys(list(meta["categories"]) + list(meta["labels"])))
        if not names:
            return {}, []
        sims = self.scorer.scores([image] + [crop(image, b) for b in meta["boxes"]], names)
        col = {name: k for k, name in enumerate(names)}
        image_scores = {c: round(float(sims[0, col[c]]), 4) for c in meta["categories"]}
        box_scores = [round(float(sims[1 + j, col[label]]), 4) for j, label in enumerate(meta["labels"])]
        return image_scores, box_scores
