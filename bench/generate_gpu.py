"""Images per second per GPU of the engine's own denoising loop at Stable Diffusion v1.4 size.

UNet, VAE and CLIP text encoder are built from the SD v1.4 configs with random weights: the compute
of a forward pass does not depend on the weight values, so the timings are those of the real
model. The loop is engine.generation.synthesis.draw (what every synthesis actor runs): 512x512, DDIM 50 steps,
classifier-free guidance (two UNet passes per step, batched), fp16, then the VAE decode. Each batch
size is timed with SDPA attention, with xformers where it imports, and with torch.compile on the
UNet. The tokenizer is the engine's tiny one: prompts are padded to 77 tokens either way, so the
text encoder's compute is the same as with CLIP's tokenizer.

On a CUDA GPU:
    python bench/generate_gpu.py                      # batch 1..16, sdpa / xformers / compile
    python bench/generate_gpu.py --batch-sizes 8 --modes sdpa --json out.json

On CPU, a tiny version that checks the script works (the numbers mean nothing):
    python bench/generate_gpu.py --smoke
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

from engine.config import SynthesisConfig  # noqa: E402
from engine.models.diffusion import tiny_tokenizer  # noqa: E402
from engine.generation.synthesis import draw  # noqa: E402

PROMPT = "a photograph of a dog and a bicycle"

# Stable Diffusion v1.4 (CompVis/stable-diffusion-v1-4 unet/, vae/, text_encoder/ configs).
SD14_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
    downsample_padding=1, mid_block_scale_factor=1.0)
SD14_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD14_TEXT = dict(  # CLIP ViT-L/14 text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)

# The same architecture shrunk, for --smoke on CPU.
SMOKE_UNET = dict(SD14_UNET, sample_size=8, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32)
SMOKE_VAE = dict(SD14_VAE, sample_size=64, block_out_channels=(32, 32, 64, 64), layers_per_block=1)
SMOKE_TEXT = dict(SD14_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, projection_dim=32)


def build_pipeline(unet_cfg: dict, vae_cfg: dict, text_cfg: dict, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    # The tiny tokenizer's ids (< 520) are valid rows of the 49408-row embedding; bos/eos/pad
    # follow its vocabulary.
    text = CLIPTextModel(CLIPTextConfig(**text_cfg, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_cfg), text_encoder=text, tokenizer=tiny_tokenizer(),
        unet=UNet2DConditionModel(**unet_cfg), scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # float32 is what the modules are built in; casting only when asked keeps diffusers quiet.
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)


@dataclass
class Row:
    mode: str
    batch: int
    seconds_per_batch: Optional[float] = None
    images_per_s: Optional[float] = None
    warmup_s: Optional[float] = None  # first call: includes compilation for `compile`
    peak_gib: Optional[float] = None
    note: str = ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unavailable(mode: str, device: torch.device) -> Optional[str]:
    """Why `mode` cannot run on `device`, or None."""
    if mode not in ("sdpa", "xformers", "compile"):
        return f"unknown mode {mode!r}; use sdpa, xformers or compile"
    if mode == "xformers":
        if device.type != "cuda":
            return "xformers has no CPU kernels"
        try:
            import xformers  # noqa: F401
        except ImportError:
            return "xformers is not installed"
    return None


def set_mode(pipe, mode: str, compile_mode: str) -> None:
    if mode == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
    elif mode == "compile":
        # The UNet runs 2 x steps times per image; the text encoder and VAE once: compile the UNet.
        # dynamic=False: one graph specialised to each batch size, as a fixed-batch actor runs it.
        pipe.unet = torch.compile(pipe.unet, mode=compile_mode, fullgraph=True, dynamic=False)


def time_batch(pipe, mode: str, batch: int, cfg: SynthesisConfig, warmup: int, repeats: int) -> Row:
    device = pipe.device
    texts, seeds = [PROMPT] * batch, list(range(batch))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        sync(device)
        start = time.perf_counter()
        for _ in range(warmup):
            draw(pipe, texts, seeds, cfg)
        sync(device)
        warm = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            drawn = draw(pipe, texts, seeds, cfg)
            sync(device)
            times.append(time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return Row(mode, batch, note="out of memory")
    assert drawn.images.shape == (batch, cfg.height, cfg.width, 3)
    per_batch = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return Row(mode, batch, per_batch, batch / per_batch, warm, peak)


def table(rows: list[Row]) -> str:
    lines = ["| mode | batch | s / batch | images/s | first call s | peak GiB | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        lines.append(f"| {r.mode} | {r.batch} | {fmt(r.seconds_per_batch, '.2f')} | {fmt(r.images_per_s, '.3f')} | "
                     f"{fmt(r.warmup_s, '.1f')} | {fmt(r.peak_gib, '.1f')} | {r.note} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/generate_gpu.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16", help="(--smoke uses 1,2)")
    parser.add_argument("--modes", default=None,
                        help="comma-separated, any of sdpa, xformers, compile (default: all three; "
                             "with --smoke sdpa,xformers, as compiling on CPU takes minutes)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512, help="image height and width")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                        help="torch.compile mode for the UNet")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model, 64x64, 2 steps, batch 1-2, on CPU: checks the script runs")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    if args.smoke:
        device = torch.device(args.device or "cpu")
        dtype = torch.float32
        configs = (SMOKE_UNET, SMOKE_VAE, SMOKE_TEXT)
        size, steps, batches = 64, 2, [1, 2]
        modes = (args.modes or "sdpa,xformers").split(",")
        args.warmup, args.repeats = 1, 1
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type != "cuda":
            print("no CUDA device: these sizes take minutes per image on CPU; use --smoke to check the "
                  "script, or run it on a GPU", file=sys.stderr)
            return 2
        dtype = torch.float16
        configs = (SD14_UNET, SD14_VAE, SD14_TEXT)
        size, steps, batches = args.size, args.steps, [int(b) for b in args.batch_sizes.split(",")]
        modes = (args.modes or "sdpa,xformers,compile").split(",")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {name}; torch {torch.__version__}; {size}x{size}, DDIM {steps} steps, guidance "
          f"{args.guidance}, {str(dtype).replace('torch.', '')}{'; SMOKE: tiny model' if args.smoke else ''}")
    cfg = SynthesisConfig(height=size, width=size, steps=steps, guidance=args.guidance)
    rows: list[Row] = []
    for mode in modes:
        why_not = unavailable(mode, device)
        if why_not:
            rows += [Row(mode, batch, note=why_not) for batch in batches]
            print(f"  {mode:9s}: {why_not}", file=sys.stderr)
            continue
        pipe = build_pipeline(*configs, device, dtype)  # fresh per mode: no attention/compile carry-over
        set_mode(pipe, mode, args.compile_mode)
        for batch in batches:
            row = time_batch(pipe, mode, batch, cfg, args.warmup, args.repeats)
            rows.append(row)
            print(f"  {mode:9s} batch {batch:2d}: " + (f"{row.images_per_s:.3f} images/s" if row.images_per_s
                                                       else row.note), file=sys.stderr, flush=True)
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "size": size, "steps": steps,
                       "dtype": str(dtype), "smoke": args.smoke, "rows": [asdict(r) for r in rows]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
