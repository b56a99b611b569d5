"""Annotation: labellers put boxes on generated images.

One registry, `LABELLERS`, holds every kind of labeller by name; `build_labeller` is the one place
they are built from config. A labeller takes images and, per image, the categories its prompt
named, and returns boxes of those categories only: the prompt says what is in the picture, the
labeller says where (the teacher detector for base categories with score >= alpha; the grounding
head for novel categories with score >= beta joins this registry later).
"""
from __future__ import annotations

import io
import json
import os
from typing import Callable, Protocol

import numpy as np
import torch

from engine.config import AnnotationConfig
from engine.faults import maybe_crash

BOX_FORMAT = "xyxy in pixels, origin at the top-left corner"


class AnnotationError(ValueError):
    pass


class Labeller(Protocol):
    name: str

    def label(self, images: list[np.ndarray], categories: list[list[str]], **kw) -> list[list[dict]]:
        """Per image: a list of {"bbox": [x0, y0, x1, y1], "category": str, "score": float} and
        optionally "labeller" (a combined labeller says which of its parts made each box).
        Labellers with `needs_latents = True` also get `latents=` (the stored step T-1 latents)
        and `prompts=`, from which they recompute UNet features."""


LABELLERS: dict[str, Callable[[AnnotationConfig, list[str]], Labeller]] = {}


def register_labeller(name: str):
    def wrap(factory):
        LABELLERS[name] = factory
        return factory
    return wrap


def check_labeller(cfg: AnnotationConfig) -> None:
    import engine.grounding.labeller  # noqa: F401  registers grounding_head and teacher+head
    if cfg.labeller not in LABELLERS:
        raise AnnotationError(f"annotation.labeller {cfg.labeller!r} is unknown; choose one of "
                              f"{', '.join(sorted(LABELLERS))}")
    if not 0 < cfg.nms_iou <= 1:
        raise AnnotationError(f"annotation.nms_iou must lie in (0, 1] (1 turns NMS off), got {cfg.nms_iou}")
    if cfg.max_per_category < 0:
        raise AnnotationError(f"annotation.max_per_category must be >= 0 (0 keeps every box), got {cfg.max_per_category}")
    if cfg.labeller in ("grounding_head", "teacher+head") and not os.path.isdir(cfg.head or cfg.model):
        raise AnnotationError(f"annotation.labeller={cfg.labeller} needs the grounding head's folder, and "
                              f"{cfg.head or cfg.model!r} is none; set annotation.head to the folder that "
                              f"`instagen train-grounding` wrote")
    if cfg.model != "tiny" and not os.path.isdir(cfg.model) and cfg.labeller not in ("grounding_head", "none"):
        raise AnnotationError(f"annotation.model {cfg.model!r} is not a local folder; point it at a "
                              f"detector saved with save_pretrained, or use 'tiny'")


def build_labeller(cfg: AnnotationConfig, categories: list[str]) -> Labeller:
    check_labeller(cfg)
    return LABELLERS[cfg.labeller](cfg, categories)


def tiny_detector(categories: list[str], seed: int = 0):
    """A tiny randomly initialised DETR whose labels are `categories`: its boxes mean nothing."""
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        backbone = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1],
                                out_features=["stage4"])
        model = DetrForObjectDetection(DetrConfig(
            use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
            d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64, decoder_ffn_dim=64,
            encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10,
            id2label=dict(enumerate(categories)), label2id={c: i for i, c in enumerate(categories)}))
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


@register_labeller("detector")
class DetectorLabeller:
    """A closed-set transformers detector (DETR, Deformable DETR, RT-DETR, ...) from a local folder,
    or a tiny random one. Its label names are matched to category names, ignoring case."""

    name = "detector"

    def __init__(self, cfg: AnnotationConfig, categories: list[str]):
        from transformers import AutoImageProcessor, AutoModelForObjectDetection, DetrImageProcessor
        self.alpha, self.nms_iou, self.max_per_category = cfg.alpha, cfg.nms_iou, cfg.max_per_category
        if cfg.model == "tiny":
            self.model = tiny_detector(categories)
            self.processor = DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})
        else:
            try:
                self.model = AutoModelForObjectDetection.from_pretrained(cfg.model, local_files_only=True).eval()
                self.processor = AutoImageProcessor.from_pretrained(cfg.model, local_files_only=True)
            except (OSError, ValueError) as e:
                raise AnnotationError(f"could not load the detector in {cfg.model!r}: {e}") from e
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        by_name = {c.lower(): c for c in categories}
        self.label_to_category = {int(i): by_name[n.lower()] for i, n in self.model.config.id2label.items()
                                  if n.lower() in by_name}
        if not self.label_to_category:
            raise AnnotationError(
                f"the detector in {cfg.model!r} knows none of the categories to label "
                f"({', '.join(categories[:5])}...); its labels are "
                f"{', '.join(list(self.model.config.id2label.values())[:8])}...")

    @torch.no_grad()
    def label(self, images: list[np.ndarray], categories: list[list[str]]) -> list[list[dict]]:
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        sizes = [img.shape[:2] for img in images]
        results = self.processor.post_process_object_detection(outputs, threshold=self.alpha, target_sizes=sizes)
        labelled = []
        for res, wanted in zip(results, categories):
            boxes = []
            for score, lab, box in zip(res["scores"].tolist(), res["labels"].tolist(), res["boxes"].tolist()):
                cat = self.label_to_category.get(int(lab))
                if cat in wanted:
                    boxes.append({"bbox": [round(v, 2) for v in box], "category": cat, "score": round(score, 4)})
            labelled.append(per_category_nms(boxes, self.nms_iou, self.max_per_category))
        return labelled


