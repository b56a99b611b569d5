"""A CLIP trained from scratch on image-caption pairs: the quality filter's scorer for data that no
downloaded CLIP has seen (the toy world's coloured shapes).

    train_clip(ClipTrainConfig(captions=..., image_root=..., output_dir=...), RayConfig())

then `filter.model=<output_dir>` loads it (engine.models.clip.build_clip).

Stages:
* driver: read the captions (engine.data.datasets.load_captions) and build a word-level CLIP
  tokenizer from their words (a CLIPTokenizer whose BPE merges spell every caption word as one
  token: the towers learn from a dozen tokens, not from characters; a word it never saw falls back
  to characters, so nothing is unknown).
* Ray Train workers (engine.training.runner): decode every image once through the processor,
  then each step draws a batch of pairs (seeded by seed, step and rank, so a resumed run draws
  the batches it would have drawn), and trains both towers of a transformers CLIPModel with the
  symmetric InfoNCE loss; DeepSpeed AdamW with warmup and linear decay; checkpoints every
  `checkpoint_every` steps; a restarted worker or a rerun resumes from the latest one.
* driver: the model (safetensors) and its CLIPProcessor written with save_pretrained into
  output_dir (through a temporary folder); with clip.eval_annotations, the zero-shot accuracy of
  the model on that split's boxes (`zero_shot`), recorded with the training figures in
  output_dir/training.json.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections import Counter
from typing import Optional, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.config import ClipTowersConfig, ClipTrainConfig, ConfigError, RayConfig, fingerprint, from_dict
from engine.data.datasets import check_dataset, load_captions, load_detection_dataset, open_image
from engine.generation.filter import crop
from engine.models.clip import ClipScorer
from engine.runtime.cluster import connect, threads_for
from engine.runtime.faults import maybe_crash
from engine.runtime.storage import atomic_folder
from engine.training.runner import (
    TrainSummary,
    deepspeed_config,
    deepspeed_engine,
    fit,
    load_tensors,
    read_meta,
    report,
    restore_checkpoint,
    seed_everything,
)

RECORD = "training.json"  # in output_dir: how the model was trained and what it scored
MAX_WORDS = 5000  # most frequent caption words that get a token of their own
# CLIP's own clamp of its learned temperature: beyond 100 the logits saturate.
MAX_LOGIT_SCALE = float(np.log(100.0))


# ---------------------------------------------------------------------------------------------
# Tokenizer, processor, model


def caption_words(captions: Sequence[str], limit: int = MAX_WORDS) -> list[str]:
    """The words CLIP's pre-tokenizer would split the captions into (lower case), most frequent
    first, ties alphabetical so the same captions always give the same list."""
    counts = Counter(w for c in captions for w in re.findall(r"[^\W\d_]+|\d|[^\w\s]+", c.lower()))
    return sorted(counts, key=lambda w: (-counts[w], w))[:limit]


def word_tokenizer(words: Sequence[str], max_length: int):
    """A CLIPTokenizer over the byte-level characters (engine.models.diffusion.tiny_tokenizer's
    vocabulary) plus one token per word of `words`: merges are added, shortest prefix first, until
    BPE spells each word as one token. A plain CLIPTokenizer, so CLIPProcessor saves and loads it."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
            vocab.setdefault(ch + suffix, len(vocab))
    merges: list[tuple[str, str]] = []
    # Each round joins the first two pieces of every word still in pieces; a merge added for one
    # word may split another differently, so rounds go on until none changes (a word's longest
    # spelling bounds them).
    for _ in range(max((len(w) for w in words), default=0) + 8):
        tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)
        todo = [pieces for pieces in (tokenizer.tokenize(w) for w in words) if len(pieces) > 1]
        if not todo:
            break
        for a, b, *_ in todo:
            if (a, b) not in merges:
                merges.append((a, b))
                vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_processor(words: Sequence[str], towers: ClipTowersConfig):
    from transformers import CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = CLIPImageProcessorPil(size={"shortest_edge": towers.image_size},
                                  crop_size={"height": towers.image_size, "width": towers.image_size})
    return CLIPProcessor(image_processor=image, tokenizer=word_tokenizer(words, towers.max_length))


def build_model(towers: ClipTowersConfig, tokenizer, seed: int):
    """A randomly initialised CLIPModel of `towers`' sizes (the same weights for the same seed)."""
    from transformers import CLIPConfig, CLIPModel

    t = towers
    tower = {"hidden_size": t.hidden_size, "intermediate_size": 4 * t.hidden_size, "num_hidden_layers": t.layers,
             "num_attention_heads": t.heads}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": len(tokenizer), "max_position_embeddings": t.max_length,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={**tower, "image_size": t.image_size, "patch_size": t.patch_size},
        projection_dim=t.projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(config)


# ---------------------------------------------------------------------------------------------
# The loss


