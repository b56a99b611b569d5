"""Detectors: one registry, `DETECTORS`, and `build_detector`, the one place each kind is built.

    det = build_detector("deformable_detr", "tiny", ["red square", "blue disc"], image_size=64)
    loss = det.model(pixel_values=x, pixel_mask=m, labels=targets).loss   # training
    found = det.predict([pil_image], threshold=0.3)                      # inference
    det.save("outputs/detector")   # a folder the "detector" labeller loads as the teacher

Kinds: `deformable_detr` (default), `detr`, `rt_detr` from transformers configs with a
transformers ResNet backbone (no timm), and `faster_rcnn` (the paper's Faster R-CNN R50-FPN)
from torchvision where torchvision imports (CUDA hosts). `model` is "tiny" (random weights from
`TinyDetectorConfig`, for CPU and tests) or a local folder saved with `save_pretrained`.

Every detector's module takes `forward(pixel_values, pixel_mask, labels)` and returns an output
with `.loss`, where `labels` are transformers-style targets: per image `class_labels` (index
into `categories`) and `boxes` (cx, cy, w, h) normalised by the image's valid (unpadded) region.
Labels are category names: `config.id2label` maps index -> name.

Attention: `attention="project_op"` runs multi-scale deformable attention (Deformable DETR's
encoder and decoder, RT-DETR's decoder) on the project's fused op `engine.ops.ms_deform_attn`
instead of transformers' grid_sample reference. The swap replaces the parameter-free
`MultiScaleDeformableAttention` submodule (transformers' own kernel-hub hook point) in every
attention layer, so weights, checkpoints and saved folders are the same either way.
"""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from engine.config import DETECTOR_ATTENTION as ATTENTION
from engine.config import TinyDetectorConfig
from engine.errors import UserError
from engine.ops import ms_deform_attn
from engine.runtime.storage import atomic_folder

TORCHVISION_MISSING = ("torchvision is not importable on this host (CPU build machines cannot install "
                       "it); use deformable_detr, or run on a CUDA host with torchvision")


class DetectorError(UserError, ValueError):
    """A detector config or folder that cannot be built; the message names the fix."""


@dataclass
class Detector:
    """A built detector: the trainable module, its image processor, and its category names."""
    kind: str
    model: nn.Module
    processor: Any  # a transformers image processor (None for faster_rcnn)
    categories: list[str]
    # Whether resizing keeps the aspect ratio (DETR family, padded with a mask) or squashes to a
    # square (RT-DETR, which takes no pixel mask and would otherwise look at padding).
    keep_aspect: bool = True
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @torch.no_grad()
    def predict(self, images: list, threshold: float = 0.05, top_k: int = 100) -> list[list[dict]]:
        """Per PIL image: [{"bbox": xyxy pixels of that image, "category": name, "score"}]."""
        if hasattr(self.model, "predict"):
            return self.model.predict(images, threshold, self)
        self.model.eval()
        device = next(self.model.parameters()).device
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").to(device)
        outputs = self.model(**inputs)
        sizes = [(im.height, im.width) for im in images]
        post = self.processor.post_process_object_detection
        # DETR keeps one box per query (softmax over classes); the sigmoid-scored kinds take top_k.
        extra = {"top_k": top_k} if "top_k" in inspect.signature(post).parameters else {}
        results = post(outputs, threshold=threshold, target_sizes=sizes, **extra)
        found = []
        for res in results:
            found.append([{"bbox": [float(v) for v in box], "category": self.categories[int(lab)],
                           "score": float(score)}
                          for score, lab, box in zip(res["scores"].tolist(), res["labels"].tolist(),
                                                     res["boxes"].tolist())
                          if 0 <= int(lab) < len(self.categories)])
        return found

    def save(self, folder: str, extra_files: Optional[dict[str, str]] = None) -> str:
        """Model + image processor config (+ `extra_files`: name -> text), written to a temporary
        folder then renamed, so the teacher of the generation stage never sees half a detector."""
        with atomic_folder(folder) as tmp:
            if hasattr(self.model, "save_pretrained"):
                self.model.save_pretrained(tmp)
                self.processor.save_pretrained(tmp)
            else:
                self.model.save_folder(tmp)
            for name, text in (extra_files or {}).items():
                with open(os.path.join(tmp, name), "w") as f:
                    f.write(text)
        return os.path.abspath(folder)


DETECTORS: dict[str, Callable[..., Detector]] = {}


def register_detector(name: str):
    def wrap(factory):
        DETECTORS[name] = factory
        return factory
    return wrap


