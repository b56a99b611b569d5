"""The image-to-text model that captions layout images: BLIP-2 (transformers'
`Blip2ForConditionalGeneration`) from a local folder, or a tiny random one built from a config.

As for Stable Diffusion, no hub is contacted: a folder loads with `local_files_only=True` and a hub
id is an error saying how to download it. A tiny random BLIP-2 writes noise captions: it proves
the stage connects, nothing more.
"""
from __future__ import annotations

import os

import torch

from engine.models.checkpoints import ModelLoadError


def build_tiny_captioner(seed: int = 0):
    """A randomly initialised BLIP-2 of tiny size (the sizes of transformers' own BLIP-2 tests)
    and its processor: BLIP's image processor and the character-level CLIP tokenizer of the tiny
    Stable Diffusion (engine.models.diffusion.tiny_tokenizer), so that nothing is downloaded."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    from engine.models.diffusion import tiny_tokenizer

    tokenizer = tiny_tokenizer(64)
    queries = 4
    processor = Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer, num_query_tokens=queries)
    image_token = tokenizer.convert_tokens_to_ids("<image>")  # the processor added it
    config = Blip2Config(
        vision_config=Blip2VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=4, intermediate_size=37).to_dict(),
        qformer_config=Blip2QFormerConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                          intermediate_size=37, max_position_embeddings=64).to_dict(),
        text_config=OPTConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                              ffn_dim=32, max_position_embeddings=128, word_embed_proj_dim=16,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id).to_dict(),
        num_query_tokens=queries, image_token_index=image_token)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config)
    return model.eval(), processor


def load_captioner(source: str, device: str = "cpu"):
    """(model, processor) for `layout.captioner`: "tiny" or a local BLIP-2 folder (model and
    processor, as save_pretrained writes them)."""
    if source == "tiny":
        model, processor = build_tiny_captioner()
        return model.to(device), processor
    folder = os.path.expanduser(source)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        if source.count("/") == 1 and not source.startswith((".", "/", "~")) and not os.path.exists(folder):
            raise ModelLoadError(f"layout.captioner {source!r} looks like a model-hub id, and no hub is reachable from "
                                 f"here: download it (huggingface-cli download {source} --local-dir /models/blip2) "
                                 f"and set layout.captioner=/models/blip2")
        raise ModelLoadError(f"layout.captioner {source!r} is not a transformers model folder (no config.json); "
                             f"give a local BLIP-2 folder or 'tiny'")
    from transformers import Blip2ForConditionalGeneration, Blip2Processor
    try:
        model = Blip2ForConditionalGeneration.from_pretrained(folder, local_files_only=True)
        processor = Blip2Processor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"could not load the BLIP-2 folder {folder!r} (model and processor): "
                             f"{str(e).splitlines()[0]}") from e
    return model.eval().to(device), processor