def contrastive_loss(logits_per_image: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss): cross-entropy of each image over the batch's texts and of
    each text over its images. Pairs with the same caption are all counted as matches (the target
    spread evenly over them): captions of a small world repeat within a batch, and calling an
    identical caption a negative would teach the model to tell apart what cannot be told apart."""
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    target = same / same.sum(1, keepdim=True)  # symmetric `same`: the texts' targets are its columns
    return (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.T, target)) / 2


# ---------------------------------------------------------------------------------------------
# Ray Train worker


def _pixels(processor, files: list[str], chunk: int = 256) -> torch.Tensor:
    """Every image through the processor once (resize, centre cut, normalise), kept as float16."""
    out = []
    for i in range(0, len(files), chunk):
        images = [open_image(f) for f in files[i:i + chunk]]
        out.append(processor.image_processor(images, return_tensors="pt")["pixel_values"].half())
    return torch.cat(out)


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker: everything it needs arrives in `config`."""
    import ray.train

    cc = from_dict(ClipTrainConfig, config["clip"])
    torch.set_num_threads(threads_for(cc.run.cpus_per_worker))
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = torch.device("cuda" if torch.cuda.is_available() and cc.run.use_gpu else "cpu")
    seed_everything(cc.seed)
    processor = build_processor(config["words"], cc.towers)
    model = build_model(cc.towers, processor.tokenizer, cc.seed)
    # DeepSpeed broadcasts each parameter as bytes, which a 0-d tensor (CLIP's temperature) cannot
    # be viewed as: trained as shape [1], back to a scalar when the driver loads the weights.
    model.logit_scale = torch.nn.Parameter(model.logit_scale.detach().reshape(1))
    captions = config["captions"]
    tokens = processor.tokenizer(captions, padding="max_length", truncation=True, max_length=cc.towers.max_length,
                                 return_tensors="pt")
    caption_ids = torch.tensor([config["caption_index"][c] for c in captions])
    pixels = _pixels(processor, config["files"])

    ds_cfg = deepspeed_config(cc.run.zero_stage, cc.lr, cc.weight_decay, cc.warmup_steps, cc.max_steps,
                              cc.run.bf16, batch_per_worker=cc.batch_size, clip=cc.clip, betas=(0.9, 0.98),
                              eps=1e-6)
    # No weight decay on gains, biases and the temperature, as CLIP trains.
    groups = [{"params": [p for p in model.parameters() if p.ndim >= 2]},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    engine = deepspeed_engine(model, ds_cfg, params=groups)
    held: dict = {}
    start = restore_checkpoint(engine, on_load=lambda d, meta: held.update(meta.get("extra", {})))
    losses: list[float] = list(held.get("losses", []))[:start]

    for step in range(start + 1, cc.max_steps + 1):
        maybe_crash("clip", step)
        rng = np.random.default_rng([cc.seed, step, rank])
        idx = torch.from_numpy(rng.choice(len(captions), size=cc.batch_size, replace=False))
        px = pixels[idx].float()
        flip = torch.from_numpy(rng.random(cc.batch_size) < 0.5)
        # Mirror images: the world's shapes and captions say nothing of left and right.
        px[flip] = px[flip].flip(-1)
        out = engine(input_ids=tokens["input_ids"][idx].to(device), attention_mask=tokens["attention_mask"][idx].to(device),
                     pixel_values=px.to(device))
        loss = contrastive_loss(out.logits_per_image.float(), caption_ids[idx].to(device))
        engine.backward(loss)
        engine.step()
        with torch.no_grad():
            engine.module.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses.append(round(float(loss.detach()), 5))
        last = step == cc.max_steps
        metrics = {"loss": losses[-1], "start_step": start, "lr": engine.get_lr()[0],
                   "logit_scale": float(engine.module.logit_scale.exp())}
        if last:
            metrics["losses"] = losses
        report(metrics, engine, step, cc.run.checkpoint_every, extra={"losses": losses}, last=last)
    if start >= cc.max_steps:
        # A rerun of a finished run: nothing to train; the latest checkpoint is the result.
        ray.train.report({"loss": losses[-1] if losses else None, "start_step": start, "step": start,
                          "losses": losses})


# ---------------------------------------------------------------------------------------------
# Zero-shot accuracy


class Scorer(Protocol):
    def scores(self, images: Sequence[Image.Image], categories: Sequence[str], template: str) -> torch.Tensor: ...


def zero_shot(scorer: Scorer, annotations: str, image_root: str, template: str, base: Sequence[str] = (),
              novel: Sequence[str] = (), batch: int = 256) -> dict:
    """Crop every box of a COCO split and call it the category whose text (`template` with the
    name) the scorer ranks highest among all the split's categories. Returns the fraction right
    over all boxes, over boxes of `base` and of `novel` categories (None where there is none),
    the box counts, and the accuracy of each category."""
    ds = load_detection_dataset(annotations, image_root, "coco", check_images=False)
    names = ds.categories
    crops, truth = [], []
    for rec in ds.records:
        if not rec.boxes:
            continue
        image = open_image(rec.file)
        crops += [crop(image, box) for box in rec.boxes]
        truth += rec.labels
    guesses: list[str] = []
    for i in range(0, len(crops), batch):
        sims = scorer.scores(crops[i:i + batch], names, template)
        guesses += [names[k] for k in sims.argmax(1).tolist()]

    def accuracy(keep) -> tuple[Optional[float], int]:
        hits = [g == t for g, t in zip(guesses, truth) if keep(t)]
        return (sum(hits) / len(hits) if hits else None), len(hits)

    out: dict = {"categories": len(names), "template": template}
    for key, keep in (("", lambda t: True), ("_base", lambda t: t in set(base)), ("_novel", lambda t: t in set(novel))):
        out[f"accuracy{key}"], out[f"boxes{key}"] = accuracy(keep)
    out["per_category"] = {n: accuracy(lambda t, n=n: t == n)[0] for n in names}
    return out


# ---------------------------------------------------------------------------------------------
# Driver


def prepare(cc: ClipTrainConfig) -> tuple[list[str], list[str], list[str]]:
    """Everything that can fail before training. Returns the image files, their captions and the
    tokenizer's words."""
    cc.validate()
    check_dataset(cc.captions, cc.image_root, ("clip.captions", "clip.image_root"))
    if cc.eval_annotations:
        check_dataset(cc.eval_annotations, cc.eval_image_root, ("clip.eval_annotations", "clip.eval_image_root"))
    records, _ = load_captions(cc.captions, cc.image_root)
    if cc.batch_size > len(records):
        raise ConfigError(f"clip.batch_size={cc.batch_size} is more than the {len(records)} image-caption pairs "
                          f"of {cc.captions!r}; lower it")
    captions = [r.caption for r in records]
    return [r.file for r in records], captions, caption_words(captions)


def train_clip(cc: ClipTrainConfig, ray_cfg: Optional[RayConfig] = None) -> TrainSummary:
    """Train a CLIP on cc.captions (resuming an earlier run of the same run.storage_path/name),
    write it to cc.output_dir, and score it zero-shot on cc.eval_annotations if set."""
    started = time.time()
    files, captions, words = prepare(cc)
    connect(ray_cfg or RayConfig())
    _check_same_run(cc, words)
    index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    loop_config = {"clip": dataclasses.asdict(cc), "files": files, "captions": captions, "caption_index": index,
                   "words": words}
    result = fit(train_loop, loop_config, cc.run, what="CLIP training")
    metrics = dict(result.metrics or {})
    with result.checkpoint.as_directory() as d:
        meta = read_meta(d)
        state = load_tensors(d, "model")
    processor = build_processor(words, cc.towers)
    model = build_model(cc.towers, processor.tokenizer, cc.seed)
    model.load_state_dict({**state, "logit_scale": state["logit_scale"].reshape(())})
    losses = meta["extra"].get("losses", [])
    record = {"steps": int(meta["step"]), "loss": losses[-1] if losses else None, "losses": losses,
              "pairs": len(captions), "distinct_captions": len(index), "words": len(words),
              "parameters": sum(p.numel() for p in model.parameters()), "train_s": round(time.time() - started, 1),
              "config": dataclasses.asdict(cc)}
    if cc.eval_annotations:
        record["zero_shot"] = zero_shot(ClipScorer(model, processor, "cpu"), cc.eval_annotations, cc.eval_image_root,
                                        cc.template, cc.eval_base, cc.eval_novel)
    with atomic_folder(cc.output_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, RECORD), "w") as f:
            json.dump(record, f, indent=1)
    figures = {**{k: v for k, v in record.items() if k != "config"}, "start_step": metrics.get("start_step", 0),
               "logit_scale": metrics.get("logit_scale")}
    return TrainSummary(cc.output_dir, record["steps"], result.checkpoint.path, figures, time.time() - started)


# What a resumed run must share with the run that wrote its checkpoints (max_steps, lr and the
# like may change between the two).
_RUN_KEYS = ("captions", "towers", "seed")


def _check_same_run(cc: ClipTrainConfig, words: list[str]) -> None:
    """Refuse to resume the checkpoints of another CLIP (other sizes or vocabulary) under the same
    storage_path/name: they would not load, or load into another tokenizer's embeddings."""
    import fsspec

    want = fingerprint({"words": words, **{k: dataclasses.asdict(cc)[k] for k in _RUN_KEYS}})
    path = f"{cc.run.storage_path.rstrip('/')}/{cc.run.name}/instagen_clip.json"
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
    fs, p = fsspec.core.url_to_fs(path)
    if fs.exists(p):
        with fs.open(p, "r") as f:
            if json.load(f).get("fingerprint") != want:
                raise ConfigError(f"{cc.run.storage_path}/{cc.run.name} holds checkpoints of a CLIP with other "
                                  f"captions, sizes or seed; set clip.run.name to a new run name (or delete that folder)")
        return
    fs.makedirs(fs._parent(p), exist_ok=True)
    with fs.open(p, "w") as f:
        json.dump({"fingerprint": want}, f)
