"""The instance pool (X-Paste, DiverGen): cut-outs of the masked objects of a generation output.

`instagen pool --from OUTPUT --output POOL` reads the shards of an output generated with
`masks.enabled=true` and writes, for every box whose mask passes the `pool` filters (mask
quality, size, the labeller's score, the categories, and the CLIP score of the box's crop where
the source was generated with `filter.enabled=true`), one instance:

    <key>.png    the object cut out: RGBA, its mask bounding box, alpha = the mask
    <key>.json   category, score (the labeller's), mask_score (SAM's predicted IoU), mask_fill,
                 clip_score (where the source has one), area (mask pixels), mask (RLE of the cut-out's size), source (output, key, box
                 index, box, mask box)

Pool shard i holds the instances of source shard i, keys `<source key>-<box index>`, so a pool is
a pure function of its source and its filters: deterministic, and resumable the way generate is
(the same ShardStore: tar, then manifest entry; run.json refuses a pool of other settings). Each
manifest entry lists its instances' categories (`labels`, parallel to `keys`), counts them per
category and the rejected boxes per reason (the boxes of an image the quality filter refused as
`refused_image`);
`pool.json` sums them when the pool is whole. Copy-paste training (engine.training.copy_paste)
samples from those counts.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from engine.config import NO_MIN_CLIP, PoolConfig, RayConfig, fingerprint
from engine.data import masks as rle
from engine.data.shards import ShardError, ShardStore, finished_shards, samples_in_tar, usable
from engine.runtime.cluster import connect, quiet_data_context, raise_as_one_line
from engine.runtime.storage import write_file

POOL_SUFFIXES = ("png", "json")
POOL_VERSION = 1  # bump when an instance's content changes for the same source and filters
REJECT_REASONS = ("refused_image", "no_mask", "category", "score", "mask_score", "clip", "fill", "area")


class PoolError(ShardError):
    pass


@dataclass
class PoolSummary:
    instances: int
    per_category: dict[str, int]
    rejected: dict[str, int]
    shards: int
    shards_written: int
    wall_s: float
    output: str

    def line(self) -> str:
        cats = ", ".join(f"{c} {n}" for c, n in sorted(self.per_category.items()))
        return (f"{self.instances} instances ({cats or 'none'}) in {self.shards} shards ({self.shards_written} "
                f"written now), rejected {sum(self.rejected.values())} "
                f"({', '.join(f'{k} {v}' for k, v in self.rejected.items() if v) or 'none'}), "
                f"{self.wall_s:.1f} s -> {self.output}")


def build_pool(source: str, output: str, cfg: PoolConfig, ray: RayConfig | None = None) -> PoolSummary:
    import ray as ray_lib

    start = time.time()
    cfg.validate()
    src_store, src_entries = finished_shards(source, "pool --from")
    if not any("masks" in e for e in src_entries.values()):
        raise PoolError(f"pool --from {source!r} holds no masks; generate it with masks.enabled=true (or run "
                        f"`instagen generate` with masks.enabled=true into a new output.path) first")
    src_run = src_store.run_info()
    unknown = sorted(set(cfg.categories) - set(src_run["categories"]))
    if unknown:
        raise PoolError(f"pool.categories names {unknown[0]!r}, which {source!r} never generated; its categories "
                        f"are {', '.join(src_run['categories'])}")
    if cfg.min_clip != NO_MIN_CLIP and not any("filter" in e for e in src_entries.values()):
        raise PoolError(f"pool.min_clip filters on CLIP box scores, and {source!r} has none; generate it with "
                        f"filter.enabled=true (into a new output.path), or leave pool.min_clip at {NO_MIN_CLIP}")
    # min_clip only when set, so that pools built before it existed keep their fingerprints
    settings = {k: v for k, v in asdict(cfg).items() if k != "min_clip" or v != NO_MIN_CLIP}
    run_info = {"fingerprint": fingerprint({"source": src_run["fingerprint"], "pool": settings,
                                            "version": POOL_VERSION}),
                "kind": "instance pool", "source": source, "categories": src_run["categories"],
                "base": src_run.get("base", []), "novel": src_run.get("novel", []), "pool": asdict(cfg)}
    store = ShardStore(output)
    store.check_same_run(run_info)
    done = store.finished()
    todo = sorted(set(src_entries) - set(done))
    written: dict[int, dict] = {}
    if todo:
        claim = store.prepare(run_info)
        store.remove_temporaries()
        connect(ray or RayConfig())
        quiet_data_context()
        rows = ray_lib.data.from_items([{"entry": json.dumps(src_entries[i])} for i in todo],
                                       override_num_blocks=len(todo))
        rows = rows.map(pool_shard, num_cpus=0.5,
                        fn_kwargs={"source": source, "output": output, "cfg": asdict(cfg), "claim": claim})
        try:
            for row in rows.iter_rows():
                entry = json.loads(row["entry"])
                written[entry["index"]] = entry
        except Exception as e:
            store.discard_unclaimed()
            raise_as_one_line(e)
    entries = {**done, **written}
    per_category = dict.fromkeys(src_run["categories"], 0)
    rejected = dict.fromkeys(REJECT_REASONS, 0)
    for entry in entries.values():
        for cat, n in entry["categories"].items():
            per_category[cat] += n
        for why, n in entry["rejected"].items():
            rejected[why] += n
    summary = PoolSummary(sum(per_category.values()), per_category, rejected, len(entries), len(written),
                          time.time() - start, output)
    write_file(f"{output.rstrip('/')}/pool.json", json.dumps(
        {"instances": summary.instances, "per_category": per_category, "rejected": rejected,
         "shards": len(entries), "source": source, "pool": asdict(cfg)}, indent=2).encode())
    return summary


def pool_shard(row: dict, source: str, output: str, cfg: dict, claim) -> dict:
    """A Ray task: the instances of one source shard, written as the pool shard of its index."""
    entry = json.loads(row["entry"])
    filters = PoolConfig(**cfg)
    data = ShardStore(source).read_shard(entry)  # checked against its manifest entry
    instances, rejected = [], dict.fromkeys(REJECT_REASONS, 0)
    per_category: dict[str, int] = {}
    for sample in samples_in_tar(data):
        key, meta = sample["__key__"], json.loads(bytes(sample["json"]))
        if not usable(meta):  # the quality filter refused the whole image
            rejected["refused_image"] += len(meta["boxes"])
            continue
        image = None
        for j, box in enumerate(meta["boxes"]):
            why = reject(meta, j, filters)
            if why:
                rejected[why] += 1
                continue
            mask = rle.decode(meta["masks"][j], meta["height"], meta["width"], f"the mask of sample {key} box {j}")
            if mask.sum() < filters.min_area:
                rejected["area"] += 1
                continue
            if image is None:
                image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
            instances.append(cut_out(image, mask, meta, j, key, source))
            per_category[meta["labels"][j]] = per_category.get(meta["labels"][j], 0) + 1
    try:
        written = ShardStore(output).write_shard(entry["index"], instances, [], claim, suffixes=POOL_SUFFIXES,
                                                 extra={"categories": per_category, "rejected": rejected,
                                                        "labels": [json.loads(i["json"])["category"]
                                                                   for i in instances]})
    except OSError as e:
        raise PoolError(f"writing pool shard {entry['index']} under {output!r} failed ({e}); nothing of it was "
                        f"kept: free the space or fix the permissions, then rerun the same command") from None
    return {"entry": json.dumps(written.as_dict())}


def reject(meta: dict, j: int, filters: PoolConfig) -> str:
    """Why box j of a sample record is not pooled ("" when it is), before its mask is decoded."""
    if not meta.get("masks") or meta["masks"][j] is None:
        return "no_mask"
    if filters.categories and meta["labels"][j] not in filters.categories:
        return "category"
    if meta["scores"][j] < filters.min_score:
        return "score"
    if meta["mask_scores"][j] < filters.min_iou:
        return "mask_score"
    if filters.min_clip != NO_MIN_CLIP and meta["clip_scores"][j] < filters.min_clip:
        return "clip"
    if meta["mask_fill"][j] < filters.min_fill:
        return "fill"
    return ""


def cut_out(image: np.ndarray, mask: np.ndarray, meta: dict, j: int, key: str, source: str) -> dict:
    """One pool instance: the RGBA crop of the mask's bounding box and its record."""
    x0, y0, x1, y1 = (int(v) for v in rle.bbox(mask))
    crop = mask[y0:y1, x0:x1]
    rgba = np.dstack([image[y0:y1, x0:x1], crop.astype(np.uint8) * 255])
    png = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(png, format="PNG")
    record = {"category": meta["labels"][j], "score": meta["scores"][j], "mask_score": meta["mask_scores"][j],
              "mask_fill": meta["mask_fill"][j], **({"clip_score": meta["clip_scores"][j]} if "clip_scores" in meta else {}),
              "area": int(crop.sum()), "width": x1 - x0, "height": y1 - y0,
              "mask": rle.encode(crop),
              "source": {"output": source, "key": key, "box": j, "bbox": meta["boxes"][j],
                         "mask_bbox": [x0, y0, x1, y1], "prompt": meta["prompt"]}}
    return {"__key__": f"{key}-{j:03d}", "png": png.getvalue(), "json": json.dumps(record)}