def build_detector(kind: str, model: str, categories: list[str], image_size: int = 64,
                   attention: str = "reference", tiny: Optional[TinyDetectorConfig] = None) -> Detector:
    """The detector of `kind` over `categories`, from "tiny" random weights or a local folder."""
    if kind not in DETECTORS:
        raise DetectorError(f"detector kind {kind!r} is unknown; choose one of {', '.join(sorted(DETECTORS))}")
    if attention not in ATTENTION:
        raise DetectorError(f"detector attention {attention!r} is unknown; choose one of {', '.join(ATTENTION)}")
    if not categories:
        raise DetectorError("a detector needs at least one category")
    if len(set(categories)) != len(categories):
        raise DetectorError(f"detector categories repeat a name: {categories}")
    if model != "tiny" and not os.path.isdir(model):
        raise DetectorError(f"detector model {model!r} is not a local folder; point it at a detector "
                            f"saved with save_pretrained, or use 'tiny'")
    det = DETECTORS[kind](model, list(categories), image_size, tiny or TinyDetectorConfig())
    if attention == "project_op":
        if use_project_attention(det.model) == 0:
            raise DetectorError(f"detector kind {kind!r} has no multi-scale deformable attention; "
                                f"attention=project_op applies to deformable_detr and rt_detr only")
    return det


# transformers' model_type of each kind's saved folder; faster_rcnn folders name their kind.
_KIND_OF_MODEL_TYPE = {"deformable_detr": "deformable_detr", "detr": "detr", "rt_detr": "rt_detr"}


