"""The image-text scorer of the quality filter: CLIP (transformers' CLIPModel + CLIPProcessor), the
one place it is built.

`build_clip(model)` loads a local folder saved with `CLIPModel.save_pretrained` and
`CLIPProcessor.save_pretrained`, or builds a tiny randomly initialised CLIP ("tiny": its scores are
noise; it proves that the stage connects, as the tiny generator, teacher and segmenter do). No hub
is contacted: a folder loads with `local_files_only=True`.

A score is the cosine similarity of CLIP's projected image and text embeddings, in [-1, 1]: the
number CLIPScore (Hessel et al., 2021) is built on, without its 2.5 rescaling or CLIP's learned
logit scale, so a threshold reads the same whatever the model's temperature. For OpenAI's CLIP
ViT-B/32 and ViT-L/14, an image and a caption that match score about 0.25-0.35, unrelated ones
about 0.1-0.15.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch
from PIL import Image

from engine.errors import UserError

# How a category is put to CLIP: the prompt CLIP's authors use for zero-shot classification.
CATEGORY_TEXT = "a photo of a {}"


class ClipError(UserError, RuntimeError):
    pass


def tiny_clip(seed: int = 0):
    """A randomly initialised CLIPModel (32-pixel images, 32-wide towers of one layer) and its
    processor: CLIP's image processor and the character-level CLIP tokenizer of the tiny Stable
    Diffusion (engine.models.diffusion.tiny_tokenizer), so that nothing is downloaded."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from engine.models.diffusion import tiny_tokenizer

    tokenizer = tiny_tokenizer(64)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37,
                     "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 64,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 1, "num_attention_heads": 4},
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer=tokenizer)
    return model.eval(), processor


def check_clip_folder(model: str) -> None:
    """Refuse, from its config.json alone, a `filter.model` that is no local CLIP folder: cheap
    enough for the driver's pre-flight, before Ray starts or anything is written."""
    if model == "tiny":
        return
    config = os.path.join(os.path.expanduser(model), "config.json")
    fix = ("save one with CLIPModel.save_pretrained and CLIPProcessor.save_pretrained "
           "(or huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR), or use 'tiny'")
    if not os.path.isfile(config):
        raise ClipError(f"filter.model {model!r} is not a CLIP folder (no config.json); {fix}")
    try:
        with open(config) as f:
            kind = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise ClipError(f"filter.model {model!r}: its config.json is not a JSON object; {fix}") from None
    if kind != "clip":
        raise ClipError(f"filter.model {model!r} holds a {kind or 'model of no model_type'!s}, not a CLIP model "
                        f"(model_type 'clip'); {fix}")


def build_clip(model: str, seed: int = 0, device: Optional[str] = None) -> "ClipScorer":
    if model == "tiny":
        clip, processor = tiny_clip(seed)
    else:
        check_clip_folder(model)
        from transformers import CLIPModel, CLIPProcessor
        folder = os.path.expanduser(model)
        try:
            clip = CLIPModel.from_pretrained(folder, local_files_only=True)
            processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ClipError(f"could not load the CLIP in {model!r} ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:200]}); it needs the model's config.json and "
                            f"safetensors weights and the processor's files (CLIPProcessor.save_pretrained)") from None
    return ClipScorer(clip, processor, device)


class ClipScorer:
    def __init__(self, model, processor, device: Optional[str] = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval().to(self.device)
        self.processor = processor

    @torch.no_grad()
    def scores(self, images: Sequence[Image.Image], categories: Sequence[str],
               template: str = CATEGORY_TEXT) -> torch.Tensor:
        """(images, categories): the cosine similarity of each image with each category's text
        (`template` with the name in its {} or {name})."""
        texts = [template.format(c, name=c) for c in categories]
        inputs = self.processor(text=texts, images=list(images), return_tensors="pt", padding=True, truncation=True)
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        # CLIPModel returns both embeddings already L2-normalised: their product is the cosine.
        return (out.image_embeds @ out.text_embeds.T).float().cpu()
