"""Is a detector's training waiting on its input? The input pipeline alone against the training
step alone, for one detector stage of a finished toy-world run.

    python bench/detector_input.py outputs/toy_world                      # the real-only row
    python bench/detector_input.py WORKDIR --stage detector_grounding_head --epochs 3

Input: the stage's own Ray Data datasets (engine.training.detection.build_train_datasets), read
in order as the trainer reads them, nothing else running. Training: the stage's detector (the
teacher's weights, as the rows start), forward with the loss, backward and an AdamW step, in this
process on batches from that input, with the trainer's thread count. A trainer that overlaps the
two can go no faster than the slower one; both figures are rows per second, from one run.
Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine.config import DetectorConfig  # noqa: E402
from engine.config.loader import from_dict  # noqa: E402
from engine.models.detectors import build_detector  # noqa: E402
from engine.runtime.cluster import connect  # noqa: E402
from engine.toyworld.loop import load_ablation_config, plan_loop  # noqa: E402
from engine.training.detection import build_train_datasets, collate, dataset_name, prepare  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", help="a toy-world run's folder, its world and teacher trained")
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "toy_world.yaml"))
    ap.add_argument("--stage", default="detector_real_only")
    ap.add_argument("--epochs", type=int, default=2, help="input epochs timed (the first includes start-up)")
    ap.add_argument("--steps", type=int, default=60, help="training steps timed, after 10 untimed")
    args = ap.parse_args()

    import ray
    cfg = load_ablation_config(args.config, [f"workdir={os.path.abspath(args.workdir)}"])
    stages = {s.name: s for s in plan_loop(cfg, lambda m: None).plan}
    if args.stage not in stages or "detector" not in stages[args.stage].inputs:
        sys.exit(f"--stage {args.stage!r} is not a detector stage of this config; choose one of "
                 f"{', '.join(n for n, s in stages.items() if 'detector' in s.inputs)}")
    dc = from_dict(DetectorConfig, stages[args.stage].inputs["detector"])
    categories, plan = prepare(dc)
    det = build_detector(dc.kind, dc.model, categories, dc.image_size, dc.attention, dc.tiny)
    connect(cfg.ray)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # as the trainer reads it

    datasets = build_train_datasets(dc, plan, categories, det.keep_aspect, args.epochs)
    input_s, batches = [], []
    for epoch in range(args.epochs):
        start, rows = time.perf_counter(), 0
        for b in datasets[dataset_name(0, epoch)].iter_batches(batch_size=dc.batch_size, batch_format="numpy"):
            rows += len(b["pixels"])
            if len(batches) < args.steps + 10 and len(b["pixels"]) == dc.batch_size:
                batches.append(b)
        input_s.append((rows, time.perf_counter() - start))

    torch.set_num_threads(int(dc.run.cpus_per_worker))  # what Ray gives the trainer worker
    model = det.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=dc.lr)
    for i, rows in enumerate(batches):
        if i == 10:
            start = time.perf_counter()
        batch = collate(rows, det.image_mean, det.image_std)
        out = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    train_rate = (len(batches) - 10) * dc.batch_size / (time.perf_counter() - start)

    print(f"{args.stage}, batch {dc.batch_size}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs\n")
    print("| what | rows | seconds | rows/s |\n|---|---|---|---|")
    for epoch, (rows, s) in enumerate(input_s):
        print(f"| input, epoch {epoch}{' (start-up included)' if epoch == 0 else ''} | {rows} | {s:.1f} | "
              f"{rows / s:.0f} |")
    print(f"| training step alone ({torch.get_num_threads()} threads) | {(len(batches) - 10) * dc.batch_size} | "
          f"| {train_rate:.0f} |")


if __name__ == "__main__":
    main()
