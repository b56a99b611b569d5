"""Does the toy world's generator draw what it was prompted? A judge trained on real pictures says.

    .venv/bin/python bench/toy_world_judge.py WORKDIR [--epochs 6]

WORKDIR is a toy-world run's folder (`instagen toy-world workdir=...`). A small CNN learns which of
the 9 categories an image holds from the world's real pretraining and training pictures (image
level: the categories of its boxes). It is then scored three ways on each synthetic set the run
wrote: the fraction of images where every category the prompt named is present ("prompted"), the
same against another image's prompt ("wrong prompt": the chance level for these pictures), and,
as the ceiling, the real test images against their own categories. Where "prompted" is near
"wrong prompt", the generator draws objects but not the ones asked for, and no labeller can fix
that downstream.
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

from engine.shards import iter_samples, shard_urls


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


def score(found: torch.Tensor, wanted: torch.Tensor) -> float:
    """Fraction of images where every wanted category is found."""
    return float((found | ~wanted.bool()).all(1).float().mean())


def shuffled(wanted: torch.Tensor) -> torch.Tensor:
    # Prompts are written category by category: a neighbour's prompt is mostly the same one.
    return wanted[torch.randperm(len(wanted), generator=torch.Generator().manual_seed(1))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workdir")
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args(argv)
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

    rows = [("real test images (ceiling)", len(tx), score(found, ty), score(found, shuffled(ty)))]
    for folder in sorted(glob.glob(os.path.join(args.workdir, "synthetic", "*"))):
        samples = list(iter_samples(shard_urls(folder)))
        if not samples:
            continue
        gx = to_tensor(np.stack([np.asarray(s["jpg"]) for s in samples]))
        gy = torch.tensor([[float(c in s["json"]["categories"]) for c in categories] for s in samples])
        found = present(net, gx)
        rows.append((os.path.basename(folder), len(samples), score(found, gy), score(found, shuffled(gy))))

    print("| images | n | prompted categories all present | against the wrong prompt (chance) |")
    print("|---|---|---|---|")
    for name, n, ok, chance in rows:
        print(f"| {name} | {n} | {ok:.1%} | {chance:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
