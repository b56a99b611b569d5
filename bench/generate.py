"""Generation throughput: a bare diffusers loop vs the engine, and the driver's memory.

    .venv/bin/python bench/generate.py [--images 48] [--steps 20]

From one run on the same tiny model, batch and machine, prints images/s of
  (a) a bare loop in one process: the pipeline's denoising + VAE decode + the teacher, nothing else;
  (b) the engine with one synthesis actor (Ray Data, JPEG/npy encoding, annotation actor, shards);
  (c) the engine with as many synthesis actors as the machine fits;
and the driver's peak RSS at 1x and 10x the image count (it must not grow with the count).
Engine throughput is marginal: each engine run is made at N and 3N images, and the 2N extra
images are divided by the extra wall time, so Ray start-up and model loading (paid once per job)
cancel. It does not read shard times: a path that releases shards in order holds finished ones
back and then writes them in a burst, which a first-to-last-shard rate counts as speed (the
driver-writes path of before issue 22 measured 2.9x the bare loop that way on 2 cores, above the
2x its two actors can reach; its marginal rate was 1.65x).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def overrides(images: int, steps: int, batch: int, out: str, actors: int = 0) -> list[str]:
    per_cat = max(1, images // 4)  # tiny.yaml generates 4 base categories
    return [f"prompts.images_per_category={per_cat}", f"synthesis.steps={steps}",
            f"synthesis.batch_size={batch}", f"annotation.batch_size={batch}", f"output.shard_size={batch}",
            f"synthesis.num_actors={actors}", f"output.path={out}"]


def bare(images: int, steps: int, batch: int) -> dict:
    import torch

    from engine.generation.annotation import build_labeller
    from engine.config import load_config
    from engine.models.diffusion import load_pipeline
    from engine.generation.prompts import PromptPlan, make_prompts
    from engine.generation.synthesis import draw
    torch.set_num_threads(1)
    cfg = load_config(os.path.join(ROOT, "configs/tiny.yaml"), overrides(images, steps, batch, "/tmp/unused"))
    pipe = load_pipeline(cfg.model)
    labeller = build_labeller(cfg.annotation, PromptPlan(cfg.prompts).all_categories)
    rows = make_prompts(cfg.prompts)
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        drawn = draw(pipe, [r.text for r in chunk], [r.seed for r in chunk], cfg.synthesis)
        labeller.label(list(drawn.images), [list(r.categories) for r in chunk])
    return {"images": len(rows), "seconds": time.perf_counter() - start}


def engine_run(images: int, steps: int, batch: int, actors: int) -> dict:
    from engine.generation import pipeline as gen
    from engine.config import load_config
    stamps = []
    original = gen.Progress.update

    def update(self, images=0, shards=0):
        stamps.append(time.perf_counter())
        original(self, images, shards)
    gen.Progress.update = update
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(os.path.join(ROOT, "configs/tiny.yaml"), overrides(images, steps, batch, tmp, actors))
        start = time.perf_counter()
        summary = gen.generate(cfg)
        wall = time.perf_counter() - start
    return {"images": summary.images, "seconds": wall, "first_shard_s": stamps[0] - start if stamps else float("nan"),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def in_subprocess(mode: str, **kw) -> dict:
    """Each measurement in a fresh process, so one's memory or Ray state never leaks into another."""
    code = (f"import json, sys; sys.path.insert(0, {ROOT!r}); from bench.generate import {mode}; "
            f"print('RESULT' + json.dumps({mode}(**{kw!r})))")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[6:])
    raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--actors", type=int, default=2, help="synthesis actors for (c)")
    args = ap.parse_args()
    a = in_subprocess("bare", images=args.images, steps=args.steps, batch=args.batch)
    runs = {actors: [in_subprocess("engine_run", images=n, steps=args.steps, batch=args.batch, actors=actors)
                     for n in (args.images, 3 * args.images)] for actors in (1, args.actors)}
    m10 = in_subprocess("engine_run", images=args.images * 10, steps=2, batch=args.batch, actors=1)
    m1 = in_subprocess("engine_run", images=args.images, steps=2, batch=args.batch, actors=1)
    bare_rate = a["images"] / a["seconds"]
    print(f"tiny model, {args.images} images of 64x64, {args.steps} DDIM steps, batch {args.batch}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'run':<34}{'images/s':>10}{'vs (a)':>8}{'wall s (N / 3N)':>18}{'1st shard s':>13}")
    print(f"{'(a) bare loop, one process':<34}{bare_rate:>10.2f}{1.0:>8.2f}{a['seconds']:>18.1f}{'':>13}")
    for name, actors in (("(b) engine, 1 synthesis actor", 1), (f"(c) engine, {args.actors} synthesis actors",
                                                                    args.actors)):
        r, r3 = runs[actors]
        rate = (r3["images"] - r["images"]) / (r3["seconds"] - r["seconds"])
        walls = f"{r['seconds']:.1f} / {r3['seconds']:.1f}"
        print(f"{name:<34}{rate:>10.2f}{rate / bare_rate:>8.2f}{walls:>18}{r['first_shard_s']:>13.1f}")
    print(f"driver peak RSS: {m1['peak_rss_mb']:.0f} MB at {m1['images']} images, "
          f"{m10['peak_rss_mb']:.0f} MB at {m10['images']} images (2 steps)")


if __name__ == "__main__":
    main()
