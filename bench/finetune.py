"""Benchmark: SD fine-tuning samples/s through Ray Train + DeepSpeed against a bare
single-process loop on the same tiny model, crops and batch, and peak memory per worker.

    TORCH_EXTENSIONS_DIR=.torch_extensions .venv/bin/python bench/finetune.py [--steps 12] [--batch 4]

One run prints one table. Every trainer process uses one torch thread (Ray workers get 0.5 CPU
each on a 2-core machine), so the rows compare like with like: the bare loop is the cost of
the model alone, the Ray Train rows add DeepSpeed, gloo all-reduce, Ray Data decoding and
checkpoints (one at the end).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def bare_loop(rows: list[dict], crop: int, batch: int, steps: int, lr: float, queue) -> None:
    """The same training step as engine.training.finetune.train_loop, in one process, without Ray or
    DeepSpeed: decode, VAE, text encoder, UNet forward/backward, AdamW."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from engine.config import ModelConfig
    from engine.training.finetune import decode_crops
    from engine.models.diffusion import load_pipeline
    torch.set_num_threads(1)
    torch.manual_seed(0)
    pipe = load_pipeline(ModelConfig(), device="cpu")
    vae, te, tok, unet = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet
    vae.requires_grad_(False)
    te.requires_grad_(False)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    t0, timed = None, 0
    for step in range(1, steps + 1):
        chunk = [rows[(step * batch + i) % len(rows)] for i in range(batch)]
        out = decode_crops({k: np.asarray([r[k] for r in chunk]) for k in chunk[0]}, size=crop)
        x = torch.from_numpy(out["pixels"]).permute(0, 3, 1, 2).float() / 127.5 - 1
        ids = tok(list(out["prompt"]), padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
            text = te(ids)[0]
        noise = torch.randn_like(z)
        t = torch.randint(0, sched.config.num_train_timesteps, (z.shape[0],))
        loss = F.mse_loss(unet(sched.add_noise(z, noise, t), t, encoder_hidden_states=text).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        if step == 2:
            t0 = time.time()
        elif step > 2:
            timed += batch
    queue.put((timed / (time.time() - t0), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_extensions"))

    import ray
    import torch
    from fixtures_coco import make_coco_dataset

    from engine.config import PromptConfig, RayConfig
    from engine.config import Config, FinetuneConfig, TrainRunConfig
    from engine.training.finetune import finetune, prepare

    tmp = tempfile.mkdtemp(prefix="bench-finetune-")
    cats = ["red square", "blue disc", "green square"]
    ann, root = make_coco_dataset(tmp, n_images=16, categories=cats, size=96)

    def cfg(workers: int, name: str) -> Config:
        return Config(prompts=PromptConfig(base=cats), ray=RayConfig(num_cpus=2), finetune=FinetuneConfig(
            annotations=ann, image_root=root, crop_size=args.crop, max_steps=args.steps, warmup_steps=1,
            batch_size=args.batch, lr=1e-4, ema=True, output_dir=os.path.join(tmp, f"pipe-{name}"),
            run=TrainRunConfig(num_workers=workers, cpus_per_worker=0.5, zero_stage=2, checkpoint_every=args.steps,
                               storage_path=os.path.join(tmp, "ray"), name=name)))

    rows_ = prepare(cfg(1, "plan"))[1]
    results = []

    def bare(label: str) -> None:
        ctx = mp.get_context("spawn")  # a fresh process: its peak RSS is the loop's own
        q = ctx.Queue()
        p = ctx.Process(target=bare_loop, args=(rows_, args.crop, args.batch, args.steps, 1e-4, q))
        p.start()
        rate, rss = q.get()
        p.join()
        results.append((label, 1, rate, rate, [round(rss, 1)], os.getloadavg()[0]))

    # The bare loop runs before and after the Ray rows: on a shared machine the spread between
    # the two says how much of any difference is the machine's load, not the code.
    bare("bare loop, 1 process (before)")

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        for workers in (1, 2):
            s = finetune(cfg(workers, f"w{workers}"))
            per = s.metrics["samples_per_s"]
            results.append((f"Ray Train + DeepSpeed ZeRO-2, {workers} worker{'s' * (workers > 1)}", workers,
                            per, per * workers, s.metrics["peak_rss_mb"], os.getloadavg()[0]))
    finally:
        ray.shutdown()
    bare("bare loop, 1 process (after)")

    from engine.config import TinyModelConfig
    from engine.models.diffusion import build_tiny_pipeline
    params = sum(p.numel() for p in build_tiny_pipeline(TinyModelConfig()).unet.parameters()) / 1e6
    print(f"\nSD fine-tuning, tiny model ({params:.2f}M-param UNet), "
          f"crop {args.crop}, batch {args.batch} per worker, {args.steps} steps (timed from step 3), "
          f"1 torch thread per process, torch {torch.__version__}")
    print(f"| {'setup':<39} | workers | samples/s per worker | samples/s total | peak RSS per worker (MiB) | load avg |")
    print(f"|{'-' * 41}|---------|----------------------|-----------------|---------------------------|----------|")
    for name, w, per, total, rss, load in results:
        print(f"| {name:<39} | {w:>7} | {per:>20.2f} | {total:>15.2f} | {', '.join(f'{r:.0f}' for r in rss):>25} "
              f"| {load:>8.1f} |")


if __name__ == "__main__":
    main()
