"""Does the toy world's generator draw what it was prompted? A judge trained on real pictures says.

    .venv/bin/python bench/toy_world_judge.py WORKDIR [--epochs 6] [--sets NAME ...]

WORKDIR is a toy-world run's folder (`instagen toy-world workdir=...`). A small CNN learns which of
the 9 categories an image holds from the world's real pretraining and training pictures (image
level: the categories of its boxes). It is then scored three ways on each synthetic set the run
wrote: the fraction of images where every category the prompt named is present ("prompted"), the
same against another image's prompt ("wrong prompt": the chance level for these pictures), and,
as the ceiling, the real test images against their own categories. Where "prompted" is near
"wrong prompt", the generator draws objects but not the ones asked for, and no labeller can fix
that downstream.

A second judge scores the labellers' boxes: a small CNN learns, from crops of the real pretraining
pictures' boxes (every object there is annotated) and crops that hold no object, which category a
box holds, or none. On each synthetic set it reports the fraction of boxes whose crop it names as
the box's category ("box right"), against the same boxes moved to a random place in the image
("moved": the level of a box that found the colour and shape by chance), for base and novel
boxes apart; and boxes per prompted object.

A third CNN learns to tell the detection scenes (train split) from the plain pretraining
pictures; the fraction of a set's images it calls scenes ("scene-like") says whether a generator
learnt the detection data's look (paper 3.2's fine-tuning), against the real test scenes.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import time

import numpy as np
import torch
from PIL import Image
from torch import nn

from engine.data.shards import iter_samples, shard_urls, usable


def load_split(world: str, split: str, categories: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    with open(os.path.join(world, split, "instances.json")) as f:
        data = json.load(f)
    index = {c["id"]: categories.index(c["name"]) for c in data["categories"]}
    labels = {im["id"]: np.zeros(len(categories), np.float32) for im in data["images"]}
    for a in data["annotations"]:
        labels[a["image_id"]][index[a["category_id"]]] = 1.0
    x = np.stack([np.asarray(Image.open(os.path.join(world, split, im["file_name"])).convert("RGB"))
                  for im in data["images"]])
    return to_tensor(x), torch.from_numpy(np.stack([labels[im["id"]] for im in data["images"]]))


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def judge_net(n: int) -> nn.Module:
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
    return nn.Sequential(block(3, 32), block(32, 64), block(64, 128), block(128, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, n))


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int = 64) -> None:
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    g = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch):
            xb = x[idx]
            if torch.rand(1, generator=g) < 0.5:  # generated objects sit anywhere, facing any way
                xb = xb.flip(3)
            loss = nn.functional.binary_cross_entropy_with_logits(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()


@torch.no_grad()
def present(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([net(c).sigmoid() > 0.5 for c in x.split(256)])


def scene_like(look: nn.Module, x: torch.Tensor) -> float:
    """Fraction of images the look judge calls detection scenes rather than pretraining pictures."""
    return float(present(look, x).float().mean())


def score(found: torch.Tensor, wanted: torch.Tensor) -> float:
    """Fraction of images where every wanted category is found."""
    return float((found | ~wanted.bool()).all(1).float().mean())


def shuffled(wanted: torch.Tensor) -> torch.Tensor:
    # Prompts are written category by category: a neighbour's prompt is mostly the same one.
    return wanted[torch.randperm(len(wanted), generator=torch.Generator().manual_seed(1))]


CROP = 24  # pixels a box crop is resized to; the world's objects are 12-30 pixels wide


def crop(image: Image.Image, box: list[float]) -> np.ndarray:
    """The box (xyxy pixels) with a fifth of its size as margin, resized to CROP x CROP."""
    x0, y0, x1, y1 = box
    mx, my = (x1 - x0) * 0.1 + 1, (y1 - y0) * 0.1 + 1
    return np.asarray(image.crop((x0 - mx, y0 - my, x1 + mx, y1 + my)).resize((CROP, CROP), Image.BILINEAR))


def iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter + 1e-9)


def random_box(rng: np.random.Generator, box: list[float], size: int) -> list[float]:
    w, h = box[2] - box[0], box[3] - box[1]
    x, y = rng.uniform(0, max(1e-3, size - w)), rng.uniform(0, max(1e-3, size - h))
    return [x, y, x + w, y + h]


def box_crops(world: str, split: str, categories: list[str], rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of every annotated box (label = category index) and, per image, one random box that
    overlaps none of them (label = len(categories), "no object")."""
    with open(os.path.join(world, split, "instances.json")) as f:
        data = json.load(f)
    index = {c["id"]: categories.index(c["name"]) for c in data["categories"]}
    by_image: dict[int, list] = {im["id"]: [] for im in data["images"]}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        by_image[a["image_id"]].append(([x, y, x + w, y + h], index[a["category_id"]]))
    xs, ys = [], []
    for im in data["images"]:
        image = Image.open(os.path.join(world, split, im["file_name"])).convert("RGB")
        for box, label in by_image[im["id"]]:
            xs.append(crop(image, box))
            ys.append(label)
            empty = random_box(rng, box, im["width"])
            if all(iou(empty, b) < 0.1 for b, _ in by_image[im["id"]]):
                xs.append(crop(image, empty))
                ys.append(len(categories))
    return to_tensor(np.stack(xs)), torch.tensor(ys)


