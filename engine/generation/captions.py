"""Captions for layout rows: BLIP-2 describes each layout's source image, and the caption becomes
the row's prompt (seed 003: "captions (with the images) will be sent to the generative model").

`Captioner` is a Ray Data actor pool of its own, in front of the synthesis actors: its input row
names a shard, it makes the shard's layout rows (LayoutPlan, as the synthesis actor does) and adds
a `captions` column, one per row. Class balancing uses a rare category's few images many times,
so each actor keeps the captions of the images it has seen (an image is captioned once per actor;
greedy decoding makes the caption a function of the image, so two actors agree).

The seed's post-processing, made explicit (`postprocess`): blanks collapsed, cut to
`layout.caption_max_words` words, and every category of the layout that the caption does not name
appended (", with a dog and a cat" style), so the text names what the boxes hold; an empty caption
falls back to the layout's template prompt. A borrowed layout (layout.borrow_for) keeps its
template prompt: its source's caption describes the category it was relabelled from.
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict

import numpy as np
import torch

from engine.config import LayoutConfig
from engine.data.datasets import open_image
from engine.generation.layouts import LayoutPlan
from engine.generation.prompts import MAX_PROMPT_CHARS
from engine.models.captioner import load_captioner
from engine.runtime.cluster import PoolPlan


def postprocess(caption: str, names: list[str], max_words: int, fallback: str) -> str:
    """The caption as a prompt: printable, at most `max_words` words, naming every category."""
    words = "".join(ch if ch.isprintable() else " " for ch in caption).split()[:max_words]
    text = " ".join(words)
    if not text:
        return fallback
    missing = [n for n in names if not re.search(rf"\b{re.escape(n.lower())}\b", text.lower())]
    if missing:
        text = f"{text}, with {' and '.join(missing)}"
    return text[:MAX_PROMPT_CHARS]


class Captioner:
    """A Ray Data actor: a shard row in, the same row with `captions` (a JSON list, one per layout
    row of the shard) out."""

    def __init__(self, cfg: LayoutConfig, plan: LayoutPlan, shard_size: int, threads: int = 0,
                 cache_images: int = 4096):
        if threads:
            torch.set_num_threads(threads)
        self.cfg, self.plan, self.shard_size = cfg, plan, shard_size
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.processor = load_captioner(cfg.captioner, self.device)
        self.cache: OrderedDict[int, str] = OrderedDict()  # image id -> raw caption
        self.cache_images = cache_images
        self.captioned = 0  # images run through the model (the cache's misses)

    def __call__(self, row: dict) -> dict:
        index = int(row["shard"])
        specs = list(self.plan.rows(index * self.shard_size, (index + 1) * self.shard_size))
        sources = {s.layout.source["image_id"]: s.layout.source["file"] for s in specs}
        todo = [i for i in sources if i not in self.cache]
        for start in range(0, len(todo), self.cfg.caption_batch_size):
            chunk = todo[start:start + self.cfg.caption_batch_size]
            for image_id, text in zip(chunk, self.caption([sources[i] for i in chunk])):
                self.cache[image_id] = text
        captions = []
        for s in specs:
            image_id = s.layout.source["image_id"]
            self.cache.move_to_end(image_id)
            if "relabelled" in s.layout.source:  # its caption would describe the donor category
                captions.append(s.text)
            else:
                captions.append(postprocess(self.cache[image_id], list(s.categories), self.cfg.caption_max_words, s.text))
        while len(self.cache) > self.cache_images:
            self.cache.popitem(last=False)
        return {**row, "captions": json.dumps(captions)}

    @torch.no_grad()
    def caption(self, files: list[str]) -> list[str]:
        self.captioned += len(files)
        images = [np.asarray(open_image(f).convert("RGB")) for f in files]
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = self.model.generate(**inputs, max_new_tokens=self.cfg.caption_max_tokens, do_sample=False)
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]


def caption_pool(synth: PoolPlan, annot: PoolPlan) -> tuple[PoolPlan, PoolPlan]:
    """(synthesis pool, caption pool): on GPUs one caption actor with an annotation actor's share;
    on CPUs a quarter CPU taken from the synthesis actors, so that the three pools together never
    ask for more than the cluster has (actors that do wait forever)."""
    if synth.num_gpus > 0:
        return synth, PoolPlan(1, annot.num_cpus, annot.num_gpus)
    share = 0.25
    per = max(0.25, synth.num_cpus - share / synth.size)
    return PoolPlan(synth.size, per, 0.0), PoolPlan(1, share, 0.0)
