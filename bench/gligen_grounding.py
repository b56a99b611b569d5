"""Does a GLIGEN generator use its boxes? Its denoising loss with each image's own boxes against
the same images given another image's boxes.

    .venv/bin/python bench/gligen_grounding.py GLIGEN_FOLDER ANNOTATIONS [--images 128] [--image-root DIR]

GLIGEN_FOLDER: a pipeline `finetune.train=gligen` wrote (the toy world's WORKDIR/models/gligen).
ANNOTATIONS: a COCO instances JSON of images of the generator's size, the images beside it unless
--image-root says where (the toy world's WORKDIR/world/pretrain/instances.json).

Noise and timesteps are fixed, so the losses differ only by the boxes. A generator that draws
objects where its boxes are predicts the noise better with the right boxes, most of all at large
timesteps where the layout is not yet in the latent. A gap near zero means the gated layers
learnt no use of the boxes (whatever they did to the loss against "gates shut"), and layouts
drawn with it will not hold their objects. Under a minute on a CPU, against a toy-world layout
row's half hour and the judge's four minutes: run it before either.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.config import ModelConfig
from engine.config.sections import GLIGEN_MAX_OBJECTS
from engine.generation.synthesis import set_gated_layers
from engine.models.diffusion import grounding_tokens, load_pipeline

BANDS = [(0, 250), (250, 500), (500, 750), (750, 1000)]


def load_images(annotations: str, n: int, image_root: str = "") -> tuple[torch.Tensor, list[tuple[list, list]]]:
    """The first `n` images with at least one box, in [-1, 1], and their layouts (normalised xyxy);
    file names are relative to `image_root` (default: the annotations' folder)."""
    with open(annotations) as f:
        data = json.load(f)
    names = {c["id"]: c["name"] for c in data["categories"]}
    boxes: dict[int, list] = {}
    for a in data["annotations"]:
        boxes.setdefault(a["image_id"], []).append(a)
    images = [im for im in data["images"] if im["id"] in boxes][:n]
    root = image_root or os.path.dirname(annotations)
    pixels, layouts = [], []
    for im in images:
        pixels.append(np.asarray(Image.open(os.path.join(root, im["file_name"])).convert("RGB")))
        w, h = im["width"], im["height"]
        objs = boxes[im["id"]][:GLIGEN_MAX_OBJECTS]
        layouts.append(([[x / w, y / h, (x + bw) / w, (y + bh) / h] for x, y, bw, bh in (a["bbox"] for a in objs)],
                        [names[a["category_id"]] for a in objs]))
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, layouts


@torch.no_grad()
def box_losses(pipe, x: torch.Tensor, layouts: list[tuple[list, list]]) -> dict[str, list[float]]:
    """Per timestep band of BANDS, the loss with each image's own boxes ("own"), with the next
    image's boxes ("other") and with the gated layers shut ("shut"), the same noise and timesteps
    for all three; and "moved": how far the other boxes move the predicted noise, as a fraction of
    its mean size. A loss is a blunt instrument where the boxes matter little; "moved" says whether
    they reach the output at all."""
    from diffusers import DDPMScheduler
    unet, vae = pipe.unet, pipe.vae
    prompts = ["a photograph of " + " and ".join(dict.fromkeys(labels)) for _, labels in layouts]
    latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    text, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    sched = DDPMScheduler.from_config(pipe.scheduler.config)

    def predict(lays, gated=True) -> list[torch.Tensor]:
        set_gated_layers(unet, gated)
        tokens = grounding_tokens(pipe.tokenizer, pipe.text_encoder, lays, unet.config.cross_attention_dim)
        out = []
        for i, (lo, hi) in enumerate(BANDS):
            t = torch.randint(lo, hi, (len(lays),), generator=torch.Generator().manual_seed(i))
            out.append(unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=text,
                            cross_attention_kwargs={"gligen": tokens}).sample)
        return out
    try:
        own, other, shut = predict(layouts), predict(layouts[1:] + layouts[:1]), predict(layouts, False)
    finally:
        set_gated_layers(unet, True)
    return {"own": [F.mse_loss(p, noise).item() for p in own], "other": [F.mse_loss(p, noise).item() for p in other],
            "shut": [F.mse_loss(p, noise).item() for p in shut],
            "moved": [((o - p).abs().mean() / p.abs().mean()).item() for p, o in zip(own, other)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gligen")
    ap.add_argument("annotations")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--image-root", default="", help="where the file names start (default: beside ANNOTATIONS)")
    args = ap.parse_args()
    pipe = load_pipeline(ModelConfig(source=args.gligen), "cpu", layout=True)
    x, layouts = load_images(args.annotations, args.images, args.image_root)
    got = box_losses(pipe, x, layouts)
    gates = [round(float(p.tanh().mean()), 3) for n, p in pipe.unet.named_parameters() if n.endswith("fuser.alpha_attn")]
    print(f"{len(layouts)} images; tanh(alpha_attn) per gated layer: {gates}")
    print(f"{'timesteps':>10} {'own boxes':>10} {'other boxes':>12} {'gap %':>8} {'gates shut':>11} {'moved %':>8}")
    for (lo, hi), r, o, c, m in zip(BANDS, got["own"], got["other"], got["shut"], got["moved"]):
        print(f"{lo:>4}-{hi:<5} {r:>10.5f} {o:>12.5f} {100 * (o - r) / r:>8.4f} {c:>11.5f} {100 * m:>8.4f}")


if __name__ == "__main__":
    main()
