"""How far apart are one toy-world row's detectors between seeds, and how much of that is the test set?

    .venv/bin/python bench/detector_spread.py WORKDIR OUT [KEY=VALUE ...] [--bootstrap 40]

WORKDIR is a finished toy-world run (`instagen toy-world workdir=...`); OUT a new folder. The
real-only row's detectors are trained again in OUT, on WORKDIR's world, with the toy-world config's
detector section under the given overrides (e.g. `detector.epochs=8 "detector_seeds=[0,1,2]"`),
and scored on the test split: per seed, mean, sample sd and range of AP50 all / base / novel.

Each detector's AP50 is also recomputed on test sets drawn from the test split's images with
replacement (--bootstrap times, seeded): the sd of those is the part of a row's spread that comes
from which 300 test images were drawn, not from training. Where it is much smaller than the sd
between seeds, a larger test split would not make the rows easier to tell apart; training would.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics

from engine.evaluation.metrics import evaluate_coco
from engine.toyworld.loop import METRICS, Loop, load_ablation_config, seed_summary

# Each stage a study borrows, and the folder it made.
BORROWED = {"world": "world", "teacher": "models/teacher"}


def borrow_stages(workdir: str, out: str, stages: dict[str, str], reads: tuple[str, ...] = ()) -> dict:
    """Make `out` a work folder that holds `workdir`'s finished `stages` (stage -> its folder), as
    links and their stage records, so that a study runs only the stages it declares. `reads`: more
    stages whose outputs the study reads in `workdir`. Returns `workdir`'s stage records."""
    try:
        with open(os.path.join(workdir, "stages.json")) as f:
            record = json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"{workdir} is not a toy-world work folder (no stages.json); name a finished run's") from None
    missing = [s for s in [*stages, *reads] if "result" not in record.get(s, {})]
    if missing:
        raise SystemExit(f"{workdir} has not finished {', '.join(missing)}; run instagen toy-world there first")
    if os.path.exists(out):
        raise SystemExit(f"{out} exists; name a new folder")
    for folder in stages.values():
        os.makedirs(os.path.dirname(os.path.join(out, folder)), exist_ok=True)
        os.symlink(os.path.join(os.path.abspath(workdir), folder), os.path.join(out, folder))
    with open(os.path.join(out, "stages.json"), "w") as f:
        json.dump({s: record[s] for s in stages}, f)
    return record


def study_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every study on a finished work folder takes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("out")
    p.add_argument("overrides", nargs="*", help="toy-world config overrides, KEY=VALUE")
    p.add_argument("--config", default="configs/toy_world.yaml")
    return p


def bootstrap_sd(test: dict, detections: list[dict], base: list[str], novel: list[str], times: int) -> list[float]:
    """Sd of AP50 all / base / novel over `times` resamplings of the test images (with their boxes
    and detections), each drawn image renumbered so that repeats count as separate images."""
    boxes, found = {}, {}
    for a in test["annotations"]:
        boxes.setdefault(a["image_id"], []).append(a)
    for d in detections:
        found.setdefault(d["image_id"], []).append(d)
    images = test["images"]
    values = []
    for t in range(times):
        rng = random.Random(t)
        gt, dets = {**test, "images": [], "annotations": []}, []
        for new_id, im in enumerate((rng.choice(images) for _ in images), 1):
            gt["images"].append({**im, "id": new_id})
            gt["annotations"] += [{**a, "id": len(gt["annotations"]) + k + 1, "image_id": new_id}
                                  for k, a in enumerate(boxes.get(im["id"], []))]
            dets += [{**d, "image_id": new_id} for d in found.get(im["id"], [])]
        m = evaluate_coco(gt, dets, base, novel)
        values.append([m[k] for k in METRICS])
    return [statistics.pstdev(column) for column in zip(*values)]


def main() -> None:
    p = study_parser(__doc__)
    p.add_argument("--bootstrap", type=int, default=40)
    a = p.parse_args()
    borrow_stages(a.workdir, a.out, BORROWED)
    world = os.path.join(os.path.abspath(a.workdir), "world")

    cfg = load_ablation_config(a.config, [f"workdir={a.out}", *a.overrides])
    loop = Loop(cfg, print)
    loop.detector("real_only", [], ["world"])
    done = loop.run()
    row = seed_summary({seed: done[name] for seed, name in loop.rows["real_only"].items()})
    with open(os.path.join(world, "test", "instances.json")) as f:
        test = json.load(f)
    print(f"\nreal_only, {len(row['seeds'])} seeds, overrides: {' '.join(a.overrides) or 'none'}")
    print("| seed | AP50 all | base | novel | test-set bootstrap sd all / base / novel |")
    print("|---|---|---|---|---|")
    for seed, r in row["seeds"].items():
        name = "detector_real_only" + (f"_seed{seed}" if seed != "0" else "")
        with open(loop.path("eval", name, "detections.json")) as f:
            sd = bootstrap_sd(test, json.load(f), cfg.world.base, cfg.world.novel, a.bootstrap)
        print(f"| {seed} | " + " | ".join(f"{100 * r[k]:.1f}" for k in METRICS)
              + " | " + " / ".join(f"{100 * s:.1f}" for s in sd) + " |")
    for k in METRICS:
        v = [100 * r[k] for r in row["seeds"].values()]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"{k}: mean {statistics.mean(v):.1f}, sd {sd:.1f}, range {max(v) - min(v):.1f}")


if __name__ == "__main__":
    main()
