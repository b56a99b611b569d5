"""Annotation: labellers put boxes on generated images.

One registry, `LABELLERS`, holds every kind of labeller by name; `build_labeller` is the one place
they are built from config. A labeller takes images and, per image, the categories its prompt
named, and returns boxes of those categories only: the prompt says what is in the picture, the
labeller says where:

- "detector": a teacher detector for base categories (score >= alpha), built by the detector
  builder (engine.models.detectors), so any detector folder the project trains can label;
- "grounding_head": every prompted category boxed by the grounding head (score >= beta);
- "teacher+head": the categories the head was trained on as base go to the teacher, the others
  (novel) to the head, as the paper generates its synthetic dataset; each box says which made it;
- "owlv2" / "grounding_dino": every prompted category boxed by a zero-shot open-vocabulary
  detector loaded from `annotation.open_vocab` (engine.models.open_vocab; score >= box_threshold):
  the auto-labelling most teams use, the baseline InstaGen's head is compared against;
- "layout": the boxes of the layout GLIGEN drew the image from (engine.generation.layouts);
- "layout+detector": those boxes, each kept only where the teacher agrees (Gen2Det's check);
- "none": images and latents without boxes (novel images for the head's self-training).

The head reads UNet features, not pixels: it needs each image's stored latent (the input of the
last denoising step) and prompt, so its `label` takes them as keyword arguments; images only give
the size to scale boxes to.
"""
from __future__ import annotations

import io
import json
import os
from typing import Callable, Optional, Protocol

import numpy as np
import torch
from PIL import Image

from engine.config import AnnotationConfig, ModelConfig, TinyDetectorConfig, from_dict
from engine.errors import UserError
from engine.generation.layouts import Layout
from engine.data.categories import normalise_name
from engine.models.boxes import box_iou, clip_box, nms
from engine.models.detectors import DetectorError, build_detector, load_detector
from engine.models.diffusion import load_pipeline
from engine.models.grounding.features import Featurizer
from engine.models.grounding.head import load_grounding_head, predictions
from engine.models.open_vocab import KINDS as OPEN_VOCAB, OpenVocabError, check_open_vocab_folder, load_open_vocab
from engine.runtime.faults import maybe_crash

BOX_FORMAT = "xyxy in pixels, origin at the top-left corner"


class AnnotationError(UserError, ValueError):
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
    if not 0 <= cfg.verify_iou <= 1:
        raise AnnotationError(f"annotation.verify_iou must lie in [0, 1], got {cfg.verify_iou}")
    if cfg.labeller in OPEN_VOCAB:
        try:  # from config.json and the file list alone: cheap enough before Ray starts
            check_open_vocab_folder(cfg.labeller, cfg.open_vocab)
        except OpenVocabError as e:
            raise AnnotationError(str(e)) from None
        return  # annotation.model (the teacher) is not used
    if cfg.model != "tiny" and not os.path.isdir(cfg.model) and cfg.labeller not in ("grounding_head", "none", "layout"):
        raise AnnotationError(f"annotation.model {cfg.model!r} is not a local folder; point it at a "
                              f"detector saved with save_pretrained, or use 'tiny'")


def build_labeller(cfg: AnnotationConfig, categories: list[str]) -> Labeller:
    check_labeller(cfg)
    return LABELLERS[cfg.labeller](cfg, categories)


# The tiny random teacher of the embedded default: its boxes mean nothing.
TINY_TEACHER = TinyDetectorConfig(decoder_layers=1, num_feature_levels=1)


@register_labeller("detector")
class DetectorLabeller:
    """A closed-set detector, loaded as it was saved (its own kind and labels) through the detector
    builder, or a tiny random DETR. Its label names are matched to category names, ignoring case."""

    name = "detector"

    def __init__(self, cfg: AnnotationConfig, categories: list[str]):
        self.alpha, self.nms_iou, self.max_per_category = cfg.alpha, cfg.nms_iou, cfg.max_per_category
        try:
            if cfg.model == "tiny":
                self.detector = build_detector("detr", "tiny", categories, image_size=64, tiny=TINY_TEACHER)
            else:
                self.detector = load_detector(cfg.model)
        except DetectorError as e:
            raise AnnotationError(f"could not load the teacher detector in {cfg.model!r}: {e}") from e
        self.detector.model.eval().to("cuda" if torch.cuda.is_available() else "cpu")
        by_name = {c.lower(): c for c in categories}
        self.to_category = {n: by_name[n.lower()] for n in self.detector.categories if n.lower() in by_name}
        if not self.to_category:
            raise AnnotationError(
                f"the detector in {cfg.model!r} knows none of the categories to label "
                f"({', '.join(categories[:5])}...); its labels are {', '.join(self.detector.categories[:8])}...")

    def label(self, images: list[np.ndarray], categories: list[list[str]]) -> list[list[dict]]:
        found = self.detector.predict([Image.fromarray(np.asarray(im)) for im in images], threshold=self.alpha)
        labelled = []
        for boxes, wanted in zip(found, categories):
            kept = [{"bbox": [round(v, 2) for v in b["bbox"]], "category": self.to_category[b["category"]],
                     "score": round(b["score"], 4)}
                    for b in boxes if self.to_category.get(b["category"]) in wanted]
            labelled.append(per_category_nms(kept, self.nms_iou, self.max_per_category))
        return labelled


