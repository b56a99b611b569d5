"""Stable Diffusion fine-tuning on crops of a real detection dataset (InstaGen 3.2).

Off the shelf, Stable Diffusion draws one or two objects on a plain background; detectors trained
on such images do worse. So the UNet is fine-tuned on random crops of the base-category images of
a detection dataset, each captioned with the names of the categories inside it:
"a photograph of person and bicycle".

Stages:
* driver: load the dataset (engine.data.datasets), keep base-category images, plan every crop
  (position, scale, prompt) from the boxes alone: no pixel is read on the driver. A crop with no
  counted object is re-drawn up to `max_redraws` times; if none of those has one, that sample
  is skipped and counted ("no object in crop").
* Ray Data (CPU tasks): decode, scale and cut the planned crops; an image that fails to decode is
  marked, skipped by the trainer and counted, never raised.
* Ray Train workers (engine.training.runner): VAE and text encoder frozen; the UNet trained with the
  epsilon-prediction MSE of Eq. 1, t uniform over the scheduler's training timesteps; DeepSpeed
  AdamW with warmup, optional EMA of the UNet weights; checkpoints every `checkpoint_every` steps;
  a restarted worker or a rerun of the same command resumes from the latest one.
* where there is no pretrained generator to start from (the toy world), the same trainer builds
  one: `captions` feeds whole images with their captions instead of crops, and `train: vae`
  trains the VAE (VAEObjective) instead of the UNet, then sets its latent scaling factor.
* `train: gligen` makes a layout-conditioned generator (GLIGEN): the UNet gains gated
  self-attention layers and a box encoder (engine.models.diffusion.gated_unet), the only
  parameters trained, on whole images centre-cut with their boxes, each box's phrase its category
  name; the box encoder sees the phrases' pooled embeddings centred on the dataset's categories
  (phrase_norm), folded into its first layer when saved; the pipeline is written as a plain
  StableDiffusionGLIGENPipeline, which layout rows load.
* driver: the base pipeline with the trained (EMA, if enabled) UNet, written with
  `save_pretrained` to `output_dir` (via a temporary folder, so no half-written pipeline is ever
  left there); `engine.models.diffusion.load_pipeline(ModelConfig(source=output_dir))` loads it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from engine.config import (
    ConfigError,
    FinetuneConfig,
    ModelConfig,
    fingerprint,
    from_dict,
    to_dict,
)
from engine.config.sections import GLIGEN_MAX_OBJECTS, check_template
from engine.data.datasets import (
    CORRUPT_IMAGE,
    CaptionRecord,
    DatasetError,
    ImageRecord,
    SkipReport,
    check_dataset,
    decode_image,
    load_captions,
    load_detection_dataset,
    read_bytes,
    split_records,
)
from engine.models.diffusion import (
    FINETUNED_FROM,
    PromptEmbeddings,
    box_mask,
    fold_phrase_norm,
    gated_unet,
    grounding_tokens,
    is_gligen_param,
    load_pipeline,
    phrase_norm,
)
from engine.runtime.cache import ByteBudgetCache
from engine.runtime.cluster import connect, quiet_data_context
from engine.runtime.faults import maybe_crash
from engine.runtime.storage import atomic_folder
from engine.training.runner import (
    TrainSummary,
    all_reduce,
    check_resources,
    deepspeed_config,
    deepspeed_engine,
    fit,
    load_tensors,
    read_meta,
    report,
    restore_checkpoint,
)

NO_OBJECT = "no object in crop"
NO_LAYOUT = json.dumps({"boxes": [], "labels": []})
TOO_SMALL = "image smaller than crop"
DECODE_REASONS = ("missing image", CORRUPT_IMAGE)


# ---------------------------------------------------------------------------------------------
# Crops and prompts (pure functions, no pixels)


@dataclass
class Crop:
    x0: int  # in the scaled image
    y0: int
    size: int
    scale: float  # the image is resized by this factor before cutting
    names: list[str]  # unique category names of counted objects, most visible first


def visible_fraction(box: list[float], x0: float, y0: float, size: float) -> float:
    bx0, by0, bx1, by1 = box
    area = (bx1 - bx0) * (by1 - by0)
    if area <= 0:
        return 0.0
    iw = min(bx1, x0 + size) - max(bx0, x0)
    ih = min(by1, y0 + size) - max(by0, y0)
    return max(iw, 0.0) * max(ih, 0.0) / area


def crop_names(boxes: list[list[float]], labels: list[str], x0: float, y0: float, size: float,
               min_visible: float) -> list[str]:
    """Names of the categories with an object at least `min_visible` inside the crop, each once,
    ordered by the largest visible area of an object of that category."""
    best: dict[str, float] = {}
    for box, label in zip(boxes, labels):
        frac = visible_fraction(box, x0, y0, size)
        if frac >= min_visible and frac > 0:
            area = frac * (box[2] - box[0]) * (box[3] - box[1])
            best[label] = max(best.get(label, 0.0), area)
    return sorted(best, key=lambda n: -best[n])


def crop_scale(width: int, height: int, size: int, max_upscale: float) -> Optional[float]:
    """Scale that makes the short side at least `size` (1.0 if it already is); None if that
    needs more than `max_upscale`."""
    short = min(width, height)
    if short >= size:
        return 1.0
    scale = size / short
    return scale if scale <= max_upscale + 1e-9 else None


def plan_crop(record: ImageRecord, size: int, min_visible: float, max_upscale: float,
              rng: np.random.Generator, max_redraws: int) -> Optional[Crop]:
    """A random crop holding at least one counted object, or None.

    Up to `max_redraws` + 1 uniformly placed crops are drawn; if none holds a counted object
    (small objects in a large image), the crop is placed uniformly among the positions that hold
    a randomly chosen object whole (or centred on it when it is larger than the crop). None when
    even that names nothing (an object too large to show `min_visible` of it) or the image is
    too small for the crop.
    """
    scale = crop_scale(record.width, record.height, size, max_upscale)
    if scale is None:
        return None
    w, h = int(math.ceil(record.width * scale)), int(math.ceil(record.height * scale))
    w, h = max(w, size), max(h, size)
    boxes = [[v * scale for v in b] for b in record.boxes]
    for _ in range(max_redraws + 1):
        x0 = int(rng.integers(0, w - size + 1))
        y0 = int(rng.integers(0, h - size + 1))
        names = crop_names(boxes, record.labels, x0, y0, size, min_visible)
        if names:
            return Crop(x0, y0, size, scale, names)
    if not boxes:
        return None
    bx0, by0, bx1, by1 = boxes[int(rng.integers(len(boxes)))]
    x0 = _anchored(bx0, bx1, size, w, rng)
    y0 = _anchored(by0, by1, size, h, rng)
    names = crop_names(boxes, record.labels, x0, y0, size, min_visible)
    return Crop(x0, y0, size, scale, names) if names else None


def _anchored(lo: float, hi: float, size: int, extent: int, rng: np.random.Generator) -> int:
    """A crop start along one axis that keeps [lo, hi) inside the crop, or centres it if it is
    longer than the crop; always within the image."""
    first, last = int(math.ceil(hi)) - size, int(math.floor(lo))
    if first > last:  # the object is longer than the crop
        first = last = int(round((lo + hi - size) / 2))
    first, last = max(first, 0), min(last, extent - size)
    if first > last:
        return min(max(first, 0), extent - size)
    return int(rng.integers(first, last + 1))


def make_prompt(names: list[str], template: str, name_template: str = "{name}", joiner: str = " and ") -> str:
    return template.format(categories=joiner.join(name_template.format(name=n) for n in names))


def plan_samples(records: list[ImageRecord], fc: FinetuneConfig, n_samples: int,
                 skipped: SkipReport) -> list[dict]:
    """`n_samples` rows (file, crop, prompt) cycling through the images in a seeded random order.
    Images that can never give a crop are counted once and dropped from the cycle."""
    rng = np.random.default_rng(fc.seed)
    usable = []
    for r in records:
        if crop_scale(r.width, r.height, fc.crop_size, fc.max_upscale) is None:
            skipped.add(TOO_SMALL, f"{r.file} ({r.width}x{r.height})")
        else:
            usable.append(r)
    rows: list[dict] = []
    attempts, limit = 0, 10 * n_samples + len(usable)  # ends a plan where almost no crop has an object
    while len(rows) < n_samples and usable and attempts < limit:
        for i in rng.permutation(len(usable)):
            attempts += 1
            r = usable[int(i)]
            crop = plan_crop(r, fc.crop_size, fc.min_visible_fraction, fc.max_upscale, rng, fc.max_redraws)
            if crop is None:
                skipped.add(NO_OBJECT, r.file)
            else:
                rows.append({"id": r.id, "file": r.file, "x0": crop.x0, "y0": crop.y0, "scale": crop.scale,
                             "prompt": make_prompt(crop.names, fc.template, fc.name_template, fc.joiner)})
            if len(rows) == n_samples or attempts >= limit:
                break
    return rows


def plan_caption_samples(records: list[CaptionRecord], fc: FinetuneConfig, n_samples: int) -> list[dict]:
    """`n_samples` rows cycling through image-caption pairs in a seeded random order: each image
    scaled so its short side is crop_size and centre-cut, so the caption still holds."""
    rng = np.random.default_rng(fc.seed)
    rows: list[dict] = []
    while len(rows) < n_samples:
        for i in rng.permutation(len(records)):
            r = records[int(i)]
            scale = fc.crop_size / min(r.width, r.height)
            w, h = max(fc.crop_size, math.ceil(r.width * scale)), max(fc.crop_size, math.ceil(r.height * scale))
            rows.append({"id": int(i), "file": r.file, "x0": (w - fc.crop_size) // 2, "y0": (h - fc.crop_size) // 2,
                         "scale": scale, "prompt": r.caption})
            if len(rows) == n_samples:
                break
    return rows


def plan_layout_samples(records: list[ImageRecord], fc: FinetuneConfig, n_samples: int,
                        skipped: SkipReport) -> list[dict]:
    """`n_samples` rows (GLIGEN training) cycling through the images in a seeded random order:
    each scaled so its short side is crop_size and centre-cut, with its boxes cut likewise (a box
    less than min_visible_fraction inside is left out of the layout and the prompt), as
    normalised xyxy boxes and their names."""
    rng = np.random.default_rng(fc.seed)
    planned = []
    for r in records:
        scale = fc.crop_size / min(r.width, r.height)  # the cut plan_caption_samples makes
        w, h = max(fc.crop_size, math.ceil(r.width * scale)), max(fc.crop_size, math.ceil(r.height * scale))
        x0, y0 = (w - fc.crop_size) // 2, (h - fc.crop_size) // 2
        boxes, labels = [], []
        for box, label in zip(r.boxes, r.labels):
            if visible_fraction([v * scale for v in box], x0, y0, fc.crop_size) >= fc.min_visible_fraction:
                b = [(box[0] * scale - x0) / fc.crop_size, (box[1] * scale - y0) / fc.crop_size,
                     (box[2] * scale - x0) / fc.crop_size, (box[3] * scale - y0) / fc.crop_size]
                boxes.append([min(max(v, 0.0), 1.0) for v in b])
                labels.append(label)
        if not boxes:
            skipped.add(NO_OBJECT, r.file)
            continue
        planned.append({"id": r.id, "file": r.file, "x0": x0, "y0": y0, "scale": scale,
                        "prompt": make_prompt(list(dict.fromkeys(labels)), fc.template, fc.name_template, fc.joiner),
                        "layout": json.dumps({"boxes": boxes[:GLIGEN_MAX_OBJECTS], "labels": labels[:GLIGEN_MAX_OBJECTS]})})
    rows: list[dict] = []
    while planned and len(rows) < n_samples:
        rows += [planned[int(i)] for i in rng.permutation(len(planned))[:n_samples - len(rows)]]
    return rows


def drop_captions(rows: list[dict], fc: FinetuneConfig) -> list[dict]:
    """Empties the prompt (and the layout, for GLIGEN) of a seeded caption_dropout fraction of the
    planned rows: the unconditional prediction classifier-free guidance needs, which sees neither;
    and the prompt alone of a further boxes_only fraction (GLIGEN). Done in the plan, not in the
    worker, so that a resumed run trains on the same prompts. GLIGEN inpainting keeps an emptied
    layout's boxes as its `holes`: guidance's unconditional prediction is redrawn in them too."""
    if fc.caption_dropout == 0 and fc.boxes_only == 0:
        return rows
    draw = np.random.default_rng([fc.seed, 1]).random(len(rows))  # one draw per row decides both

    def empty(r: dict) -> dict:
        if "layout" not in r:
            return {**r, "prompt": ""}
        holes = {"holes": json.loads(r["layout"])["boxes"]} if fc.inpaint else {}
        return {**r, "prompt": "", "layout": json.dumps({**json.loads(NO_LAYOUT), **holes})}
    return [empty(r) if u < fc.caption_dropout else {**r, "prompt": ""}
            if u < fc.caption_dropout + fc.boxes_only else r for r, u in zip(rows, draw)]


def mix_replay(rows: list[dict], fc: FinetuneConfig, skipped: SkipReport) -> list[dict]:
    """Replaces a seeded `replay` fraction of the planned crop rows by image-caption pairs from
    `replay_captions`, at seeded places, so that every stretch of training sees some of both."""
    if fc.replay == 0:
        return rows
    records, replay_skipped = load_captions(fc.replay_captions, fc.replay_image_root, check_images=fc.check_images)
    skipped.merge(replay_skipped)
    rng = np.random.default_rng([fc.seed, 2])
    at = rng.choice(len(rows), round(fc.replay * len(rows)), replace=False)
    rows = list(rows)
    for i, r in zip(at, plan_caption_samples(records, fc, len(at))):
        rows[int(i)] = r
    return rows


# ---------------------------------------------------------------------------------------------
# Ray Data: decode and cut (CPU tasks)


def decode_crops(batch: dict, size: int) -> dict:
    """map_batches function: planned crop rows -> uint8 pixels. A file that cannot be read or
    decoded becomes a row with ok=False and its reason, for the trainer to skip and count."""
    from PIL import Image
    n = len(batch["file"])
    pixels = np.zeros((n, size, size, 3), np.uint8)
    ok = np.zeros(n, bool)
    reason = [""] * n
    for i in range(n):
        try:
            data = read_bytes(str(batch["file"][i]))
        except OSError:
            reason[i] = "missing image"
            continue
        try:
            img = decode_image(data)
        except Exception:  # PIL raises many exception types for a damaged file
            reason[i] = CORRUPT_IMAGE
            continue
        scale = float(batch["scale"][i])
        if scale != 1.0:
            w = max(size, int(math.ceil(img.width * scale)))
            h = max(size, int(math.ceil(img.height * scale)))
            img = img.resize((w, h), Image.BICUBIC)
        x0, y0 = int(batch["x0"][i]), int(batch["y0"][i])
        pixels[i] = np.asarray(img.crop((x0, y0, x0 + size, y0 + size)))
        ok[i] = True
    # What the crop is, for the trainer's latent cache: the same key is the same pixels.
    key = [f"{batch['file'][i]}@{batch['x0'][i]},{batch['y0'][i]}x{batch['scale'][i]}" for i in range(n)]
    out = {"pixels": pixels, "prompt": np.asarray(batch["prompt"]), "key": np.asarray(key), "ok": ok,
           "reason": np.asarray(reason)}
    if "layout" in batch:  # GLIGEN training: the boxes travel with their image
        out["layout"] = np.asarray(batch["layout"])
    return out


# ---------------------------------------------------------------------------------------------
# Worker


class LatentCache:
    """The frozen VAE encoder's output (the latent distribution's mean and log-variance) per crop,
    kept while it fits in `max_mb`. Caption pairs are cut the same way every epoch, so each
    picture is then encoded once instead of once an epoch (encoding was 24% of a toy-world UNet
    step); random crops of detection images rarely come back and simply fill it. The latent is
    still sampled afresh from the distribution at every step, as without the cache."""

    def __init__(self, vae, max_mb: float):
        self.vae, self.cache = vae, ByteBudgetCache(max_mb)

    @torch.no_grad()
    def __call__(self, keys: list[str], x: torch.Tensor) -> torch.Tensor:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        params = self.cache.get(keys, lambda miss: list(self.vae.encode(x[miss]).latent_dist.parameters))
        return DiagonalGaussianDistribution(torch.stack(params)).sample()


class VAEObjective(torch.nn.Module):
    """The VAE's training loss as a module, so DeepSpeed can wrap it: reconstruction MSE of a
    posterior sample plus kl_weight times the KL to N(0, I), per image (LDM's autoencoder
    objective without its perceptual and adversarial terms, which need pretrained networks).
    `decoder_only`: the encoder stays as it is and only the reconstruction trains the decoder, so
    the latent space, and every UNet trained on it, stays valid (as SD's ft-MSE VAE was made)."""

    def __init__(self, vae, kl_weight: float, decoder_only: bool = False):
        super().__init__()
        self.vae, self.kl_weight, self.decoder_only = vae, kl_weight, decoder_only
        if decoder_only:
            for m in (vae.encoder, vae.quant_conv):
                if m is not None:
                    m.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.decoder_only):
            posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(recon.float(), x.float())
        return loss if self.decoder_only else loss + self.kl_weight * posterior.kl().mean()