def per_category_nms(boxes: list[dict], iou: float, per_category: int = 0) -> list[dict]:
    """The boxes that no higher-scoring box of the same category overlaps by more than iou (iou 1
    keeps all), at most `per_category` of each category (0 = all), best first."""
    from engine.grounding.model import nms
    kept = []
    for cat in {b["category"] for b in boxes}:
        same = sorted((b for b in boxes if b["category"] == cat), key=lambda b: -b["score"])
        if iou < 1.0 and len(same) > 1:
            keep = nms(torch.tensor([b["bbox"] for b in same]), torch.tensor([b["score"] for b in same]), iou)
            same = [same[i] for i in keep.tolist()]
        kept += same[:per_category] if per_category > 0 else same
    return sorted(kept, key=lambda b: -b["score"])


@register_labeller("none")
class NoLabeller:
    """Images and latents without boxes: novel-category images for the grounding head's
    self-training, whose EMA teacher labels them itself."""

    name = "none"

    def __init__(self, cfg: AnnotationConfig, categories: list[str]):
        pass

    def label(self, images: list[np.ndarray], categories: list[list[str]]) -> list[list[dict]]:
        return [[] for _ in images]


def clip_box(box: list[float], width: int, height: int) -> list[float] | None:
    """Clip to the image; None for a box with no area left (such a box helps no detector)."""
    x0, y0, x1, y1 = box
    x0, x1 = max(0.0, min(x0, width)), max(0.0, min(x1, width))
    y0, y1 = max(0.0, min(y0, height)), max(0.0, min(y1, height))
    return [x0, y0, x1, y1] if x1 > x0 and y1 > y0 else None


class Annotator:
    """A Ray Data actor: labels each generated image and adds the sample's JSON record."""

    def __init__(self, cfg: AnnotationConfig, categories: list[str], threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.labeller = build_labeller(cfg, categories)
        self.batches = 0

    def __call__(self, batch: dict) -> dict:
        self.batches += 1
        maybe_crash("annotation", self.batches)
        ok = [i for i, s in enumerate(batch["status"]) if s == "ok"]
        cats = [json.loads(c) for c in batch["categories"]]
        extra = {}
        if getattr(self.labeller, "needs_latents", False):  # the grounding head reads UNet features
            extra = {"latents": [np.load(io.BytesIO(batch["latent"][i]), allow_pickle=False) for i in ok],
                     "prompts": [str(batch["text"][i]) for i in ok]}
        found = self.labeller.label([batch["pixels"][i] for i in ok], [cats[i] for i in ok], **extra) if ok else []
        boxes_of = dict(zip(ok, found))
        records = []
        for i in range(len(batch["id"])):
            h, w = batch["pixels"][i].shape[:2]
            boxes = []
            for b in boxes_of.get(i, []):
                clipped = clip_box(b["bbox"], w, h)
                if clipped:
                    boxes.append({**b, "bbox": clipped, "labeller": b.get("labeller", self.labeller.name)})
            records.append(json.dumps({
                "id": int(batch["id"][i]), "prompt": str(batch["text"][i]), "categories": cats[i],
                "seed": int(batch["seed"][i]), "seed_used": int(batch["seed_used"][i]),
                "model_id": str(batch["model_id"][i]), "width": int(w), "height": int(h),
                "box_format": BOX_FORMAT,
                "boxes": [b["bbox"] for b in boxes], "labels": [b["category"] for b in boxes],
                "scores": [b["score"] for b in boxes], "labellers": [b["labeller"] for b in boxes],
            }))
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["json"] = records
        return out
