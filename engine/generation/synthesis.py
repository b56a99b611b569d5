"""Synthesis: Stable Diffusion draws images for PromptSpec rows.

The denoising loop is written out (rather than calling the pipeline) because InstaGen needs what
the pipeline throws away: the latents that enter the last denoising step (the paper's step T-1,
from which the grounding head later recomputes UNet features) and, optionally, the UNet decoder
features of that last step. Each sample's starting noise comes from its own seed, so an image does
not depend on the batch it was drawn in, nor on the actor that drew it.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch
from PIL import Image

from engine.config import ExpandConfig, ModelConfig, SynthesisConfig
from engine.data.datasets import open_image
from engine.generation.expansion import Expander, cache_dir
from engine.generation.layouts import Layout
from engine.generation.prompts import PromptPlan, PromptSpec
from engine.models.diffusion import UNetFeatureTap, box_mask, grounding_tokens, load_pipeline
from engine.runtime.faults import maybe_crash, poison_nonfinite


@dataclass
class Drawn:
    images: np.ndarray  # (B, H, W, 3) uint8
    latents: np.ndarray  # (B, C, h, w) float32: input of the last denoising step
    features: Optional[list[np.ndarray]]  # per up-block (B, C_i, h_i, w_i) float16, or None
    finite: np.ndarray  # (B,) bool: image and latents are free of NaN/Inf


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds])


def gligen_inputs(pipe, layouts: list[Layout], guided: bool) -> dict:
    """GLIGEN's grounding input for a batch (engine.models.diffusion.grounding_tokens), each sample
    with its own boxes. The unconditional half of a guided batch gets no boxes (mask 0), as in
    StableDiffusionGLIGENPipeline."""
    tokens = grounding_tokens(pipe.tokenizer, pipe.text_encoder, [(lay.boxes, lay.labels) for lay in layouts],
                              pipe.unet.config.cross_attention_dim)
    if guided:
        tokens = {"boxes": torch.cat([tokens["boxes"]] * 2), "positive_embeddings": torch.cat([tokens["positive_embeddings"]] * 2),
                  "masks": torch.cat([torch.zeros_like(tokens["masks"]), tokens["masks"]])}
    return {k: v.to(pipe.unet.device, pipe.unet.dtype) for k, v in tokens.items()}


def inpaint_inputs(pipe, sources: torch.Tensor, layouts: list[Layout], shape: tuple[int, ...]):
    """GLIGEN inpainting's inputs: the source images' latents (the VAE's mode, so that a sample
    does not depend on a random draw) and a mask on the latent grid, 1 where the source is kept
    (outside every box), 0 inside the boxes that are redrawn."""
    vae = pipe.vae
    kept = vae.encode(sources.to(vae.device, vae.dtype)).latent_dist.mode() * vae.config.scaling_factor
    mask = box_mask([lay.boxes for lay in layouts], shape[1], shape[2])
    return kept.to(pipe.unet.device, pipe.unet.dtype), mask.to(pipe.unet.device, pipe.unet.dtype)


def set_gated_layers(unet, enabled: bool) -> None:
    """GLIGEN's scheduled sampling: the gated layers act only in the first steps."""
    from diffusers.models.attention import GatedSelfAttentionDense
    for module in unet.modules():
        if type(module) is GatedSelfAttentionDense:
            module.enabled = enabled