def _batches(shard, batch_size: int, skips: dict):
    """Batches of exactly `batch_size` good samples from a Ray Data shard (pixels, prompts, keys
    and layouts, the last None but for GLIGEN training); bad rows counted."""
    pix: list[np.ndarray] = []
    prompts: list[str] = []
    keys: list[str] = []
    layouts: list[str] = []
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        rows = zip(batch["pixels"], batch["prompt"], batch["key"], batch["ok"], batch["reason"],
                   batch["layout"] if "layout" in batch else [None] * len(batch["key"]))
        for p, t, k, ok, why, lay in rows:
            if not ok:
                skips[str(why)] = skips.get(str(why), 0) + 1
                continue
            pix.append(p)
            prompts.append(str(t))
            keys.append(str(k))
            layouts.append(lay)
            if len(pix) == batch_size:
                yield np.stack(pix), prompts, keys, None if layouts[0] is None else [json.loads(str(x)) for x in layouts]
                pix, prompts, keys, layouts = [], [], [], []


def train_loop(config: dict) -> None:
    """The Ray Train worker: everything it needs arrives in `config` (plain dicts)."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel


    fc = from_dict(FinetuneConfig, config["finetune"])
    mc = from_dict(ModelConfig, config["model"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    cuda = torch.cuda.is_available() and fc.run.use_gpu
    if not cuda:
        torch.set_num_threads(max(1, int(round(fc.run.cpus_per_worker))))
    device = str(ray.train.torch.get_device()) if cuda else "cpu"  # the GPU Ray Train gave this worker
    bf16 = fc.run.bf16 and cuda
    torch.manual_seed(fc.seed + 1000 * rank)

    # The trained part loads in fp32 (DeepSpeed makes its own bf16 copy); the frozen parts run in
    # bf16 on GPU.
    pipe = load_pipeline(dataclasses.replace(mc, dtype="float32"), device=device)
    vae, text_encoder, unet = pipe.vae, pipe.text_encoder, pipe.unet
    train_vae, train_gligen = fc.train in ("vae", "decoder"), fc.train == "gligen"
    frozen_dtype = torch.bfloat16 if bf16 else torch.float32
    for m in (text_encoder, unet) if train_vae else (vae, text_encoder):
        m.requires_grad_(False).eval().to(device, frozen_dtype)
    if train_gligen:  # only what GLIGEN adds is trained (the whole UNet for inpainting, as inpainting models are)
        unet = gated_unet(unet, fc.gate, fc.inpaint)
        norm = (torch.tensor(config["phrase_norm"]["mean"]), config["phrase_norm"]["scale"])
        for name, param in unet.named_parameters():
            param.requires_grad_(fc.inpaint or is_gligen_param(name))
            if param.dim() == 0:  # GLIGEN's gates; DeepSpeed's broadcast views each parameter as bytes, not a 0-d one
                param.data = param.data.reshape(1)
    trained = VAEObjective(vae, fc.kl_weight, fc.train == "decoder") if train_vae else unet
    trained.train()
    if fc.grad_checkpointing and cuda and not train_vae:
        unet.enable_gradient_checkpointing()
    encode_latents, encode_prompts = LatentCache(vae, fc.latent_cache_mb), PromptEmbeddings(pipe)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    steps_t = noise_sched.config.num_train_timesteps
    # diffusers' EMA: fp32 copies (made before DeepSpeed casts the module), decay warmed up as
    # min(decay, (1 + step) / (10 + step)) so early averages are not dominated by the random start.
    ema = EMAModel(trained.parameters(), decay=fc.ema_decay) if fc.ema else None
    names = [n for n, _ in trained.named_parameters()]

    ds_cfg = deepspeed_config(fc.run.zero_stage, fc.lr, fc.weight_decay, fc.warmup_steps, fc.max_steps, bf16,
                              fc.grad_accum, fc.batch_size, fc.clip)
    engine = deepspeed_engine(trained, ds_cfg)

    losses: list[float] = []  # per step, carried across restarts in the checkpoints

    def on_load(directory: str, meta: dict) -> None:
        losses.extend(meta["extra"].get("losses", []))
        state = load_tensors(directory, "ema")
        if ema is not None and state is not None:
            for shadow, name in zip(ema.shadow_params, names):
                shadow.copy_(state[name])
            ema.optimization_step = int(meta["step"])

    start = restore_checkpoint(engine, on_load=on_load)
    skips: dict[str, int] = {}
    shard = ray.train.get_dataset_shard("train")
    stream = _batches(shard, fc.batch_size, skips)
    dtype = torch.bfloat16 if bf16 else torch.float32

    def next_batch():
        try:
            pixels, prompts, keys, layouts = next(stream)
        except StopIteration:
            # The driver planned enough samples for every step; ending early would leave the
            # other ranks waiting in an all-reduce, so say clearly why.
            raise RuntimeError(f"rank {rank} ran out of training samples ({skips} skipped); too many "
                               f"images failed to decode") from None
        x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).to(frozen_dtype) / 127.5 - 1.0
        if train_vae:
            return (x.to(dtype),)
        latents = encode_latents(keys, x) * vae.config.scaling_factor
        text = encode_prompts(prompts)
        noise = torch.randn_like(latents)
        t = torch.randint(0, steps_t, (latents.shape[0],), device=device)  # uniform over training steps
        kwargs, kept = {}, None
        if train_gligen:
            tokens = grounding_tokens(pipe.tokenizer, text_encoder, [(lay["boxes"], lay["labels"]) for lay in layouts],
                                      unet.config.cross_attention_dim, norm)
            kwargs["cross_attention_kwargs"] = {"gligen": {k: v.to(device, dtype) for k, v in tokens.items()}}
        if fc.inpaint:  # the picture outside its boxes, as inpainting keeps it, and the mask
            mask = box_mask([lay.get("holes", lay["boxes"]) for lay in layouts], *latents.shape[2:]).to(latents)
            kept = torch.cat([latents * mask, mask], dim=1)
        return latents, text, noise, t, kwargs, kept

    fixed = None
    t0, timed = None, 0  # throughput from the third step on: the first ones pay for warm-up
    for step in range(start + 1, fc.max_steps + 1):
        maybe_crash("finetune", step)
        for _ in range(fc.grad_accum):  # DeepSpeed steps the optimizer on the last micro-batch
            if fc.overfit_batch:
                fixed = fixed or next_batch()
                batch = fixed
            else:
                batch = next_batch()
            if train_vae:
                loss = engine(*batch)
            else:
                latents, text, noise, t, kwargs, kept = batch
                # Eq. 1: || eps - eps_theta(z_t, t, c) ||^2, z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps.
                noisy = noise_sched.add_noise(latents.float(), noise.float(), t)
                if kept is not None:
                    noisy = torch.cat([noisy, kept.float()], dim=1)
                pred = engine(noisy.to(dtype), t, encoder_hidden_states=text.to(dtype), **kwargs).sample
                loss = F.mse_loss(pred.float(), noise.float())
            engine.backward(loss)
            engine.step()
        if ema is not None:
            ema.step(engine.module.parameters())
        if step - start == 2:
            t0 = time.time()
        elif step - start > 2:
            timed += fc.batch_size * fc.grad_accum
        losses.append(float(loss.detach()))
        last = step == fc.max_steps
        metrics = {"loss": float(loss.detach()), "start_step": start, "lr": engine.get_lr()[0],
                   "samples_per_s": timed / (time.time() - t0) if timed else None}
        if last:
            metrics["decode_skips"] = _all_reduce_counts(skips)
            metrics["losses"] = losses
            metrics["peak_rss_mb"] = _gather_peak_rss()
        report(metrics, engine, step, fc.run.checkpoint_every, extra={"losses": losses}, last=last,
               tensors=(lambda: {"ema": dict(zip(names, ema.shadow_params))}) if ema is not None else None)
    if start >= fc.max_steps:
        # A rerun of a finished run: nothing to train; the latest checkpoint is the result.
        ray.train.report({"loss": losses[-1] if losses else None, "start_step": start, "step": start,
                          "losses": losses, "samples_per_s": None, "decode_skips": {},
                          "peak_rss_mb": _gather_peak_rss()})


def _gather_peak_rss() -> list[float]:
    """Peak resident memory of every worker process, in MiB, in rank order."""
    import resource

    import torch
    import torch.distributed as dist
    mine = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    if not dist.is_initialized():
        return mine.tolist()
    out = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [round(t.item(), 1) for t in out]


def _all_reduce_counts(skips: dict) -> dict:
    counts = all_reduce(torch.tensor([float(skips.get(r, 0)) for r in DECODE_REASONS]))
    return {r: int(c) for r, c in zip(DECODE_REASONS, counts.tolist()) if c}


# ---------------------------------------------------------------------------------------------
# Driver


def _check_config(fc: FinetuneConfig, base: list[str]) -> None:
    def need(cond: bool, message: str) -> None:
        if not cond:
            raise ConfigError(message)
    need(bool(fc.annotations) != bool(fc.captions), "set exactly one of finetune.annotations (a COCO/LVIS "
         "instances JSON: crops of base categories) and finetune.captions (a COCO captions JSON)")
    need(bool(base) or bool(fc.captions),
         "no base categories: set prompts.base (or finetune.base) to the categories to fine-tune on")
    need(fc.train in ("unet", "vae", "decoder", "gligen"),
         f"finetune.train must be unet, vae, decoder or gligen, got {fc.train!r}")
    need(fc.train != "gligen" or (fc.annotations and not fc.replay),
         "finetune.train=gligen learns boxes: set finetune.annotations (a COCO/LVIS instances JSON of whole images "
         "and their boxes) and leave finetune.captions and finetune.replay unset")
    need(fc.kl_weight >= 0, f"finetune.kl_weight must be >= 0, got {fc.kl_weight}")
    need(0.0 <= fc.caption_dropout < 1.0, f"finetune.caption_dropout must lie in [0, 1), got {fc.caption_dropout}")
    need(fc.boxes_only == 0 or fc.train == "gligen", "finetune.boxes_only keeps the boxes of rows whose caption it "
         f"empties: it needs finetune.train=gligen (got {fc.train!r})")
    need(0.0 <= fc.boxes_only and fc.caption_dropout + fc.boxes_only < 1.0,
         f"finetune.boxes_only must be >= 0 and caption_dropout + boxes_only below 1, got {fc.boxes_only}")
    need(not fc.inpaint or fc.train == "gligen", "finetune.inpaint makes a GLIGEN inpainting model: it needs "
         f"finetune.train=gligen (got {fc.train!r})")
    need(0.0 <= fc.gate <= 1.0, f"finetune.gate (where GLIGEN's gates start) must lie in [0, 1], got {fc.gate}")
    need(0.0 <= fc.replay < 1.0, f"finetune.replay must lie in [0, 1), got {fc.replay}")
    need(fc.replay == 0 or (fc.replay_captions and fc.annotations),
         "finetune.replay needs finetune.replay_captions (a COCO captions JSON of data like the base model's) "
         "and replays it into fine-tuning on finetune.annotations' crops")
    need(fc.crop_size >= 8 and fc.crop_size % 8 == 0, f"finetune.crop_size must be a positive multiple of 8, got {fc.crop_size}")
    need(0.0 < fc.min_visible_fraction <= 1.0, f"finetune.min_visible_fraction must lie in (0, 1], got {fc.min_visible_fraction}")
    need(fc.max_upscale >= 1.0, f"finetune.max_upscale must be >= 1, got {fc.max_upscale}")
    check_template("finetune.template", fc.template, ("categories",))
    check_template("finetune.name_template", fc.name_template, ("name",))
    need(fc.max_steps >= 1 and fc.batch_size >= 1 and fc.grad_accum >= 1,
         "finetune.max_steps, batch_size and grad_accum must be >= 1")
    need(0 <= fc.warmup_steps <= fc.max_steps, f"finetune.warmup_steps ({fc.warmup_steps}) must lie in [0, max_steps={fc.max_steps}]")
    need(0.0 < fc.ema_decay < 1.0, f"finetune.ema_decay must lie in (0, 1), got {fc.ema_decay}")
    fc.run.validate("finetune")
    need(fc.latent_cache_mb >= 0, f"finetune.latent_cache_mb must be >= 0, got {fc.latent_cache_mb}")


def _check_model_fits(pipe, crop_size: int) -> None:
    factor = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if crop_size % factor:
        raise ConfigError(f"finetune.crop_size={crop_size} must be a multiple of {factor} for this model "
                          f"(VAE downsampling x UNet levels)")
    if pipe.scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        raise ConfigError(f"the base model predicts {pipe.scheduler.config['prediction_type']!r}; this "
                          f"fine-tuning trains the epsilon-prediction loss of the paper (SD v1.x)")


def prepare(cfg: Any) -> tuple[FinetuneConfig, list[dict], SkipReport, int]:
    """Everything that can fail before training: config, dataset, crop plan. Returns the config,
    the planned rows, the skip report and the number of usable images."""
    fc: FinetuneConfig = cfg.finetune
    base = base_of(cfg)
    _check_config(fc, base)
    # The files it reads are there before any is parsed or an image decoded.
    if fc.captions:
        check_dataset(fc.captions, fc.image_root, ("finetune.captions", "finetune.image_root"))
    else:
        check_dataset(fc.annotations, fc.image_root, ("finetune.annotations", "finetune.image_root"))
    if fc.replay:
        check_dataset(fc.replay_captions, fc.replay_image_root,
                      ("finetune.replay_captions", "finetune.replay_image_root"))
    need = fc.max_steps * fc.batch_size * fc.grad_accum * fc.run.num_workers
    if fc.captions:
        records, skipped = load_captions(fc.captions, fc.image_root, check_images=fc.check_images)
        rows = plan_caption_samples(records, fc, int(need * 1.1) + fc.batch_size * fc.run.num_workers)
        return fc, drop_captions(rows, fc), skipped, len({r.file for r in records})
    ds = load_detection_dataset(fc.annotations, fc.image_root, fc.format, check_images=fc.check_images)
    base_ds = split_records(ds, base)
    if not base_ds.records:
        raise DatasetError(f"no image of {fc.annotations!r} holds a base category ({', '.join(base[:10])}); "
                           f"{ds.skipped.summary()}; check prompts.base against the dataset's category names")
    skipped = base_ds.skipped
    fits = [r for r in base_ds.records if crop_scale(r.width, r.height, fc.crop_size, fc.max_upscale) is not None]
    if not fits:
        largest = max(min(r.width, r.height) for r in base_ds.records)
        raise ConfigError(f"finetune.crop_size={fc.crop_size} is larger than every base-category image (largest "
                          f"short side {largest}, max_upscale {fc.max_upscale}); lower crop_size or raise max_upscale")
    if fc.batch_size * fc.run.num_workers > len(fits):
        raise ConfigError(f"finetune.batch_size={fc.batch_size} x num_workers={fc.run.num_workers} is more than the "
                          f"{len(fits)} usable base-category images; lower batch_size or num_workers")
    # Enough samples for every rank to reach max_steps, plus a margin for images that fail to
    # decode inside Ray Data (counted there, and a rank that ran short would stall the others).
    plan = plan_layout_samples if fc.train == "gligen" else plan_samples
    rows = plan(base_ds.records, fc, int(need * 1.1) + fc.batch_size * fc.run.num_workers, skipped)
    if len(rows) < need:
        raise ConfigError(f"only {len(rows)} crops with an object at least {fc.min_visible_fraction} visible "
                          f"could be planned ({need} needed); lower finetune.min_visible_fraction or crop_size")
    return fc, drop_captions(mix_replay(rows, fc, skipped), fc), skipped, len(fits)


def finetune(cfg: Any) -> TrainSummary:
    """Fine-tune cfg.model on cfg.finetune's dataset; write the pipeline to finetune.output_dir.
    `cfg` needs .model, .prompts, .finetune and .ray."""
    import ray
    import torch


    started = time.time()
    fc, rows, skipped, n_images = prepare(cfg)
    base_pipe = load_pipeline(dataclasses.replace(cfg.model, dtype="float32"), device="cpu")
    _check_model_fits(base_pipe, fc.crop_size)

    connect(cfg.ray)
    resources = ray.cluster_resources()
    check_resources(fc.run, resources)

    _check_same_run(cfg, fc, base_of(cfg))
    quiet_data_context()
    data = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // max(fc.batch_size, 1), 64)))
    # Plain CPU tasks, not actors: decoding is stateless, and tasks scale with the CPUs there are.
    data = data.map_batches(decode_crops, fn_kwargs={"size": fc.crop_size}, batch_size=fc.batch_size,
                            batch_format="numpy", num_cpus=fc.run.data_cpus)
    loop_cfg = {"finetune": dataclasses.asdict(fc), "model": dataclasses.asdict(cfg.model)}
    if fc.train == "gligen":  # the box encoder learns on phrase embeddings centred on the dataset's categories
        mean, scale = phrase_norm(base_pipe.tokenizer, base_pipe.text_encoder,
                                  [p for r in rows for p in json.loads(r["layout"])["labels"]])
        loop_cfg["phrase_norm"] = {"mean": mean.tolist(), "scale": scale}
    result = fit(train_loop, loop_cfg, fc.run, {"train": data}, "fine-tuning")
    metrics = result.metrics or {}
    for reason, n in (metrics.get("decode_skips") or {}).items():
        skipped.add(reason, n=n)

    with result.checkpoint.as_directory() as d:
        meta = read_meta(d)
        state = (load_tensors(d, "ema") if fc.ema else None) or load_tensors(d, "model")
        state = {k: v.to(torch.float32) for k, v in state.items()}
    if fc.train in ("vae", "decoder"):
        base_pipe.vae.load_state_dict({k.removeprefix("vae."): v for k, v in state.items()})
        if fc.train == "vae":  # a new latent space; the decoder alone keeps the old one and its scale
            base_pipe.vae.register_to_config(scaling_factor=latent_scaling_factor(base_pipe.vae, rows, fc.crop_size))
    elif fc.train == "gligen":
        base_pipe = gligen_pipeline(base_pipe, state, fc.inpaint)
        fold_phrase_norm(base_pipe.unet, mean, scale)  # the saved GLIGEN takes raw embeddings, as any GLIGEN
    else:
        base_pipe.unet.load_state_dict(state)
    _save_pipeline(base_pipe, fc.output_dir, cfg.model.source)
    figures = {"loss": metrics.get("loss"), "start_step": metrics.get("start_step", 0),
               "losses": metrics.get("losses", []), "samples_per_s": metrics.get("samples_per_s"),
               "peak_rss_mb": metrics.get("peak_rss_mb"), "images": n_images, "planned_crops": len(rows),
               "ema": fc.ema, "skipped": skipped.to_dict(), "skipped_summary": skipped.summary()}
    summary = TrainSummary(fc.output_dir, int(meta["step"]), result.checkpoint.path, figures, time.time() - started)
    return summary


@torch.no_grad()
def latent_scaling_factor(vae, rows: list[dict], size: int, n: int = 256) -> float:
    """1 / std of the trained VAE's latents over `n` training images: the diffusion model then
    sees unit-variance latents, as SD's 0.18215 was chosen for its VAE."""
    pixels = decode_crops({k: [r[k] for r in rows[:n]] for k in rows[0]}, size)["pixels"]
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    z = torch.cat([vae.encode(chunk).latent_dist.sample() for chunk in x.split(32)])
    return float(1.0 / z.std())