class OpenVocabLabeller:
    """A zero-shot detector (OWLv2 or GroundingDINO, engine.models.open_vocab) asked, per image,
    for the categories its prompt named, by their prompt names ("bat" for "bat_(animal)"); a box
    takes the name it matched, as the category's dataset name. Boxes at score >= box_threshold,
    then per-category NMS as the other labellers'."""

    def __init__(self, cfg: AnnotationConfig, categories: list[str]):
        self.name = cfg.labeller
        try:
            self.detector = load_open_vocab(cfg.labeller, cfg.open_vocab)
        except OpenVocabError as e:
            raise AnnotationError(str(e)) from None
        self.box_threshold, self.text_threshold = cfg.box_threshold, cfg.text_threshold
        self.nms_iou, self.max_per_category = cfg.nms_iou, cfg.max_per_category

    def label(self, images: list[np.ndarray], categories: list[list[str]]) -> list[list[dict]]:
        wanted = [list(dict.fromkeys(c)) for c in categories]
        names = [[normalise_name(c)[0] for c in cats] for cats in wanted]
        found = self.detector.detect([np.asarray(im) for im in images], names, self.box_threshold, self.text_threshold)
        labelled = []
        for cats, boxes in zip(wanted, found):
            kept = []
            for box, k, score in boxes:
                x0, y0, x1, y1 = (round(v, 2) for v in box)
                if x1 > x0 and y1 > y0:  # a box of less than a hundredth of a pixel is none
                    kept.append({"bbox": [x0, y0, x1, y1], "category": cats[k], "score": round(score, 4),
                                 "labeller": self.name})
            labelled.append(per_category_nms(kept, self.nms_iou, self.max_per_category))
        return labelled


for _kind in OPEN_VOCAB:
    register_labeller(_kind)(OpenVocabLabeller)


def per_category_nms(boxes: list[dict], iou: float, per_category: int = 0) -> list[dict]:
    """The boxes that no higher-scoring box of the same category overlaps by more than iou (iou 1
    keeps all), at most `per_category` of each category (0 = all), best first."""
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


@register_labeller("layout")
class LayoutLabeller:
    """The boxes the image was drawn from (layout rows, engine.generation.layouts): each layout box,
    scaled to the image, is a label of score 1. GLIGEN was told to put the object there; whether
    it did is what verification (a detector's agreement) checks."""

    name = "layout"
    needs_layout = True  # the Annotator passes layouts= (each sample's Layout)

    def __init__(self, cfg: AnnotationConfig, categories: list[str]):
        pass

    def label(self, images: list[np.ndarray], categories: list[list[str]], layouts=None) -> list[list[dict]]:
        if layouts is None:
            raise AnnotationError("annotation.labeller=layout labels layout rows only; set layout.annotations "
                                  "or choose another labeller")
        out = []
        for image, lay in zip(images, layouts):
            h, w = image.shape[:2]
            out.append([{"bbox": [round(b[0] * w, 2), round(b[1] * h, 2), round(b[2] * w, 2), round(b[3] * h, 2)],
                         "category": label, "score": 1.0} for b, label in zip(lay.boxes, lay.labels)])
        return out


# Why verification refused a layout box (counted per reason in the manifest).
NOT_DETECTED = "no detection of its category"
MISPLACED = "detections of its category elsewhere"


@register_labeller("layout+detector")
class VerifiedLayoutLabeller:
    """Layout boxes checked by the teacher detector, as Gen2Det does: a layout box is kept only
    where a detection of the same category (score >= alpha) overlaps it by IoU >= verify_iou.
    A refused box is returned with `refused` set to the reason, so the sample's record keeps it
    apart from its labels: never silently dropped."""

    name = "layout"
    needs_layout = True

    def __init__(self, cfg: AnnotationConfig, categories: list[str]):
        self.layout = LayoutLabeller(cfg, categories)
        self.detector = DetectorLabeller(cfg, categories)
        self.iou = cfg.verify_iou

    def label(self, images: list[np.ndarray], categories: list[list[str]], layouts=None) -> list[list[dict]]:
        planned = self.layout.label(images, categories, layouts)
        found = self.detector.label(images, categories)
        out = []
        for boxes, detections in zip(planned, found):
            checked = []
            for b in boxes:
                same = [d for d in detections if d["category"] == b["category"]]
                best = float(box_iou(torch.tensor([b["bbox"]]), torch.tensor([d["bbox"] for d in same])).max()) if same else 0.0
                if best >= self.iou:
                    checked.append(b)
                else:
                    checked.append({**b, "refused": MISPLACED if same else NOT_DETECTED, "iou": round(best, 4)})
            out.append(checked)
        return out


HEAD_LABELLER = "grounding_head"


