"""The promptable segmenter: SAM (transformers' SamModel + SamProcessor), the one place it is built.

`build_segmenter(model)` loads a local folder saved with `SamModel.save_pretrained` and
`SamProcessor.save_pretrained`, or builds a tiny randomly initialised SAM ("tiny": its masks are
noise; it proves that the stage connects, as the tiny generator and teacher do). Two ways to
prompt it:

- `segment_boxes(image, boxes)`: one mask per box, each box its own prompt (the usual way);
- `segment_background(image)`: DiverGen's SAM-bg for an object drawn alone on a plain background:
  the image's four corners prompt the background, and the object is its complement. Box prompts
  on such images catch parts of the object; the background is one easy region.

Each mask comes with SAM's own IoU prediction, the quality the mask stage records and filters on.

`build_segmenter("colour")` is a classical segmenter with the same two calls, for objects on a plain
background (the toy world, whose generator draws single objects on plain pictures and where no
SAM checkpoint exists): a pixel is the object where its colour lies far from the background's.
Its score is how plain the background around the prompt is, not a predicted IoU.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from engine.errors import UserError


class SegmenterError(UserError, RuntimeError):
    pass


# The tiny SAM: 64-pixel inputs, 8x8 image embeddings, about 40k parameters.
TINY_SAM = {
    "vision_config": {"hidden_size": 32, "output_channels": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "image_size": 64, "patch_size": 8, "window_size": 4, "global_attn_indexes": [1],
                      "mlp_dim": 64, "num_pos_feats": 8},
    "prompt_encoder_config": {"hidden_size": 16, "image_size": 64, "patch_size": 8, "mask_input_channels": 4},
    "mask_decoder_config": {"hidden_size": 16, "mlp_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                            "iou_head_hidden_dim": 16},
}


def tiny_sam(seed: int = 0):
    """A randomly initialised SamModel of TINY_SAM's sizes and its processor (64-pixel inputs)."""
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil
    torch.manual_seed(seed)
    model = SamModel(SamConfig(**TINY_SAM))
    size = TINY_SAM["vision_config"]["image_size"]
    processor = SamProcessor(image_processor=SamImageProcessorPil(
        size={"longest_edge": size}, pad_size={"height": size, "width": size}))
    return model, processor