def gligen_pipeline(pipe, state: dict, inpaint: bool = False):
    """The GLIGEN pipeline of `pipe`'s parts, its UNet gated (for inpainting with `inpaint`) and
    given the trained `state`."""
    from diffusers import StableDiffusionGLIGENPipeline
    unet = gated_unet(pipe.unet, inpaint=inpaint)
    shapes = {k: v.shape for k, v in unet.state_dict().items()}
    unet.load_state_dict({k: v.reshape(shapes[k]) for k, v in state.items()})  # the gates trained as (1,)
    return StableDiffusionGLIGENPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                         unet=unet, scheduler=pipe.scheduler, safety_checker=None,
                                         feature_extractor=None, requires_safety_checker=False)


def base_of(cfg: Any) -> list[str]:
    return list(cfg.finetune.base) or list(cfg.prompts.base)


# What a resumed run must share with the run that wrote the checkpoints; max_steps, workers,
# checkpoint_every and the like may change between the two.
_RUN_KEYS = ("annotations", "captions", "train", "kl_weight", "format", "crop_size", "min_visible_fraction", "template",
             "name_template", "joiner", "caption_dropout", "replay", "replay_captions", "ema")
# GLIGEN's own; with them in its fingerprint, a GLIGEN run started before its phrase embeddings
# were centred (they were raw) is not resumed on centred ones. Other runs keep their fingerprint.
_GLIGEN_KEYS = ("boxes_only", "gate")