class GroundingHeadLabeller:
    name = HEAD_LABELLER
    needs_latents = True  # the Annotator passes latents= and prompts= (see module docstring)

    def __init__(self, folder: str, beta: float, nms_iou: float = 0.7, max_per_category: int = 0,
                 device: Optional[str] = None):
        if not folder or not os.path.isdir(folder):
            raise AnnotationError(f"grounding head folder {folder!r} does not exist; set annotation.head to the "
                                  f"output folder of `instagen train-grounding`")
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


class Annotator:
    """A Ray Data actor: labels the images of a shard row (see Synthesizer) and adds each sample's
    JSON record. It labels the JPEG as stored, the image every later reader sees, a batch of
    `annotation.batch_size` images at a time."""

    def __init__(self, cfg: AnnotationConfig, categories: list[str], threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.labeller = build_labeller(cfg, categories)
        self.batch_size = cfg.batch_size
        self.batches = 0

    def __call__(self, row: dict) -> dict:
        ok = [i for i, s in enumerate(row["status"]) if s == "ok"]
        found: dict[int, list[dict]] = {}
        for start in range(0, len(ok), self.batch_size):
            chunk = ok[start:start + self.batch_size]
            found.update(zip(chunk, self.label_batch(row, chunk)))
        records = []  # "" for a dropped sample, which is never written
        for i in range(len(row["id"])):
            if i not in found:
                records.append("")
                continue
            boxes, (h, w) = found[i]
            # A layout row records where its layout came from (source image, boxes, jitter drawn),
            # and the layout boxes verification refused, with the reason (labeller layout+detector).
            extra = {"layout": json.loads(row["layout"][i])["source"]} if "layout" in row else {}
            if "expansion" in row:  # the prompt was written by the language model (or fell back)
                expansion = json.loads(row["expansion"][i])
                extra["template_prompt"] = expansion.pop("template")
                extra["expansion"] = {"status": expansion["status"], "tries": expansion["tries"]}
            refused = [{"bbox": b["bbox"], "category": b["category"], "reason": b["refused"], "iou": b["iou"]}
                       for b in boxes if "refused" in b]
            if refused:
                extra["refused"] = refused
                boxes = [b for b in boxes if "refused" not in b]
            records.append(json.dumps({
                "id": int(row["id"][i]), "prompt": str(row["text"][i]), "categories": json.loads(row["categories"][i]),
                "seed": int(row["seed"][i]), "seed_used": int(row["seed_used"][i]),
                "model_id": str(row["model_id"]),
                # the index in `models` of the generator that drew it (a build with several only)
                **({"generator": int(row["generator"])} if "generator" in row else {}),
                "width": int(w), "height": int(h),
                "box_format": BOX_FORMAT, **columns(boxes), **extra}))
        return {**row, "json": records}

    def label_batch(self, row: dict, chunk: list[int]) -> list[tuple[list[dict], tuple[int, int]]]:
        """Per sample of the chunk: its boxes, clipped to the image, and the image's (height, width)."""
        self.batches += 1
        maybe_crash("annotation", self.batches)
        images = [np.asarray(Image.open(io.BytesIO(row["jpg"][i])).convert("RGB")) for i in chunk]
        extra = {}
        if getattr(self.labeller, "needs_latents", False):  # the grounding head reads UNet features
            extra = {"latents": [np.load(io.BytesIO(row["latent"][i]), allow_pickle=False) for i in chunk],
                     "prompts": [str(row["text"][i]) for i in chunk]}
        if getattr(self.labeller, "needs_layout", False):
            if "layout" not in row:
                raise AnnotationError("annotation.labeller=layout labels layout rows only; set layout.annotations "
                                      "or choose another labeller")
            extra["layouts"] = [Layout.from_json(row["layout"][i]) for i in chunk]
        found = self.labeller.label(images, [json.loads(row["categories"][i]) for i in chunk], **extra)
        out = []
        for image, boxes in zip(images, found):
            h, w = image.shape[:2]
            kept = []
            for b in boxes:
                clipped = clip_box(b["bbox"], w, h)
                if clipped:
                    kept.append({**b, "bbox": clipped, "labeller": b.get("labeller", self.labeller.name)})
            out.append((kept, (h, w)))
        return out


class RecordStage:
    """Base of the Ray Data actors that rework each annotated sample's JSON record after the
    Annotator (masks, the CLIP filter): `update(record, jpeg)` returns the new record, from the
    JPEG as stored, the image every later reader sees. Dropped samples ("") pass untouched."""

    def __init__(self, threads: int = 0):
        if threads:
            torch.set_num_threads(threads)

    def update(self, record: dict, jpeg: bytes) -> dict:
        raise NotImplementedError

    def __call__(self, row: dict) -> dict:
        records = list(row["json"])
        for i, record in enumerate(records):
            if record:
                records[i] = json.dumps(self.update(json.loads(record), row["jpg"][i]))
        return {**row, "json": records}


def columns(boxes: list[dict]) -> dict[str, list]:
    """A sample's boxes as the parallel lists its JSON record holds."""
    return {"boxes": [b["bbox"] for b in boxes], "labels": [b["category"] for b in boxes],
            "scores": [b["score"] for b in boxes], "labellers": [b["labeller"] for b in boxes]}