def build_segmenter(model: str, seed: int = 0, device: Optional[str] = None) -> "Segmenter | ColourSegmenter":
    if model == "colour":
        return ColourSegmenter()
    if model == "tiny":
        sam, processor = tiny_sam(seed)
    else:
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise SegmenterError(f"masks.model {model!r} is not a SAM folder (no config.json); save one with "
                                 f"SamModel.save_pretrained and SamProcessor.save_pretrained, or use 'tiny'")
        from transformers import SamModel, SamProcessor
        try:
            sam = SamModel.from_pretrained(model, local_files_only=True)
            processor = SamProcessor.from_pretrained(model, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise SegmenterError(f"could not load the SAM in {model!r} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]}); it needs the model's config.json and weights "
                                 f"and the processor's processor_config.json") from None
    return Segmenter(sam, processor, device)


class Segmenter:
    def __init__(self, model, processor, device: Optional[str] = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval().to(self.device)
        self.processor = processor

    @torch.no_grad()
    def segment_boxes(self, image: np.ndarray, boxes: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
        """Per xyxy pixel box: a boolean (h, w) mask and SAM's predicted IoU. One mask per prompt
        (multimask_output=False), as SAM's authors advise for unambiguous box prompts."""
        h, w = image.shape[:2]
        if not boxes:
            return np.zeros((0, h, w), dtype=bool), np.zeros((0,), dtype=np.float32)
        inputs = self.processor(images=[image], input_boxes=[[list(map(float, b)) for b in boxes]], return_tensors="pt")
        out = self.model(**_to(inputs, self.device), multimask_output=False)
        masks = self._upscale(out.pred_masks, inputs)[:, 0]  # (boxes, h, w)
        return masks, out.iou_scores[0, :, 0].float().cpu().numpy()

    @torch.no_grad()
    def segment_background(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """SAM-bg: the corners are background points; of SAM's three masks the one it rates best
        is the background, and the object is what it leaves."""
        h, w = image.shape[:2]
        corners = [[0.0, 0.0], [w - 1.0, 0.0], [0.0, h - 1.0], [w - 1.0, h - 1.0]]
        inputs = self.processor(images=[image], input_points=[[corners]], input_labels=[[[1, 1, 1, 1]]],
                                return_tensors="pt")
        out = self.model(**_to(inputs, self.device), multimask_output=True)
        masks = self._upscale(out.pred_masks, inputs)[0]  # (3, h, w)
        scores = out.iou_scores[0, 0].float().cpu().numpy()
        best = int(np.argmax(scores))
        return ~masks[best], float(scores[best])

    def _upscale(self, pred_masks: torch.Tensor, inputs) -> np.ndarray:
        """SAM's low-resolution logits back to the image's size, thresholded at 0."""
        masks = self.processor.post_process_masks(pred_masks.float().cpu(), inputs["original_sizes"],
                                                  inputs["reshaped_input_sizes"])
        return masks[0].numpy().astype(bool)


class ColourSegmenter:
    """Object = the pixels whose colour lies far from the background's: the median of a one-pixel
    ring (the image's border for the background prompt; just outside the box for a box prompt).
    "Far" is half the object's distance from it (the 99th percentile inside the prompt), at least
    MIN_CONTRAST: a blurred edge is cut half-way between the two colours, a square that fills its
    box is kept whole, and a prompt holding no object gives an empty mask. The score is the ring's
    share of pixels within MIN_CONTRAST of its median: 1 on a plain background, low where the ring
    crosses clutter."""

    MIN_CONTRAST = 40.0  # RGB Euclidean distance; the toy world's JPEG noise stays well below it

    def segment_boxes(self, image: np.ndarray, boxes: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        masks, scores = np.zeros((len(boxes), h, w), dtype=bool), np.zeros((len(boxes),), dtype=np.float32)
        for i, box in enumerate(boxes):
            x0, y0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
            x1, y1 = min(int(np.ceil(box[2])), w), min(int(np.ceil(box[3])), h)
            if x1 <= x0 or y1 <= y0:
                continue
            # The rows and columns just outside the box; where the box meets the image's edge that
            # side has none (clipping it in would count the object's own edge as background).
            cols, rows = slice(max(x0 - 1, 0), min(x1 + 1, w)), slice(max(y0 - 1, 0), min(y1 + 1, h))
            sides = [image[y0 - 1, cols]] if y0 > 0 else []
            sides += [image[y1, cols]] if y1 < h else []
            sides += [image[rows, x0 - 1]] if x0 > 0 else []
            sides += [image[rows, x1]] if x1 < w else []
            ring = (np.concatenate(sides) if sides else _ring(image, x0, y0, x1, y1)).astype(np.float32)
            masks[i, y0:y1, x0:x1], scores[i] = self._split(image[y0:y1, x0:x1], ring)
        return masks, scores

    def segment_background(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        h, w = image.shape[:2]
        return self._split(image, _ring(image, 0, 0, w, h))

    def _split(self, region: np.ndarray, ring: np.ndarray) -> tuple[np.ndarray, float]:
        background = np.median(ring, axis=0)
        score = float((np.linalg.norm(ring - background, axis=1) < self.MIN_CONTRAST).mean())
        distance = np.linalg.norm(region.astype(np.float32) - background, axis=-1)
        return distance > max(0.5 * np.percentile(distance, 99), self.MIN_CONTRAST), score


def _ring(image: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """The pixels (n, 3) on the edge of the rectangle [x0, x1) x [y0, y1)."""
    edge = [image[y0, x0:x1], image[y1 - 1, x0:x1], image[y0:y1, x0], image[y0:y1, x1 - 1]]
    return np.concatenate(edge).reshape(-1, image.shape[-1]).astype(np.float32)


def _to(inputs, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