def load_detector(folder: str, attention: str = "reference", image_size: Optional[int] = None) -> Detector:
    """A saved detector as it is: its kind, its categories and (unless `image_size` is given) its
    saved image processor come from the folder, so any detector this project trains can be a
    teacher, and so can a transformers detector saved with save_pretrained."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise DetectorError(f"{folder!r} is not a detector folder ({path} unreadable: {e}); point it at a "
                            f"folder written by `instagen train-detector` or save_pretrained") from None
    if not isinstance(saved, dict):
        raise DetectorError(f"{path} holds no detector config")
    if saved.get("kind") == "faster_rcnn":
        kind, categories = "faster_rcnn", saved.get("categories")
        image_size = image_size or saved.get("image_size")
    else:
        kind = _KIND_OF_MODEL_TYPE.get(saved.get("model_type", ""))
        id2label = saved.get("id2label") or {}
        categories = [id2label[k] for k in sorted(id2label, key=int)] if kind else None
    if kind is None or not categories or not all(isinstance(c, str) for c in categories):
        raise DetectorError(f"{folder!r} holds no detector of a known kind with labels (model_type "
                            f"{saved.get('model_type')!r}); kinds: {', '.join(sorted(DETECTORS))}")
    det = build_detector(kind, folder, categories, image_size or 64, attention)
    if image_size is None and det.processor is not None:
        from transformers import AutoImageProcessor
        det.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        for key, value in _normalisation(det.processor).items():
            setattr(det, key, value)
    return det


# --------------------------------------------------------------------------------------------
# transformers detectors


def _labels(categories: list[str]) -> dict:
    return {"id2label": dict(enumerate(categories)), "label2id": {c: i for i, c in enumerate(categories)}}


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build with a fixed seed without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _from_folder(cls, folder: str, categories: list[str]) -> nn.Module:
    """Weights from a local folder; a head trained on other labels is re-initialised for ours
    (ignore_mismatched_sizes) so a COCO-pretrained detector can be fine-tuned on any category set."""
    try:
        return cls.from_pretrained(folder, local_files_only=True, ignore_mismatched_sizes=True,
                                   **_labels(categories))
    except (OSError, ValueError) as e:
        raise DetectorError(f"could not load a detector from {folder!r}: {e}") from e


def _normalisation(processor) -> dict:
    """The pixel normalisation the processor applies, so training inputs match inference ones."""
    if not getattr(processor, "do_normalize", False):
        return {"image_mean": (0.0, 0.0, 0.0), "image_std": (1.0, 1.0, 1.0)}
    return {"image_mean": tuple(processor.image_mean), "image_std": tuple(processor.image_std)}


def _resnet(tiny: TinyDetectorConfig, out_features: list[str]):
    from transformers import ResNetConfig
    return ResNetConfig(embedding_size=tiny.backbone_hidden_sizes[0], hidden_sizes=tiny.backbone_hidden_sizes,
                        depths=tiny.backbone_depths, layer_type="basic", out_features=out_features)


def _stages(levels: int) -> list[str]:
    if not 1 <= levels <= 3:
        # The ResNet gives at most stages 2-4 (strides 8-32); a 4th level is a strided conv on top.
        levels = min(max(levels, 1), 3)
    return [f"stage{i}" for i in range(5 - levels, 5)]


@register_detector("deformable_detr")
def _deformable_detr(model: str, categories: list[str], image_size: int, tiny: TinyDetectorConfig) -> Detector:
    from transformers import (
        DeformableDetrConfig,
        DeformableDetrForObjectDetection,
        DeformableDetrImageProcessorPil,
    )
    if model == "tiny":
        config = DeformableDetrConfig(
            use_timm_backbone=False, use_pretrained_backbone=False,
            backbone_config=_resnet(tiny, _stages(tiny.num_feature_levels)),
            d_model=tiny.d_model, encoder_layers=tiny.encoder_layers, decoder_layers=tiny.decoder_layers,
            encoder_attention_heads=tiny.heads, decoder_attention_heads=tiny.heads,
            encoder_ffn_dim=tiny.ffn_dim, decoder_ffn_dim=tiny.ffn_dim, num_queries=tiny.num_queries,
            num_feature_levels=tiny.num_feature_levels, encoder_n_points=tiny.n_points,
            decoder_n_points=tiny.n_points, **_labels(categories))
        net = _seeded(tiny.seed, lambda: DeformableDetrForObjectDetection(config))
    else:
        net = _from_folder(DeformableDetrForObjectDetection, model, categories)
    processor = DeformableDetrImageProcessorPil(size={"max_height": image_size, "max_width": image_size})
    return Detector("deformable_detr", net, processor, categories, **_normalisation(processor))


@register_detector("detr")
def _detr(model: str, categories: list[str], image_size: int, tiny: TinyDetectorConfig) -> Detector:
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessorPil
    if model == "tiny":
        config = DetrConfig(
            use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=_resnet(tiny, ["stage4"]),
            d_model=tiny.d_model, encoder_layers=tiny.encoder_layers, decoder_layers=tiny.decoder_layers,
            encoder_attention_heads=tiny.heads, decoder_attention_heads=tiny.heads,
            encoder_ffn_dim=tiny.ffn_dim, decoder_ffn_dim=tiny.ffn_dim, num_queries=tiny.num_queries,
            **_labels(categories))
        net = _seeded(tiny.seed, lambda: DetrForObjectDetection(config))
    else:
        net = _from_folder(DetrForObjectDetection, model, categories)
    processor = DetrImageProcessorPil(size={"max_height": image_size, "max_width": image_size})
    return Detector("detr", net, processor, categories, **_normalisation(processor))


@register_detector("rt_detr")
def _rt_detr(model: str, categories: list[str], image_size: int, tiny: TinyDetectorConfig) -> Detector:
    from transformers import (
        RTDetrConfig,
        RTDetrForObjectDetection,
        RTDetrImageProcessorPil,
        RTDetrResNetConfig,
    )
    if model == "tiny":
        hidden = tiny.backbone_hidden_sizes
        backbone = RTDetrResNetConfig(embedding_size=hidden[0], hidden_sizes=hidden, depths=tiny.backbone_depths,
                                      layer_type="basic", out_features=["stage2", "stage3", "stage4"])
        config = RTDetrConfig(
            use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
            encoder_in_channels=hidden[1:], encoder_hidden_dim=tiny.d_model, d_model=tiny.d_model,
            decoder_in_channels=[tiny.d_model] * 3,
            encoder_ffn_dim=tiny.ffn_dim, decoder_ffn_dim=tiny.ffn_dim, encoder_attention_heads=tiny.heads,
            decoder_attention_heads=tiny.heads, decoder_layers=tiny.decoder_layers,
            num_queries=tiny.num_queries, decoder_n_points=tiny.n_points, num_denoising=tiny.num_denoising,
            **_labels(categories))
        net = _seeded(tiny.seed, lambda: RTDetrForObjectDetection(config))
    else:
        net = _from_folder(RTDetrForObjectDetection, model, categories)
    processor = RTDetrImageProcessorPil(size={"height": image_size, "width": image_size})
    return Detector("rt_detr", net, processor, categories, keep_aspect=False, **_normalisation(processor))


# --------------------------------------------------------------------------------------------
# The project's deformable-attention op inside transformers detectors


class ProjectMSDeformAttn(nn.Module):
    """Drop-in for transformers' MultiScaleDeformableAttention (same forward signature, no
    parameters) that calls the project's fused op."""

    def forward(self, value, value_spatial_shapes, value_spatial_shapes_list, level_start_index,
                sampling_locations, attention_weights, im2col_step):
        return ms_deform_attn(value, value_spatial_shapes.long(), level_start_index.long(),
                              sampling_locations, attention_weights)