@torch.no_grad()
def draw(pipe, texts: list[str], seeds: list[int], cfg: SynthesisConfig,
         layouts: Optional[list[Layout]] = None, gligen_beta: float = 0.3,
         sources: Optional[torch.Tensor] = None) -> Drawn:
    """`layouts`: one per text, for a GLIGEN pipeline, whose gated layers read the boxes during the
    first `gligen_beta` of the steps (GLIGEN's scheduled sampling). `sources` (B, 3, H, W in
    [-1, 1]): GLIGEN inpainting, which keeps each source image outside its layout's boxes (at every
    step the kept part is the source's latents noised to that step) and redraws inside them."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    guided = cfg.guidance > 1.0
    cond, uncond = pipe.encode_prompt(texts, device, 1, guided)
    text_emb = torch.cat([uncond, cond]) if guided else cond
    grounding = gligen_inputs(pipe, layouts, guided) if layouts is not None else None

    scale = pipe.vae_scale_factor
    shape = (pipe.unet.config.out_channels, cfg.height // scale, cfg.width // scale)
    sched = pipe.scheduler
    sched.set_timesteps(cfg.steps, device=device)
    latents = (initial_noise(seeds, shape) * sched.init_noise_sigma).to(device, dtype)
    if sources is not None:
        kept, mask = inpaint_inputs(pipe, sources, layouts, shape)
        # The noise the kept part is noised with: the sample's own, from a seed of its own.
        kept_noise = initial_noise([(s + 7919) % 2**31 for s in seeds], shape).to(device, dtype)
        extra = torch.cat([kept * mask, mask], dim=1)
        extra = torch.cat([extra, extra]) if guided else extra

    tap = UNetFeatureTap(pipe.unet) if cfg.keep_features else None
    last = len(sched.timesteps) - 1
    grounded_steps = int(gligen_beta * len(sched.timesteps)) if grounding else 0
    try:
        if grounding:
            set_gated_layers(pipe.unet, True)
        for i, t in enumerate(sched.timesteps):
            if i == last:
                before_last = latents.float().cpu()
                if tap:
                    tap.active = True
            if grounding and i == grounded_steps:
                set_gated_layers(pipe.unet, False)
            if sources is not None:
                latents = sched.add_noise(kept, kept_noise, t.reshape(1)) * mask + latents * (1 - mask)
            x = torch.cat([latents, latents]) if guided else latents
            x = sched.scale_model_input(x, t)
            if sources is not None:
                x = torch.cat([x, extra], dim=1)
            # The UNet turns the grounding input into its tokens each call; a fresh dict each step.
            kwargs = {"cross_attention_kwargs": {"gligen": dict(grounding)}} if grounding else {}
            eps = pipe.unet(x, t, encoder_hidden_states=text_emb, **kwargs).sample
            if guided:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + cfg.guidance * (eps_c - eps_u)
            latents = sched.step(eps, t, latents).prev_sample
        features = None
        if tap:
            # With guidance the batch is [uncond, cond]: keep the text-conditioned half.
            features = [(f.chunk(2)[1] if guided else f).to(torch.float16).cpu().numpy() for f in tap.outputs]
    finally:
        if tap:
            tap.close()

    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.float().cpu()
    if sources is not None:
        # The source's own pixels outside the boxes, as inpainting promises: through the VAE they
        # would come back blurred (and the toy world's VAE, trained on plain pictures, cannot draw
        # its cluttered scenes at all: mean error 0.58 of the [-1, 1] range).
        keep = torch.nn.functional.interpolate(mask.float().cpu(), size=image.shape[2:], mode="nearest")
        image = keep * sources.float().cpu() + (1 - keep) * image
    finite = torch.isfinite(image).flatten(1).all(1) & torch.isfinite(before_last).flatten(1).all(1)
    pixels = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return Drawn(pixels, before_last.numpy(), features, finite.numpy())


def derived_seed(seed: int, attempt: int) -> int:
    """A new, deterministic seed for the attempt-th regeneration of a sample."""
    return (int(seed) + 1_000_003 * attempt) % 2**31


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encode_npz(arrays: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{f"level{i}": a for i, a in enumerate(arrays)})
    return buf.getvalue()


class Synthesizer:
    """A Ray Data actor: loads the pipeline once, then draws whole shards.

    Its input row names a shard; it makes that shard's prompt rows itself (PromptPlan), so no
    prompt list ever passes through the driver, and draws them `synthesis.batch_size` at a time.
    The output row holds the shard's samples as parallel lists: the prompt columns plus `status`
    ("ok", or "dropped" when the sample stayed non-finite after the allowed regenerations),
    `seed_used`, `model_id`, `jpg` (bytes), `latent` (npy bytes) and, if asked for, `features`
    (npz bytes). Dropped samples carry no image and are never written. A whole shard travels as
    one row so that the stages after this one see it whole, in whatever order shards finish.
    In a build with several generators (engine.generation.generators) the row also carries
    `generator`, the index of this actor's model in `models`.
    """

    def __init__(self, model_cfg: ModelConfig, synth_cfg: SynthesisConfig, prompts: PromptPlan,
                 shard_size: int, threads: int = 0, expand: Optional[ExpandConfig] = None, output: str = "",
                 generator: Optional[int] = None):
        if threads:
            torch.set_num_threads(threads)
        self.cfg, self.prompts, self.shard_size = synth_cfg, prompts, shard_size
        # Layout rows (engine.generation.layouts) are drawn by GLIGEN from their boxes.
        self.layouts = getattr(prompts, "layouts", False)
        self.gligen_beta = prompts.cfg.gligen_beta if self.layouts else 0.0
        self.inpaint = bool(self.layouts) and prompts.cfg.mode == "inpainting"
        self.pipe = load_pipeline(model_cfg, layout=self.layouts, inpaint=self.inpaint)
        self.model_id = model_cfg.source
        self.generator = generator
        self.batches = 0
        # Prompt expansion (engine.generation.expansion): texts checked against this pipeline's
        # text encoder window, cached under the output folder or in prompts.expand.cache.
        self.expander = None
        if expand is not None and expand.enabled and not self.layouts:
            self.expander = Expander(expand, prompts.words, self.pipe.tokenizer, str(self.pipe.unet.device))
            self.expansions = cache_dir(expand, output)

    def __call__(self, row: dict) -> dict:
        index = int(row["shard"])
        specs = list(self.prompts.rows(index * self.shard_size, (index + 1) * self.shard_size))
        if "captions" in row:  # the caption stage (engine.generation.captions) wrote the prompts
            specs = [replace(s, text=t) for s, t in zip(specs, json.loads(row["captions"]))]
        expansion = None
        if self.expander:
            specs, expansion = self.expander.expand_shard(self.expansions, specs)
        out = {"shard": index, "id": [s.id for s in specs], "seed": [s.seed for s in specs],
               "text": [s.text for s in specs], "categories": [json.dumps(list(s.categories)) for s in specs],
               "model_id": self.model_id, "status": [], "seed_used": [], "jpg": [], "latent": []}
        if self.generator is not None:
            out["generator"] = self.generator
        if self.cfg.keep_features:
            out["features"] = []
        if self.layouts:
            out["layout"] = [s.layout.to_json() for s in specs]
        if expansion is not None:
            out["expansion"] = [json.dumps(r) for r in expansion]
        for start in range(0, len(specs), self.cfg.batch_size):
            for name, values in self.draw_rows(specs[start:start + self.cfg.batch_size]).items():
                out[name] += values
        return out

    def source_images(self, layouts: list[Layout]) -> torch.Tensor:
        return torch.stack([read_source(lay.source["file"], self.cfg.width, self.cfg.height) for lay in layouts])

    def draw_rows(self, specs: list[PromptSpec]) -> dict[str, list]:
        """One batch: per row its status, seed used and encoded sample."""
        self.batches += 1
        maybe_crash("synthesis", self.batches)
        ids, texts, seeds = [s.id for s in specs], [s.text for s in specs], [s.seed for s in specs]
        attempts = self.cfg.max_regenerations if self.cfg.on_nonfinite == "regenerate" else 0
        done: dict[int, tuple[int, Drawn, int]] = {}  # row -> (seed used, the draw, index in it)
        todo = list(range(len(ids)))
        for attempt in range(attempts + 1):
            if not todo:
                break
            tried = [derived_seed(seeds[i], attempt) if attempt else seeds[i] for i in todo]
            layouts = [specs[i].layout for i in todo] if self.layouts else None
            sources = self.source_images(layouts) if self.inpaint else None
            drawn = draw(self.pipe, [texts[i] for i in todo], tried, self.cfg, layouts, self.gligen_beta, sources)
            poison_nonfinite([ids[i] for i in todo], drawn, attempt)
            for j, i in enumerate(todo):
                if drawn.finite[j]:
                    done[i] = (tried[j], drawn, j)
            todo = [i for i in todo if i not in done]

        out: dict[str, list] = {"status": [], "seed_used": [], "jpg": [], "latent": []}
        if self.cfg.keep_features:
            out["features"] = []
        for i in range(len(ids)):
            seed, d, j = done.get(i, (seeds[i], None, 0))
            out["status"].append("ok" if d else "dropped")
            out["seed_used"].append(seed)
            out["jpg"].append(encode_jpeg(d.images[j], self.cfg.jpeg_quality) if d else b"")
            out["latent"].append(encode_npy(d.latents[j]) if d else b"")
            if self.cfg.keep_features:
                out["features"].append(encode_npz([f[j] for f in d.features]) if d else b"")
        return out


def read_source(file: str, width: int, height: int) -> torch.Tensor:
    """A layout's source image at the synthesis size, (3, H, W) in [-1, 1]. Layout boxes are
    fractions of the image, so stretching keeps them on their objects."""
    image = open_image(file).convert("RGB").resize((width, height), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
