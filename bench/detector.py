"""Deformable DETR training and evaluation speed: transformers' reference attention vs the
project's fused deformable-attention op (engine.ops.ms_deform_attn), from one run.

    python bench/detector.py                    # small-but-real size, CPU
    python bench/detector.py --image-size 256 --steps 20 --batch 4

Both detectors are built from the same seed (identical weights) and fed the same batches of
COCO-like images (coloured shapes with exact boxes). Steps alternate between the two so that a
machine whose load changes during the run slows both alike. A training step is forward with
the Hungarian-matched loss, backward and an AdamW step; evaluation is the same prediction path
as engine.training.detection.evaluate_detector (image processor, model, post-processing).
Training runs in this process, not through Ray Train, so the numbers are the detector's alone.
Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from engine.training.detection import augment, collate, to_target  # noqa: E402
from engine.config import TinyDetectorConfig
from engine.models.detectors import build_detector  # noqa: E402

CATEGORIES = ["red square", "blue disc", "green square", "yellow disc"]
COLOURS = [(220, 40, 40), (40, 80, 220), (40, 180, 60), (230, 200, 30)]


def make_images(n: int, size: int, seed: int = 0):
    """Images with 1-3 shapes at random places, and their xyxy boxes and labels."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (size, size), (128, 128, 128))
        draw = ImageDraw.Draw(img)
        boxes, labels = [], []
        for _ in range(rng.integers(1, 4)):
            c = int(rng.integers(len(CATEGORIES)))
            side = int(rng.integers(size // 8, size // 3))
            x0, y0 = (int(v) for v in rng.integers(0, size - side, 2))
            (draw.rectangle if c % 2 == 0 else draw.ellipse)((x0, y0, x0 + side - 1, y0 + side - 1), fill=COLOURS[c])
            boxes.append([x0, y0, x0 + side, y0 + side])
            labels.append(c)
        out.append((img, boxes, labels))
    return out


def batches(images, size: int, batch: int, det):
    """The training pipeline's own augmentation and collation, precomputed once."""
    import json
    rng = np.random.default_rng(1)
    result = []
    for s in range(0, len(images) - batch + 1, batch):
        rows = {"pixels": [], "mask": [], "target": [], "source": []}
        for img, boxes, labels in images[s:s + batch]:
            px, mask, b, kept, valid = augment(img, boxes, labels, size, rng.uniform(0.8, 1.2), bool(rng.random() < 0.5),
                                               tuple(rng.random(2)), det.keep_aspect)
            rows["pixels"].append(px)
            rows["mask"].append(mask)
            rows["target"].append(json.dumps({"boxes": to_target(b, valid), "labels": kept}))
            rows["source"].append("real")
        result.append(collate({k: np.stack(v) if k in ("pixels", "mask") else v for k, v in rows.items()},
                              det.image_mean, det.image_std))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per attention")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--eval-images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    # Deformable DETR at a size where attention is a real share of the work: 4 feature levels,
    # 4 points, 8 heads of 32 channels (Deformable DETR's own ratios at half width).
    tiny = TinyDetectorConfig(d_model=256, encoder_layers=3, decoder_layers=3, heads=8, ffn_dim=512,
                              num_queries=100, num_feature_levels=4, n_points=4,
                              backbone_hidden_sizes=[32, 64, 128, 256], backbone_depths=[1, 1, 1, 1])
    modes = ["reference", "project_op"]
    dets = {m: build_detector("deformable_detr", "tiny", CATEGORIES, args.image_size, m, tiny) for m in modes}
    params = sum(p.numel() for p in dets["reference"].model.parameters())
    opts = {m: torch.optim.AdamW(d.model.parameters(), lr=1e-4) for m, d in dets.items()}
    data = batches(make_images((args.steps + args.warmup) * args.batch, args.image_size),
                   args.image_size, args.batch, dets["reference"])

    train_s = {m: 0.0 for m in modes}
    losses = {m: [] for m in modes}
    for i, batch in enumerate(data):
        for m in modes:  # alternate: load changes hit both
            model, opt = dets[m].model.train(), opts[m]
            torch.manual_seed(i)  # the same dropout masks for both, so their losses are comparable
            start = time.perf_counter()
            loss = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= args.warmup:
                train_s[m] += time.perf_counter() - start
            losses[m].append(loss.item())

    eval_images = [img for img, _, _ in make_images(args.eval_images, args.image_size, seed=2)]
    eval_s = {m: 0.0 for m in modes}
    for m in modes:
        dets[m].predict(eval_images[:2])  # warm-up
    for s in range(0, len(eval_images), 8):
        for m in modes:
            start = time.perf_counter()
            dets[m].predict(eval_images[s:s + 8], threshold=0.0)
            eval_s[m] += time.perf_counter() - start

    timed = args.steps * args.batch
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.split(":")[-1].strip()
    print(f"Deformable DETR ({params / 1e6:.1f}M parameters, d_model 256, 4 levels x 4 points, 3+3 layers, "
          f"100 queries), {args.image_size}px, batch {args.batch}, {args.steps} timed steps; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu or platform.processor()}")
    print("| attention | train images/s | train s/step | eval images/s | eval s (" f"{len(eval_images)} images) "
          "| loss after training |")
    print("| --- | --- | --- | --- | --- | --- |")
    for m in modes:
        print(f"| {m} | {timed / train_s[m]:.2f} | {train_s[m] / args.steps:.3f} | {len(eval_images) / eval_s[m]:.2f} "
              f"| {eval_s[m]:.2f} | {losses[m][-1]:.4f} |")
    print(f"speed-up of project_op: training x{train_s['reference'] / train_s['project_op']:.2f}, "
          f"evaluation x{eval_s['reference'] / eval_s['project_op']:.2f}")
    # Same weights and batches: the two runs must agree (the op is exact up to float rounding).
    print(f"first-step loss: reference {losses['reference'][0]:.5f}, project_op {losses['project_op'][0]:.5f}")


if __name__ == "__main__":
    main()
