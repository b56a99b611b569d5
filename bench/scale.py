"""Scale: the resume scan and export of simulated builds, their time and peak memory.

    .venv/bin/python bench/scale.py [--samples 20000 200000] [--small 1000000] [--dir /tmp/scale]

Builds outputs of realistic samples (a 512x512 JPEG of 113 KB, the 4x64x64 float32 latent
of the last step, a JSON record with three boxes: about 175 KB a sample) through the project's own
shard writer (`ShardStore.write_shard`, 1,000 samples a shard), and, for the JSON path, one of
`--small` samples with 32x32 JPEGs and no latent. For each it times, in a fresh process:
  - the resume scan (`ShardStore.finished`, what `instagen generate` reads before it plans),
  - export without images and with images (`engine.generation.export.export`, on an embedded Ray),
and records the peak resident memory of the driver and, summed over every process of the Ray it
started (raylet, GCS, workers), of the whole export, sampled every 0.2 s. Outputs are kept under
--dir between runs (the build is the slow part), so a rerun measures again without rebuilding.
`--engine PATH` measures another checkout's engine on the same outputs, for a side-by-side ratio.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = 1000


def realistic_payload(small: bool) -> tuple[bytes, bytes]:
    """One JPEG and one latent, reused by every sample: their size is what matters here. The
    picture is smooth noise, which JPEG compresses about as much as a generated photograph
    (113 KB at 512x512, quality 95)."""
    import numpy as np
    from PIL import Image

    from engine.generation.synthesis import encode_npy
    rng = np.random.default_rng(0)
    side = 32 if small else 512
    coarse = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BICUBIC))
    noise = rng.integers(-1, 1, pixels.shape, endpoint=True)
    pixels = np.clip(pixels.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    latent = b"" if small else encode_npy(rng.standard_normal((4, 64, 64)).astype(np.float32))
    return buf.getvalue(), latent


def build(path: str, samples: int, small: bool) -> None:
    from engine.data.shards import ShardStore
    if os.path.exists(os.path.join(path, "run.json")) and len(ShardStore(path).finished()) * SHARD >= samples:
        return
    jpg, latent = realistic_payload(small)
    store = ShardStore(path)
    claim = store.prepare({"fingerprint": f"bench-{samples}-{small}", "name": "bench",
                           "categories": ["cat", "dog", "person"], "base": ["cat", "dog"], "novel": ["person"],
                           "prompts": samples, "shard_size": SHARD})
    start = time.time()
    for index in range((samples + SHARD - 1) // SHARD):
        batch = []
        for pid in range(index * SHARD, min(samples, (index + 1) * SHARD)):
            record = {"id": pid, "prompt": "a photograph of a cat and a dog", "categories": ["cat", "dog"],
                      "seed": pid, "seed_used": pid, "model_id": "bench", "width": 512, "height": 512,
                      "box_format": "xyxy", "boxes": [[10.5, 20.25, 200.0, 310.75], [220.0, 40.0, 500.5, 400.0],
                                                      [5.0, 5.0, 60.0, 90.0]],
                      "labels": ["cat", "dog", "person"], "scores": [0.93, 0.88, 0.47],
                      "labellers": ["detector", "detector", "grounding_head"]}
            sample = {"__key__": f"{pid:09d}", "jpg": jpg, "json": json.dumps(record)}
            if latent:
                sample["latent.npy"] = latent
            batch.append(sample)
        store.write_shard(index, batch, [], claim)
        claim = None
        if index % 20 == 0:
            print(f"[build] {path}: {(index + 1) * SHARD}/{samples} samples, {time.time() - start:.0f} s",
                  file=sys.stderr, flush=True)


class PeakRSS:
    """Peak resident memory, in MB, of this process and of all its descendants (the Ray it starts)."""

    def __init__(self):
        import psutil
        self.me, self.peak_tree, self.stop = psutil.Process(), 0.0, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        import psutil
        while not self.stop.is_set():
            total = 0
            for p in [self.me, *self.me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_tree = max(self.peak_tree, total / 2**20)
            time.sleep(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def measure(path: str, samples: int) -> dict:
    """In a fresh process: the resume scan, then export without and with images."""
    import ray

    from engine.data.shards import ShardStore
    from engine.generation.export import export
    start = time.perf_counter()
    entries = ShardStore(path).finished()
    scan_s = time.perf_counter() - start
    assert sum(e["samples"] for e in entries.values()) == samples
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    ray.data.range(4).materialize()  # Ray's start-up and first task, paid once per job, not counted
    result = {"samples": samples, "scan_s": scan_s}
    dest = f"{path}-export"
    os.makedirs(dest, exist_ok=True)  # an older export wrote JSON only into an existing folder
    jpeg_bytes = len(realistic_payload(small=os.path.basename(path).startswith("small"))[0])
    for name, images in (("json", False), ("images", True)):
        if images and shutil.disk_usage(os.path.dirname(path)).free < 1.2 * samples * jpeg_bytes:
            result[name] = None  # the copies would not fit on this disk
            continue
        with PeakRSS() as peak:
            start = time.perf_counter()
            out = export(path, dest=dest, write_images=images)
            seconds = time.perf_counter() - start
        assert out["images"] == samples
        result[name] = {"seconds": seconds, "images_per_s": samples / seconds, "tree_peak_mb": peak.peak_tree}
    result["driver_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ray.shutdown()
    subprocess.run(["rm", "-rf", dest])
    return result


def in_subprocess(engine: str, fn: str, **kw) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {engine!r}); sys.path.insert(1, {ROOT!r}); "
            f"from bench.scale import {fn}; print('RESULT' + json.dumps({fn}(**{kw!r})))")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "", "PYTHONPATH": engine}
    proc = subprocess.run([sys.executable, "-c", code], cwd=engine, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[6:])
    raise RuntimeError(f"{fn} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, nargs="*", default=[20_000, 200_000])
    ap.add_argument("--small", type=int, nargs="*", default=[1_000_000])
    ap.add_argument("--dir", default="/tmp/instagen-scale")
    ap.add_argument("--engine", default=ROOT, help="the checkout whose engine is measured")
    args = ap.parse_args()
    runs = [(n, False) for n in args.samples] + [(n, True) for n in args.small]
    print(f"engine {args.engine}, {os.cpu_count()} CPUs, shards of {SHARD}")
    print(f"{'build':<22}{'scan s':>8}{'json img/s':>12}{'peak MB':>9}{'images img/s':>14}{'peak MB':>9}"
          f"{'driver MB':>11}")
    for samples, small in runs:
        path = os.path.join(args.dir, f"{'small' if small else 'real'}-{samples}")
        in_subprocess(ROOT, "build", path=path, samples=samples, small=small)
        r = in_subprocess(args.engine, "measure", path=path, samples=samples)
        label = f"{samples:,} {'32px' if small else '512px'}"
        im = r["images"] or {"images_per_s": float("nan"), "tree_peak_mb": float("nan")}  # nan: no disk for it
        print(f"{label:<22}{r['scan_s']:>8.2f}{r['json']['images_per_s']:>12.0f}{r['json']['tree_peak_mb']:>9.0f}"
              f"{im['images_per_s']:>14.0f}{im['tree_peak_mb']:>9.0f}{r['driver_peak_mb']:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