def train_box_judge(x: torch.Tensor, y: torch.Tensor, classes: int, epochs: int) -> nn.Module:
    net = judge_net(classes)
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    g = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def named(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([net(c).argmax(1) for c in x.split(512)])


def judge_boxes(net: nn.Module, samples: list[dict], categories: list[str], novel: set[str],
                rng: np.random.Generator) -> dict[str, tuple[int, float, float]]:
    """Per kind ("base", "novel"): (boxes, fraction named right, the same for moved boxes)."""
    rows = {"base": ([], [], []), "novel": ([], [], [])}
    for s in samples:
        image, meta = s["jpg"].convert("RGB"), s["json"]
        for box, label in zip(meta.get("boxes", []), meta.get("labels", [])):
            xs, moved, ys = rows["novel" if label in novel else "base"]
            xs.append(crop(image, box))
            moved.append(crop(image, random_box(rng, box, meta["width"])))
            ys.append(categories.index(label))
    out = {}
    for kind, (xs, moved, ys) in rows.items():
        if xs:
            y = torch.tensor(ys)
            right = float((named(net, to_tensor(np.stack(xs))) == y).float().mean())
            by_chance = float((named(net, to_tensor(np.stack(moved))) == y).float().mean())
            out[kind] = (len(ys), right, by_chance)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workdir")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--sets", nargs="+", metavar="NAME", help="judge only these synthetic sets (WORKDIR/synthetic/NAME)")
    args = ap.parse_args(argv)
    folders = sorted(glob.glob(os.path.join(args.workdir, "synthetic", "*")))
    if args.sets:
        unknown = sorted(set(args.sets) - {os.path.basename(f) for f in folders})
        if unknown:
            ap.error(f"no synthetic set {unknown[0]!r} under {args.workdir}/synthetic")
        folders = [f for f in folders if os.path.basename(f) in args.sets]
    torch.manual_seed(0)
    world = os.path.join(args.workdir, "world")
    with open(os.path.join(world, "test", "instances.json")) as f:
        categories = [c["name"] for c in json.load(f)["categories"]]
    t0 = time.time()
    parts = [load_split(world, s, categories) for s in ("pretrain", "train")]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    net = judge_net(len(categories))
    train(net, x, y, args.epochs)
    tx, ty = load_split(world, "test", categories)
    found = present(net, tx)
    print(f"judge: {len(x)} real images, {args.epochs} epochs, {time.time() - t0:.0f} s on {platform.processor() or 'CPU'}")
    print(f"judge on the real test images: every category found {score(found, ty):.1%}, "
          f"exact set {float((found == ty.bool()).all(1).float().mean()):.1%}\n")

    rng = np.random.default_rng(0)
    t0 = time.time()
    bx, by = box_crops(world, "pretrain", categories, rng)
    box_net = train_box_judge(bx, by, len(categories) + 1, args.epochs)
    with open(os.path.join(world, "world.json")) as f:
        novel = set(json.load(f)["config"]["novel"])
    tbx, tby = box_crops(world, "test", categories, rng)
    test_right = named(box_net, tbx) == tby
    print(f"box judge: {len(bx)} crops, {args.epochs} epochs, {time.time() - t0:.0f} s; on the real test boxes "
          f"right {float(test_right[tby < len(categories)].float().mean()):.1%}, empty crops right "
          f"{float(test_right[tby == len(categories)].float().mean()):.1%}\n")

    # Trained last, so that the two judges above draw the same random numbers as without it.
    look = judge_net(1)  # 1 = a cluttered detection scene, 0 = a plain pretraining picture
    train(look, x, torch.cat([torch.zeros(len(parts[0][0]), 1), torch.ones(len(parts[1][0]), 1)]), args.epochs)
    rows = [("real test images (ceiling)", len(tx), score(found, ty), score(found, shuffled(ty)), scene_like(look, tx))]
    box_rows = []
    for folder in folders:
        # What a trainer reads: a set filtered by CLIP (<set>_clip) without the images it refused
        samples = [s for s in iter_samples(shard_urls(folder)) if usable(s["json"])]
        if not samples:
            continue
        gx = to_tensor(np.stack([np.asarray(s["jpg"]) for s in samples]))
        gy = torch.tensor([[float(c in s["json"]["categories"]) for c in categories] for s in samples])
        found = present(net, gx)
        rows.append((os.path.basename(folder), len(samples), score(found, gy), score(found, shuffled(gy)),
                     scene_like(look, gx)))
        prompted = {"base": 0, "novel": 0}
        for s in samples:
            for c in s["json"]["categories"]:
                prompted["novel" if c in novel else "base"] += 1
        for kind, (n, right, by_chance) in judge_boxes(box_net, samples, categories, novel, rng).items():
            box_rows.append((os.path.basename(folder), kind, n, n / prompted[kind], right, by_chance))

    print("| images | n | prompted categories all present | against the wrong prompt (chance) | scene-like |")
    print("|---|---|---|---|---|")
    for name, n, ok, chance, scenes in rows:
        print(f"| {name} | {n} | {ok:.1%} | {chance:.1%} | {scenes:.1%} |")
    print("\n| boxes | kind | n | per prompted object | box right | moved (chance) |")
    print("|---|---|---|---|---|---|")
    for name, kind, n, per, right, chance in box_rows:
        print(f"| {name} | {kind} | {n} | {per:.2f} | {right:.1%} | {chance:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
