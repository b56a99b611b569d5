"""Zero-shot (open-vocabulary) detectors: OWLv2 and GroundingDINO from transformers, the one place
they are built.

`load_open_vocab(kind, folder)` loads a local folder saved with `save_pretrained` of the model and
its processor:

- "owlv2": `Owlv2ForObjectDetection` + `Owlv2Processor` (e.g. google/owlv2-base-patch16-ensemble);
- "grounding_dino": `GroundingDinoForObjectDetection` + `GroundingDinoProcessor`
  (e.g. IDEA-Research/grounding-dino-tiny).

No hub is contacted (`local_files_only=True`) and weights load from safetensors only, never a
pickle. `check_open_vocab_folder` refuses a folder that is not that model from its config.json and
file list alone: cheap enough for the driver's pre-flight, before Ray starts or anything is written.

`detect(images, names)` boxes, in each image, the names asked of it (any names: that is what
open-vocabulary means), and returns per image (xyxy pixel box, index into that image's names,
score). How each model is asked:

- OWLv2: one text query per name, "a photo of a {name}" (CLIP's zero-shot prompt, engine.models.clip);
  each of its patch boxes takes the query it scores highest, score = sigmoid of that logit.
- GroundingDINO: the names in one caption, lower case, "cat. red car." (its authors' format);
  each query box takes the name whose tokens it scores highest (score = that name's best token),
  kept where the mean over that name's tokens reaches `text_threshold` too.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np
import torch

from engine.errors import UserError
from engine.models.boxes import clip_box

# The labeller kind -> (config.json model_type, model class, processor class, how to get one).
KINDS = {
    "owlv2": ("owlv2", "Owlv2ForObjectDetection", "Owlv2Processor",
              "google/owlv2-base-patch16-ensemble"),
    "grounding_dino": ("grounding-dino", "GroundingDinoForObjectDetection", "GroundingDinoProcessor",
                       "IDEA-Research/grounding-dino-tiny"),
}
# How a name is put to OWLv2 (the prompt CLIP's authors use for zero-shot classification).
OWL_TEXT = "a photo of a {}"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
# Without one, transformers 5 builds a tokenizer of an empty vocabulary rather than failing.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")


class OpenVocabError(UserError, RuntimeError):
    pass


def _fix(kind: str) -> str:
    _, model_cls, processor_cls, example = KINDS[kind]
    return (f"save one with {model_cls}.save_pretrained(DIR, safe_serialization=True) and "
            f"{processor_cls}.save_pretrained(DIR) (or huggingface-cli download {example} --local-dir DIR), "
            f"and set annotation.open_vocab=DIR")


def check_open_vocab_folder(kind: str, folder: str, setting: str = "annotation.open_vocab") -> None:
    """Refuse a folder that is not a saved `kind` model: missing, no config.json, another
    model_type, no safetensors weights (a pickle is never loaded), no processor or tokenizer files."""
    if kind not in KINDS:
        raise OpenVocabError(f"unknown open-vocabulary detector {kind!r}; choose one of {', '.join(sorted(KINDS))}")
    model_type, model_cls, _, _ = KINDS[kind]
    fix = _fix(kind)
    if not folder:
        raise OpenVocabError(f"annotation.labeller={kind} needs the detector's folder, and {setting} is not set; {fix}")
    path = os.path.expanduser(folder)
    if not os.path.isdir(path):
        raise OpenVocabError(f"{setting} {folder!r} is not a local folder; {fix}")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise OpenVocabError(f"{setting} {folder!r} is not a {model_cls} folder (no config.json); {fix}")
    try:
        with open(config) as f:
            found = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise OpenVocabError(f"{setting} {folder!r}: its config.json is not a JSON object; {fix}") from None
    if found != model_type:
        raise OpenVocabError(f"{setting} {folder!r} holds a {found or 'model of no model_type'!s}, not a {model_cls} "
                             f"(model_type {model_type!r}) as annotation.labeller={kind} needs; {fix}")
    if not any(os.path.isfile(os.path.join(path, w)) for w in WEIGHTS):
        pickles = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json") if os.path.isfile(os.path.join(path, n))]
        why = f"its weights are a pickle ({pickles[0]}), which is never loaded" if pickles else "it holds no weights"
        raise OpenVocabError(f"{setting} {folder!r}: {why}; it needs model.safetensors: {fix}")
    if not any(os.path.isfile(os.path.join(path, p)) for p in PROCESSOR_FILES):
        raise OpenVocabError(f"{setting} {folder!r} has the model but not its processor (no processor_config.json "
                             f"or preprocessor_config.json); {fix}")
    if not any(os.path.isfile(os.path.join(path, t)) for t in TOKENIZER_FILES):
        raise OpenVocabError(f"{setting} {folder!r} has no tokenizer ({', '.join(TOKENIZER_FILES)}: none there), "
                             f"so its names cannot be read; {fix}")


def load_open_vocab(kind: str, folder: str, device: Optional[str] = None) -> "OpenVocabDetector":
    check_open_vocab_folder(kind, folder)
    import transformers
    _, model_cls, processor_cls, _ = KINDS[kind]
    path = os.path.expanduser(folder)
    try:
        model, info = getattr(transformers, model_cls).from_pretrained(
            path, local_files_only=True, use_safetensors=True, output_loading_info=True)
        processor = getattr(transformers, processor_cls).from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        raise OpenVocabError(f"could not load the {model_cls} in {folder!r} ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:200]}); it needs the model's config.json and "
                             f"safetensors weights and the processor's files (tokenizer included): "
                             f"{_fix(kind)}") from None
    # transformers fills weights missing from the file (or of other shapes) with random ones and
    # only logs it: such a detector would label with noise.
    bad = list(info.get("missing_keys") or []) + [k[0] if isinstance(k, tuple) else k
                                                   for k in info.get("mismatched_keys") or []]
    if bad:
        raise OpenVocabError(f"could not load the {model_cls} in {folder!r}: its weights file lacks or misfits "
                             f"{len(bad)} of the model's weights ({', '.join(sorted(map(str, bad))[:3])}...), "
                             f"so they would be random; {_fix(kind)}")
    return OpenVocabDetector(kind, model, processor, device)


class OpenVocabDetector:
    def __init__(self, kind: str, model, processor, device: Optional[str] = None):
        self.kind = kind
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval().to(self.device)
        self.processor = processor

    @torch.no_grad()
    def detect(self, images: Sequence[np.ndarray], names: Sequence[Sequence[str]], box_threshold: float,
               text_threshold: float = 0.25) -> list[list[tuple[list[float], int, float]]]:
        """Per image (HxWx3 uint8): [(xyxy pixel box, index into its names, score)], score >=
        box_threshold. Images asked no names get no boxes, and no forward pass."""
        out: list[list] = [[] for _ in images]
        asked = [i for i, n in enumerate(names) if n]
        if asked:
            run = self._owlv2 if self.kind == "owlv2" else self._grounding_dino
            found = run([np.asarray(images[i]) for i in asked], [list(names[i]) for i in asked],
                        box_threshold, text_threshold)
            for i, boxes in zip(asked, found):
                out[i] = boxes
        return out

    def _owlv2(self, images, names, box_threshold, text_threshold):
        queries = [[OWL_TEXT.format(n) for n in ns] for ns in names]
        inputs = self.processor(text=queries, images=images, return_tensors="pt", truncation=True)
        res = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        logits = res.logits.float().cpu()  # (images, boxes, most queries of an image)
        boxes = res.pred_boxes.float().cpu()  # cx, cy, w, h of the padded square image, in [0, 1]
        found = []
        for b, (image, ns) in enumerate(zip(images, names)):
            h, w = image.shape[:2]
            scores, which = logits[b, :, :len(ns)].sigmoid().max(dim=-1)  # queries padded for the batch left out
            # OWLv2 pads each image at the bottom and right to a square before resizing it.
            found.append(_keep(boxes[b], scores, which, box_threshold, max(h, w), max(h, w), w, h))
        return found

    def _grounding_dino(self, images, names, box_threshold, text_threshold):
        captions, spans = [], []
        for ns in names:
            parts = [" ".join(n.lower().split()) for n in ns]
            starts = np.cumsum([0] + [len(p) + 2 for p in parts[:-1]]).tolist()  # "a. b." parts
            captions.append(". ".join(parts) + ".")
            spans.append([(s, s + len(p)) for s, p in zip(starts, parts)])
        tok = self.processor.tokenizer(captions, padding=True, truncation=True, max_length=self.model.config.max_text_len,
                                       return_offsets_mapping=True, return_token_type_ids=True, return_tensors="pt")
        offsets = tok.pop("offset_mapping")
        pixels = self.processor.image_processor(images, return_tensors="pt")
        res = self.model(pixel_values=pixels["pixel_values"].to(self.device),
                         pixel_mask=pixels["pixel_mask"].to(self.device),
                         **{k: v.to(self.device) for k, v in tok.items()})
        probs = res.logits.float().cpu().sigmoid()  # (images, queries, max_text_len)
        boxes = res.pred_boxes.float().cpu()  # cx, cy, w, h of the image, in [0, 1]
        found = []
        for b, (image, span) in enumerate(zip(images, spans)):
            h, w = image.shape[:2]
            per_name_max, per_name_mean = [], []
            for s, e in span:
                off = offsets[b]
                tokens = ((off[:, 0] >= s) & (off[:, 1] <= e) & (off[:, 1] > off[:, 0])).nonzero().flatten()
                tokens = tokens[tokens < probs.shape[-1]]
                if len(tokens) == 0:  # cut off by max_text_len: this name cannot be found
                    per_name_max.append(torch.full((probs.shape[1],), -1.0))
                    per_name_mean.append(torch.zeros(probs.shape[1]))
                    continue
                p = probs[b][:, tokens]
                per_name_max.append(p.max(dim=-1).values)
                per_name_mean.append(p.mean(dim=-1))
            scores, which = torch.stack(per_name_max, dim=-1).max(dim=-1)
            mean = torch.stack(per_name_mean, dim=-1).gather(-1, which[:, None])[:, 0]
            scores = torch.where(mean >= text_threshold, scores, torch.full_like(scores, -1.0))
            found.append(_keep(boxes[b], scores, which, box_threshold, w, h, w, h))
        return found


def _keep(boxes: torch.Tensor, scores: torch.Tensor, which: torch.Tensor, threshold: float, sx: float, sy: float,
          w: int, h: int) -> list[tuple[list[float], int, float]]:
    """Normalised cxcywh boxes scaled by (sx, sy), clipped to the w x h image: those that score at
    least `threshold` and keep some area, best first."""
    kept = []
    for k in torch.argsort(scores, descending=True, stable=True).tolist():
        score = float(scores[k])
        if score < threshold or score < 0:
            break
        cx, cy, bw, bh = boxes[k].tolist()
        box = clip_box([(cx - bw / 2) * sx, (cy - bh / 2) * sy, (cx + bw / 2) * sx, (cy + bh / 2) * sy], w, h)
        if box:
            kept.append((box, int(which[k]), score))
    return kept