def use_project_attention(model: nn.Module) -> int:
    """Swap every MultiScaleDeformableAttention submodule for ProjectMSDeformAttn; returns how
    many were swapped (0 for a detector without deformable attention)."""
    swapped = 0
    for module in model.modules():
        attn = getattr(module, "attn", None)
        if attn is not None and type(attn).__name__ == "MultiScaleDeformableAttention":
            module.attn = ProjectMSDeformAttn()
            swapped += 1
    return swapped


def uses_project_attention(model: nn.Module) -> bool:
    return any(isinstance(m, ProjectMSDeformAttn) for m in model.modules())


# --------------------------------------------------------------------------------------------
# Faster R-CNN (torchvision, CUDA hosts)


@register_detector("faster_rcnn")
def _faster_rcnn(model: str, categories: list[str], image_size: int, tiny: TinyDetectorConfig) -> Detector:
    try:
        from torchvision.models.detection import fasterrcnn_resnet50_fpn
    except Exception as e:  # the CUDA wheels fail in many ways on a CPU torch (ImportError, OSError, RuntimeError)
        raise DetectorError(f"{TORCHVISION_MISSING} ({type(e).__name__}: {e})") from None
    net = FasterRCNNAdapter(fasterrcnn_resnet50_fpn, categories, image_size)
    if model != "tiny":
        net.load_folder(model)
    return Detector("faster_rcnn", net, None, categories)


class FasterRCNNAdapter(nn.Module):
    """torchvision's Faster R-CNN R50-FPN behind the transformers-style interface of this module.

    Inputs arrive normalised (ImageNet mean/std) and padded; torchvision's own transform is set
    to identity normalisation and to the training image size so it does not resize again. Class
    0 is torchvision's background, so category i is label i + 1."""

    FILE = "faster_rcnn.safetensors"

    def __init__(self, factory, categories: list[str], image_size: int):
        super().__init__()
        self.categories = list(categories)
        self.image_size = image_size
        self.net = factory(weights=None, weights_backbone=None, num_classes=len(categories) + 1,
                           min_size=image_size, max_size=image_size,
                           image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])

    def forward(self, pixel_values, pixel_mask=None, labels=None):
        images, targets = [], []
        for i, image in enumerate(pixel_values):
            h, w = _valid_size(pixel_mask[i]) if pixel_mask is not None else image.shape[-2:]
            images.append(image[:, :h, :w])
            if labels is not None:
                cx, cy, bw, bh = labels[i]["boxes"].unbind(-1)
                boxes = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
                targets.append({"boxes": boxes, "labels": labels[i]["class_labels"].long() + 1})
        if labels is None:
            return self.net(images)
        losses = self.net(images, targets)
        return _Output(loss=sum(losses.values()))

    @torch.no_grad()
    def predict(self, images, threshold: float, det: Detector) -> list[list[dict]]:
        import numpy as np
        self.eval()
        device = next(self.parameters()).device
        mean, std = torch.tensor(det.image_mean)[:, None, None], torch.tensor(det.image_std)[:, None, None]
        batch = [((torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
                   - mean) / std).to(device) for im in images]
        found = []
        for res in self.net(batch):
            found.append([{"bbox": [float(v) for v in box], "category": self.categories[int(lab) - 1],
                           "score": float(score)}
                          for box, lab, score in zip(res["boxes"].tolist(), res["labels"].tolist(),
                                                     res["scores"].tolist())
                          if score >= threshold and 1 <= int(lab) <= len(self.categories)])
        return found

    def save_folder(self, folder: str) -> None:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, os.path.join(folder, self.FILE))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"kind": "faster_rcnn", "categories": self.categories, "image_size": self.image_size}, f)

    def load_folder(self, folder: str) -> None:
        from safetensors.torch import load_file
        path = os.path.join(folder, self.FILE)
        if not os.path.exists(path):
            raise DetectorError(f"{folder!r} holds no {self.FILE}; a faster_rcnn folder is written by "
                                f"Detector.save of a faster_rcnn detector")
        self.net.load_state_dict(load_file(path))


@dataclass
class _Output:
    loss: torch.Tensor


def _valid_size(mask: torch.Tensor) -> tuple[int, int]:
    """(height, width) of the unpadded region (padding is bottom/right)."""
    return int(mask.any(dim=1).sum()), int(mask.any(dim=0).sum())
