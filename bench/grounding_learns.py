"""Learning check for the grounding head: does it learn to box objects from UNet features?

    .venv/bin/python bench/grounding_learns.py [--minutes 8] [--train 512] [--test 64]

A toy world: 32x32 images with one or two coloured shapes (4 colours x 3 shapes = 12 categories)
on a noisy background, boxes known exactly, prompt "a photograph of {c1} and {c2}". Each image
goes the way a generated one does: encoded by the tiny pipeline's VAE, noised to the last
denoising step's input (what shards store), then the UNet features are recomputed from it with
the prompt (engine.models.grounding.features, as in training and generation). The head trains for a
bounded time on CPU, then AP50 on held-out images (engine.evaluation.metrics.evaluate_coco) is printed
next to a random-box baseline scored in the same run on the same images.

The tiny pipeline's weights are random: the features carry position and colour only because
random convolutions keep them, not semantics. That is the point: the head has to find the
objects in whatever the UNet gives it.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from engine.config import ModelConfig
from engine.evaluation.metrics import evaluate_coco
from engine.models.grounding.features import Featurizer
from engine.config import GroundingConfig
from engine.models.grounding.head import predictions
from engine.config import GroundingTrainConfig
from engine.models.grounding.head import build_head
from engine.training.grounding import collate, train_local
from engine.models.diffusion import load_pipeline

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")
CATEGORIES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
SIZE = 32  # 16x16 latents: small enough to train in minutes on a shared 2-core CPU


def draw_scene(rng: random.Random) -> tuple[np.ndarray, list[str], list[list[float]]]:
    """One image: background noise, one or two objects of distinct categories, their xyxy boxes."""
    bg = np.clip(np.random.default_rng(rng.randrange(2**31)).normal(128, 20, (SIZE, SIZE, 3)), 0, 255)
    img = Image.fromarray(bg.astype(np.uint8))
    d = ImageDraw.Draw(img)
    cats, boxes = rng.sample(CATEGORIES, rng.choice((1, 2))), []
    for cat in cats:
        colour, shape = cat.split()
        s = rng.randint(8, 16)
        x0, y0 = rng.randint(0, SIZE - s), rng.randint(0, SIZE - s)
        box = [x0, y0, x0 + s, y0 + s]
        if shape == "square":
            d.rectangle([x0, y0, x0 + s - 1, y0 + s - 1], fill=COLOURS[colour])
        elif shape == "circle":
            d.ellipse([x0, y0, x0 + s - 1, y0 + s - 1], fill=COLOURS[colour])
        else:
            d.polygon([(x0 + s / 2, y0), (x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1)], fill=COLOURS[colour])
        boxes.append([float(v) for v in box])
    return np.asarray(img), cats, boxes


def prompt_of(cats: list[str]) -> str:
    return f"a photograph of {cats[0]} and {cats[1]}" if len(cats) == 2 else f"a photograph of {cats[0]}"


@torch.no_grad()
def to_rows(pipe, featurizer: Featurizer, scenes, seed: int) -> list[dict]:
    """Images -> training rows whose latent is the last denoising step's input, as shards store."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(0, len(scenes), 32):
        chunk = scenes[i:i + 32]
        x = torch.as_tensor(np.stack([s[0] for s in chunk])).permute(0, 3, 1, 2).float() / 127.5 - 1
        z0 = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = torch.randn(z0.shape, generator=g)
        zt = featurizer.scheduler.add_noise(z0, noise, featurizer.timestep.repeat(len(chunk)))
        for j, ((img, cats, boxes), z) in enumerate(zip(chunk, zt)):
            rows.append({"key": f"{seed}-{i + j}", "latent": z.numpy(), "prompt": prompt_of(cats),
                         "categories": json.dumps(cats), "labels": json.dumps(cats),
                         "boxes": json.dumps([[v / SIZE for v in b] for b in boxes])})
    return rows


def ground_truth(scenes) -> dict:
    images, anns = [], []
    for i, (_, cats, boxes) in enumerate(scenes):
        images.append({"id": i, "width": SIZE, "height": SIZE, "file_name": f"{i}.png"})
        for c, b in zip(cats, boxes):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": CATEGORIES.index(c) + 1, "iscrowd": 0,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])})
    return {"images": images, "annotations": anns,
            "categories": [{"id": i + 1, "name": c} for i, c in enumerate(CATEGORIES)]}


