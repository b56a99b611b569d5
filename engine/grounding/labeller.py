"""The grounding head as a labeller in the annotation stage (engine.annotation's registry).

"grounding_head": every prompted category is boxed by the head (score >= beta).
"teacher+head": the categories the head was trained on as base go to the teacher detector
(score >= alpha), the others (novel) to the head (score >= beta), as the paper generates its
synthetic dataset. Every box says which labeller made it ("detector" or "grounding_head").

The head reads UNet features, not pixels: it needs each image's stored latent (the input of the
last denoising step) and prompt, so `label` takes them as keyword arguments; images only give
the size to scale boxes to. The annotation config's `head` names the trained head's folder
(for "grounding_head", `model` may name it instead).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from engine.annotation import AnnotationError, register_labeller

HEAD_LABELLER = "grounding_head"


class GroundingHeadLabeller:
    name = HEAD_LABELLER
    needs_latents = True  # the Annotator passes latents= and prompts= (see module docstring)

    def __init__(self, folder: str, beta: float, nms_iou: float = 0.7, max_per_category: int = 0,
                 device: str | None = None):
        from engine.config import ModelConfig, from_dict
        from engine.grounding.features import Featurizer
        from engine.grounding.train import load_grounding_head
        from engine.models import load_pipeline
        if not folder or not os.path.isdir(folder):
            raise AnnotationError(f"grounding head folder {folder!r} does not exist; set annotation.head to the "
                                  f"output folder of `python jobs/train_grounding.py`")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.head, self.meta = load_grounding_head(folder, self.device)
        # The head reads the features of the pipeline it was trained on; load that one.
        pipe = load_pipeline(from_dict(ModelConfig, self.meta["model"]), self.device)
        self.featurizer = Featurizer(pipe, int(self.meta["synthesis_steps"]))
        self.beta, self.nms_iou, self.max_per_category = beta, nms_iou, max_per_category
        self.base = set(self.meta.get("base", []))

    @torch.no_grad()
    def label(self, images: list[np.ndarray], categories: list[list[str]], latents=None,
              prompts=None) -> list[list[dict]]:
        from engine.grounding.model import predictions
        if latents is None or prompts is None:
            raise AnnotationError("the grounding_head labeller needs each image's latent and prompt "
                                  "(label(..., latents=, prompts=)); this annotation stage passes only pixels")
        if not images:
            return []
        feats = self.featurizer.unet_features(torch.as_tensor(np.stack(latents), dtype=torch.float32), list(prompts))
        wanted = [list(c) if c else [] for c in categories]
        text, mask = self.featurizer.text_batch(wanted)
        out = self.head([f.to(self.device) for f in feats], text.to(self.device), mask.to(self.device))
        labelled = []
        found_per_image = predictions(out, mask.to(self.device), self.beta, self.nms_iou,
                                      per_category=self.max_per_category)
        for img, cats, found in zip(images, wanted, found_per_image):
            h, w = img.shape[:2]
            labelled.append([{"bbox": [round(b[0] * w, 2), round(b[1] * h, 2), round(b[2] * w, 2), round(b[3] * h, 2)],
                              "category": cats[c], "score": round(s, 4), "labeller": HEAD_LABELLER}
                             for c, s, b in found])
        return labelled


class TeacherPlusHeadLabeller:
    """Base categories (those the head was trained on as base) to the teacher detector at alpha,
    all others to the head at beta."""

    name = "teacher+head"
    needs_latents = True

    def __init__(self, cfg, categories: list[str]):
        from engine.annotation import DetectorLabeller
        # The detector takes annotation.model, so the head's folder must come from annotation.head.
        self.head = GroundingHeadLabeller(getattr(cfg, "head", ""), cfg.beta, cfg.nms_iou, cfg.max_per_category)
        base = [c for c in categories if c in self.head.base]
        if not self.head.base:
            raise AnnotationError("the grounding head's folder names no base categories; retrain it with "
                                  "grounding.base set")
        self.base = set(base)
        self.detector = DetectorLabeller(cfg, base) if base else None

    def label(self, images, categories, latents=None, prompts=None) -> list[list[dict]]:
        base = [[c for c in cats if c in self.base] for cats in categories]
        novel = [[c for c in cats if c not in self.base] for cats in categories]
        from_detector = self.detector.label(images, base) if self.detector and any(base) else [[] for _ in images]
        from_head = self.head.label(images, novel, latents, prompts) if any(novel) else [[] for _ in images]
        return [[{**b, "labeller": "detector"} for b in d] + h for d, h in zip(from_detector, from_head)]


def _head_folder(cfg) -> str:
    # annotation.head is the field for it; before the config has one, annotation.model may name it.
    return getattr(cfg, "head", "") or cfg.model


@register_labeller(HEAD_LABELLER)
def _build_head_labeller(cfg, categories: list[str]) -> GroundingHeadLabeller:
    return GroundingHeadLabeller(_head_folder(cfg), cfg.beta, cfg.nms_iou, cfg.max_per_category)


@register_labeller("teacher+head")
def _build_teacher_plus_head(cfg, categories: list[str]) -> TeacherPlusHeadLabeller:
    return TeacherPlusHeadLabeller(cfg, categories)
