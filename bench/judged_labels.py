"""Would a toy-world row's detectors gain from righter novel labels? The box judge as an oracle.

    .venv/bin/python bench/judged_labels.py WORKDIR OUT [KEY=VALUE ...] [--row grounding_head]
        [--base pretrained_base] [--novel pretrained_novel_sup] [--epochs 6]

WORKDIR is a finished toy-world run. The box judge of bench/toy_world_judge.py (a small CNN
trained on the real pretraining pictures' boxes) reads every box of the row's novel set; only the
boxes it names as their own category are kept, and the set is written again, so filtered, under
OUT/synthetic/. The row's detectors then train again in OUT on the row's base set plus the judged
novel set, with the toy-world config (and its overrides), and are printed per seed beside the
row's own detectors in WORKDIR. Training repeats bit for bit for a given seed, so the two pair up.

Where the judged labels, right far more often, give about the same novel AP50, the precision of
the labeller's novel boxes is not what holds the row back, and a labeller that is right more
often (self-training: 32.9% against 27.9% in run 11) cannot show in the table either.
"""
from __future__ import annotations

import io
import json
import os
import statistics

import numpy as np
import torch
from PIL import Image

from bench.detector_spread import BORROWED, borrow_stages, study_parser
from bench.toy_world_judge import box_crops, crop, named, to_tensor, train_box_judge
from engine.data.shards import ShardStore, finished_shards, samples_in_tar
from engine.toyworld.loop import METRICS, Loop, load_ablation_config

BOX_FIELDS = ("boxes", "labels", "scores", "labellers")


def judged_set(source: str, dest: str, box_net: torch.nn.Module, categories: list[str]) -> dict:
    """`source`'s samples again under `dest`, each keeping only the boxes the judge names right."""
    store, entries = finished_shards(source)
    out = ShardStore(dest)
    info = store.run_info()
    claim = out.prepare({**info, "fingerprint": info["fingerprint"] + "-judged"})
    counts = {"boxes": 0, "kept": 0, "complete_before": 0, "complete_after": 0, "images": 0}
    for index in sorted(entries):
        samples = []
        for raw in samples_in_tar(store.read_shard(entries[index])):
            meta = json.loads(bytes(raw["json"]))
            keep = []
            if meta["boxes"]:
                image = Image.open(io.BytesIO(bytes(raw["jpg"]))).convert("RGB")
                said = named(box_net, to_tensor(np.stack([crop(image, b) for b in meta["boxes"]])))
                keep = [int(k) < len(categories) and categories[int(k)] == label for k, label in zip(said, meta["labels"])]
            prompted = set(meta["categories"])
            counts["images"] += 1
            counts["boxes"] += len(keep)
            counts["kept"] += sum(keep)
            counts["complete_before"] += prompted <= set(meta["labels"])
            meta.update({f: [v for v, k in zip(meta[f], keep) if k] for f in BOX_FIELDS})
            counts["complete_after"] += prompted <= set(meta["labels"])
            samples.append({**{k: bytes(v) for k, v in raw.items() if k != "__key__"},
                            "__key__": raw["__key__"], "json": json.dumps(meta)})
        out.write_shard(index, samples, entries[index]["dropped"], claim)
        claim = None
    return counts


def main() -> None:
    p = study_parser(__doc__)
    p.add_argument("--row", default="grounding_head")
    p.add_argument("--base", default="pretrained_base", help="the row's base set (unchanged)")
    p.add_argument("--novel", default="pretrained_novel_sup", help="the row's novel set (judged)")
    p.add_argument("--epochs", type=int, default=6, help="the box judge's, as bench/toy_world_judge.py")
    a = p.parse_args()
    workdir = os.path.abspath(a.workdir)
    # OUT borrows WORKDIR's world and teacher; the row's sets are read where they are.
    record = borrow_stages(workdir, a.out, BORROWED, reads=(a.base, a.novel))

    world = os.path.join(workdir, "world")
    with open(os.path.join(world, "test", "instances.json")) as f:
        categories = [c["name"] for c in json.load(f)["categories"]]
    torch.manual_seed(0)
    bx, by = box_crops(world, "pretrain", categories, np.random.default_rng(0))
    box_net = train_box_judge(bx, by, len(categories) + 1, a.epochs)
    judged = os.path.join(os.path.abspath(a.out), "synthetic", f"{a.novel}_judged")
    c = judged_set(os.path.join(workdir, "synthetic", a.novel), judged, box_net, categories)
    print(f"{a.novel}: {c['images']} images, {c['kept']} of {c['boxes']} boxes named right by the judge; "
          f"images with every prompted category boxed {c['complete_before']} -> {c['complete_after']}")

    cfg = load_ablation_config(a.config, [f"workdir={a.out}", *a.overrides])
    loop = Loop(cfg, print)
    loop.detector(a.row, [os.path.join(workdir, "synthetic", a.base), judged], ["world"])
    done = loop.run()
    print(f"\n{a.row}, its novel set judged, overrides: {' '.join(a.overrides) or 'none'}")
    print("| seed | AP50 all / base / novel, judged | the row in WORKDIR |")
    print("|---|---|---|")
    columns = {"judged": [], "own": []}
    for seed, name in loop.rows[a.row].items():
        own = record.get(name, {}).get("result")
        columns["judged"].append([100 * done[name][k] for k in METRICS])
        columns["own"].append([100 * own[k] for k in METRICS] if own else None)
        text = " / ".join(f"{v:.1f}" for v in columns["judged"][-1])
        print(f"| {seed} | {text} | " + (" / ".join(f"{v:.1f}" for v in columns["own"][-1]) if own else "n/a") + " |")
    for label, rows in columns.items():
        if len(rows) > 1 and all(rows):
            print(label + ": " + ", ".join(f"{k} mean {statistics.mean(col):.1f} sd {statistics.stdev(col):.1f}"
                                           for k, col in zip(METRICS, zip(*rows))))


if __name__ == "__main__":
    main()