@torch.no_grad()
def head_detections(head, featurizer: Featurizer, rows: list[dict]) -> list[dict]:
    head.eval()
    dets = []
    for i in range(0, len(rows), 16):
        batch = collate(rows[i:i + 16])
        feats = featurizer.unet_features(torch.as_tensor(batch["latent"]), list(batch["prompt"]), list(batch["key"]))
        cats = [json.loads(c) for c in batch["categories"]]
        text, mask = featurizer.text_batch(cats)
        for j, found in enumerate(predictions(head(feats, text, mask), mask, 0.0, nms_iou=0.7, max_boxes=100)):
            for c, s, b in found:
                x0, y0, x1, y1 = (v * SIZE for v in b)
                dets.append({"image_id": i + j, "category_id": CATEGORIES.index(cats[j][c]) + 1,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "score": s})
    return dets


def random_detections(scenes, rng: random.Random, per_category: int = 20) -> list[dict]:
    """The baseline: for every prompted category, boxes of plausible sizes at random places."""
    dets = []
    for i, (_, cats, _) in enumerate(scenes):
        for c in cats:
            for _ in range(per_category):
                s = rng.randint(8, 16)
                dets.append({"image_id": i, "category_id": CATEGORIES.index(c) + 1, "score": rng.random(),
                             "bbox": [rng.randint(0, SIZE - s), rng.randint(0, SIZE - s), s, s]})
    return dets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--train", type=int, default=512)
    ap.add_argument("--test", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    torch.manual_seed(0)
    pipe = load_pipeline(ModelConfig(source="tiny"))
    # Each image's features are computed once and kept: the bounded time goes to the head.
    featurizer = Featurizer(pipe, steps=10, cache_mb=4096)
    train_scenes = [draw_scene(rng) for _ in range(args.train)]
    test_scenes = [draw_scene(rng) for _ in range(args.test)]
    train_rows, test_rows = to_rows(pipe, featurizer, train_scenes, 1), to_rows(pipe, featurizer, test_scenes, 2)

    cfg = GroundingTrainConfig(
        base_shards="-", base=CATEGORIES, synthesis_steps=10, epochs=1000, transfer_epoch=1000, lr=2e-4,
        lr_drop_epoch=10**6, batch_size=16, negatives=3, seed=0,
        head=GroundingConfig(d_model=64, enhancer_layers=2, decoder_layers=2, num_queries=60, n_levels=2,
                             n_heads=4, n_points=4, ffn_dim=128))
    head = build_head(cfg.head, pipe)
    start = time.time()
    losses = train_local(cfg, featurizer, head, train_rows, time_limit_s=args.minutes * 60, log_every=25)
    trained_s = time.time() - start

    gt = ground_truth(test_scenes)
    head_dets = head_detections(head, featurizer, test_rows)
    random_dets = random_detections(test_scenes, random.Random(1))
    head_ap, random_ap = evaluate_coco(gt, head_dets)["AP50"], evaluate_coco(gt, random_dets)["AP50"]
    # Where is the error, in finding objects or in naming them? The same detections, every
    # category merged into one ("object"): localisation alone.
    one = {**gt, "annotations": [{**a, "category_id": 1} for a in gt["annotations"]],
           "categories": [{"id": 1, "name": "object"}]}
    agnostic = lambda dets: evaluate_coco(one, [{**d, "category_id": 1} for d in dets])["AP50"]  # noqa: E731
    print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "train_images": args.train, "test_images": args.test, "steps": len(losses),
                      "train_s": round(trained_s), "loss_first_25": round(float(np.mean(losses[:25])), 3),
                      "loss_last_25": round(float(np.mean(losses[-25:])), 3),
                      "AP50_head": round(head_ap, 3), "AP50_random_boxes": round(random_ap, 3),
                      "AP50_class_agnostic_head": round(agnostic(head_dets), 3),
                      "AP50_class_agnostic_random": round(agnostic(random_dets), 3)}, indent=1))


if __name__ == "__main__":
    main()