def _check_same_run(cfg: Any, fc: FinetuneConfig, base: list[str]) -> None:
    """Refuse to resume checkpoints of a different fine-tuning under the same storage_path/name
    (they would silently continue from another model or dataset)."""
    import fsspec

    want = {"fingerprint": fingerprint({"model": to_dict(cfg.model), "base": base,
                                        **{k: getattr(fc, k) for k in _RUN_KEYS + (_GLIGEN_KEYS if fc.train == "gligen" else ())},
                                        **({"inpaint": True} if fc.inpaint else {}),  # only when on: as before
                                        "zero_stage": fc.run.zero_stage})}
    path = f"{fc.run.storage_path.rstrip('/')}/{fc.run.name}/instagen_run.json"
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
    fs, p = fsspec.core.url_to_fs(path)
    if fs.exists(p):
        with fs.open(p, "r") as f:
            have = json.load(f)
        if have.get("fingerprint") != want["fingerprint"]:
            raise ConfigError(f"{fc.run.storage_path}/{fc.run.name} holds checkpoints of a fine-tuning with another model, "
                              f"dataset or crop/prompt settings; set finetune.run.name to a new run name (or delete "
                              f"that folder to start over)")
        return
    fs.makedirs(fs._parent(p), exist_ok=True)
    with fs.open(p, "w") as f:
        json.dump(want, f)


def _save_pipeline(pipe, output_dir: str, base_source: str) -> None:
    """save_pretrained into a temporary sibling, then swap it in: a crash never leaves a
    half-written pipeline where the generate job would load it. The folder names the model it
    was fine-tuned from (engine.models.diffusion.finetuned_from)."""
    with atomic_folder(output_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        with open(os.path.join(tmp, FINETUNED_FROM), "w") as f:
            json.dump({"source": base_source}, f)


def summary_lines(summary: TrainSummary) -> list[str]:
    m = summary.metrics
    rate = m["samples_per_s"]
    return [f"[finetune] {summary.line()} (resumed at step {m['start_step']}), "
            + (f"{rate:.2f} samples/s per worker" if rate else "too few steps to time"),
            f"[finetune] data: {m['images']} base-category images, {m['planned_crops']} crops; "
            f"{m['skipped_summary']}"]
