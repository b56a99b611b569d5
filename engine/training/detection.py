"""Detector training on real + synthetic data, and its evaluation.

    cfg = load_config("configs/detector.yaml", cls=DetectorJobConfig).detector
    summary = train_detector(cfg)      # Ray Train + DeepSpeed; resumes; saves cfg.output_dir
    metrics = evaluate_detector(cfg)   # predictions on cfg.eval_annotations -> COCO AP / LVIS AP

Data: real COCO/LVIS records (engine.data.datasets) and synthetic WebDataset shards (engine.data.shards)
are mixed so that `mix_ratio` of each epoch's samples are synthetic, streamed through Ray Data
(shards are read where they are, one pass per shard and epoch) and augmented on CPU workers: scale
jitter around `image_size`, random crop or pad to a fixed `image_size` square canvas, horizontal
flip. Boxes follow every transform; a box the crop leaves without area is dropped.

Epoch: `samples_per_epoch` samples (0 = every real image once, plus as many synthetic ones as
the ratio asks; or every synthetic sample once when mix_ratio is 1), rounded down to whole
batches on every worker so all workers take the same steps. Which real and synthetic samples
fill an epoch is drawn once per run (seeded): a pool larger than its share is subsampled, a
smaller one repeated. Each epoch deals the samples to the workers in a seeded order, each with a
seed of its own that its augmentation (and copy-paste) is drawn from: every epoch draws afresh,
and the same config and seed train on the same batches (tests/test_detectors.py checks the weights).

Training: `train_loop_per_worker` on Ray Train workers, DeepSpeed over gloo (CPU) or NCCL,
checkpoints every `checkpoint_every` steps under storage_path/name through engine.training.runner;
rerunning the same command resumes at the saved step. At the end the trained weights go to
`output_dir` with `save_pretrained` (model + image processor), a folder the "detector" labeller
of the generation stage loads as its teacher.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch
from PIL import Image

from engine.config import (
    AugmentConfig,
    ConfigError,
    CopyPasteConfig,
    DetectorConfig,
    RayConfig,
    from_dict,
)
from engine.data.datasets import (
    check_dataset,
    decode_image,
    load_detection_dataset,
    open_image,
)
from engine.data.shards import ShardError, finished_shards, iter_samples, usable
from engine.errors import UserError
from engine.models.detectors import DETECTORS, build_detector
from engine.runtime.cluster import connect
from engine.training.copy_paste import CopyPaste, PoolIndex, load_pool_index
from engine.training.runner import (
    MODEL_FILE,
    TrainSummary,
    all_reduce,
    deepspeed_config,
    deepspeed_engine,
    fit,
    load_tensors,
    read_meta,
    report,
    restore_checkpoint,
    seed_everything,
)

log = logging.getLogger(__name__)

REAL, SYNTHETIC = "real", "synthetic"


class DetectionDataError(UserError, ValueError):
    """Training data that cannot be used as configured; the message names the fix."""


# --------------------------------------------------------------------------------------------
# Sources


@dataclass
class SyntheticPool:
    """Finished samples of one or more shard outputs: (shard url, sample key) pairs."""
    samples: list[tuple[str, str]]
    categories: set[str]  # every label the generating run could have written


def synthetic_pool(paths: list[str], detector_categories: list[str], complete_only: bool = False) -> SyntheticPool:
    """Finished shards under each path, checked against the detector's categories up front
    (from the run's run.json, or every sample's labels where it lists none), so a disagreeing
    category fails here with its name instead of deep inside a Ray worker. `complete_only` keeps
    the samples whose every prompted category has a box."""
    samples: list[tuple[str, str]] = []
    labels: set[str] = set()
    incomplete = 0
    for path in paths:
        store, entries = finished_shards(path, "detector.synthetic")
        urls = {i: store.shard_url(i) for i in sorted(entries)}
        run_categories = store.run_info().get("categories")
        if run_categories:
            labels |= set(run_categories)
            if not complete_only:
                samples += [(url, key) for i, url in urls.items() for key in entries[i]["keys"]]
                continue
        try:  # the records are read: the run's categories are unknown, or completeness is asked
            for url in urls.values():
                for sample in iter_samples([url], decode=False):
                    record = json.loads(sample["json"])
                    if not usable(record):  # refused by the quality filter (not in the entry's keys either)
                        continue
                    labels |= set(record["labels"])
                    if complete_only and not set(record.get("categories", [])) <= set(record["labels"]):
                        incomplete += 1
                    else:
                        samples.append((url, sample["__key__"].rsplit("/", 1)[-1]))
        except (ShardError, OSError, KeyError, ValueError) as e:
            raise DetectionDataError(f"synthetic shards under {path!r} cannot be read ({e}); regenerate them") from e
    if incomplete:
        log.info("synthetic data: %d images left out, a prompted category without a box (%d kept)",
                 incomplete, len(samples))
    if not samples:
        why = (f"no image has a box for every prompted category ({incomplete} without); lower the labeller's "
               f"threshold, or set detector.synthetic_complete_only=false") if incomplete else \
            "every prompt was dropped; generate again, or set detector.mix_ratio=0"
        raise DetectionDataError(f"the synthetic shards under {', '.join(map(repr, paths))} hold no usable "
                                 f"samples ({why})")
    unknown = sorted(labels - set(detector_categories))
    if unknown:
        raise DetectionDataError(
            f"synthetic category {unknown[0]!r}{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''} "
            f"is not one of the detector's categories ({', '.join(detector_categories[:10])}"
            f"{' ...' if len(detector_categories) > 10 else ''}); add it to detector.categories, or train on "
            f"shards generated for these categories")
    return SyntheticPool(samples, labels)


def detector_categories(cfg: DetectorConfig) -> tuple[list[str], list[dict]]:
    """The detector's classes and the real rows (boxes of other categories dropped)."""
    if cfg.mix_ratio >= 1.0:
        return list(cfg.categories), []
    # Bad images are found (and skipped) here, not in the pipeline: a row dropped there would
    # leave one worker a batch short, and Ray Train needs every worker at every step.
    real = load_detection_dataset(cfg.real_annotations, cfg.real_image_root, fmt=cfg.real_format,
                                  check_images=True)
    if real.skipped.total:
        log.warning("real data: %s", real.skipped.summary())
    categories = list(cfg.categories) or real.categories
    keep = set(categories)
    rows = []
    for r in real.records:
        idx = [i for i, label in enumerate(r.labels) if label in keep]
        rows.append({"id": r.id, "file": r.file, "boxes": json.dumps([r.boxes[i] for i in idx]),
                     "labels": json.dumps([r.labels[i] for i in idx])})
    if not rows:
        raise DetectionDataError(f"real dataset {cfg.real_annotations!r} has no usable images "
                                 f"({real.skipped.summary()})")
    return categories, rows


# --------------------------------------------------------------------------------------------
# Mixing


@dataclass
class EpochPlan:
    real: list[dict]  # real rows, one per sample (repeats allowed)
    synthetic: dict[str, list[str]]  # shard url -> sample keys to take (repeats allowed)
    steps_per_epoch: int

    @property
    def counts(self) -> dict[str, int]:
        return {REAL: len(self.real), SYNTHETIC: sum(len(k) for k in self.synthetic.values())}


def plan_epoch(cfg: DetectorConfig, real_rows: list[dict], pool: Optional[SyntheticPool]) -> EpochPlan:
    """How many real and synthetic samples one epoch holds, and which."""
    ratio = cfg.mix_ratio
    n_syn_pool = len(pool.samples) if pool else 0
    if cfg.samples_per_epoch:
        total = cfg.samples_per_epoch
    elif ratio >= 1.0:
        total = n_syn_pool
    else:
        total = math.ceil(len(real_rows) / (1.0 - ratio))
    per_step = cfg.batch_size * cfg.run.num_workers
    steps = total // per_step
    if steps < 1:
        raise DetectionDataError(f"an epoch of {total} samples is less than one step of batch_size={cfg.batch_size} "
                                 f"x run.num_workers={cfg.run.num_workers}; lower detector.batch_size or raise "
                                 f"detector.samples_per_epoch")
    total = steps * per_step
    n_syn = round(ratio * total)
    rng = random.Random(cfg.seed)
    real = [real_rows[i] for i in _draw(rng, len(real_rows), total - n_syn)]
    synthetic: dict[str, list[str]] = defaultdict(list)
    for i in sorted(_draw(rng, n_syn_pool, n_syn)):
        url, key = pool.samples[i]
        synthetic[url].append(key)
    return EpochPlan(real, dict(synthetic), steps)


def _draw(rng: random.Random, pool: int, n: int) -> list[int]:
    """n indices into range(pool): a shuffled subset, or whole shuffled passes plus a subset."""
    if n and not pool:
        raise DetectionDataError("an epoch asks for samples from an empty source; check the data paths")
    out: list[int] = []
    while len(out) < n:
        order = list(range(pool))
        rng.shuffle(order)
        out += order[:n - len(out)]
    return out


# --------------------------------------------------------------------------------------------
# Augmentation


def augment(image, boxes: list[list[float]], labels: list[Any], size: int, scale: float, flip: bool,
            crop_xy: tuple[float, float] = (0.0, 0.0), keep_aspect: bool = True):
    """Resize to `scale` x `size` (longer side; or a square when not keep_aspect), crop to the
    `size` x `size` canvas at the fraction `crop_xy` of the overhang, flip, pad bottom/right.

    Returns (pixels uint8 (size, size, 3), mask uint8 (size, size) with 1 on the image,
    boxes xyxy on the canvas, labels of the kept boxes, (valid_w, valid_h))."""
    w, h = image.size
    if keep_aspect:
        r = scale * size / max(w, h)
        new_w, new_h = max(1, round(w * r)), max(1, round(h * r))
    else:
        new_w = new_h = max(1, round(scale * size))
    image = image.convert("RGB").resize((new_w, new_h), Image.BILINEAR)
    sx, sy = new_w / w, new_h / h
    x0 = round((new_w - size) * crop_xy[0]) if new_w > size else 0
    y0 = round((new_h - size) * crop_xy[1]) if new_h > size else 0
    vw, vh = min(new_w, size), min(new_h, size)
    image = image.crop((x0, y0, x0 + vw, y0 + vh))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    kept_boxes, kept_labels = [], []
    for (bx0, by0, bx1, by1), label in zip(boxes, labels):
        bx0, bx1 = min(max(bx0 * sx - x0, 0.0), vw), min(max(bx1 * sx - x0, 0.0), vw)
        by0, by1 = min(max(by0 * sy - y0, 0.0), vh), min(max(by1 * sy - y0, 0.0), vh)
        if bx1 - bx0 < 1.0 or by1 - by0 < 1.0:
            continue  # cropped away (or under a pixel): nothing left to detect
        if flip:
            bx0, bx1 = vw - bx1, vw - bx0
        kept_boxes.append([bx0, by0, bx1, by1])
        kept_labels.append(label)
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[:vh, :vw] = np.asarray(image)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:vh, :vw] = 1
    return pixels, mask, kept_boxes, kept_labels, (vw, vh)


def to_target(boxes: list[list[float]], valid: tuple[int, int]) -> list[list[float]]:
    """xyxy canvas pixels -> (cx, cy, w, h) normalised by the valid region, the DETR targets
    that post_process_object_detection maps back with the original image size."""
    vw, vh = valid
    return [[(x0 + x1) / 2 / vw, (y0 + y1) / 2 / vh, (x1 - x0) / vw, (y1 - y0) / vh] for x0, y0, x1, y1 in boxes]


class Augmenter:
    """Ray Data flat_map (an actor): one work item of epoch_items in, its rows out, read, decoded,
    augmented and their targets encoded. Reading and augmenting happen in the one call: as a read
    task per item feeding an actor batches of 16, Ray's hand-off of every small block made an
    epoch's input take 4.5x as long, and the trainer waited on it (docs/benchmarks.md, the toy
    world's fifteenth run)."""

    def __init__(self, categories: list[str], size: int, augment_cfg: dict, keep_aspect: bool, train: bool = True,
                 copy_paste: Optional[tuple[dict, PoolIndex]] = None):
        self.index = {c: i for i, c in enumerate(categories)}
        self.size, self.keep_aspect, self.train = size, keep_aspect, train
        self.cfg = AugmentConfig(**augment_cfg)
        # Pool instances pasted onto real images, before the scale jitter (engine.training.copy_paste).
        self.paste = CopyPaste(CopyPasteConfig(**copy_paste[0]), copy_paste[1]) if copy_paste and train else None

    def __call__(self, item: dict) -> list[dict]:
        return [self.row(r) for r in read_item(item)]

    def row(self, r: dict) -> dict:
        image = open_image(r["file"]) if r["source"] == REAL else decode_image(r["image"])
        labels = json.loads(r["labels"])
        unknown = [label for label in labels if label not in self.index]
        if unknown and r["source"] == SYNTHETIC:
            raise DetectionDataError(f"synthetic sample {r['file']} has category {unknown[0]!r}, "
                                     f"which is not one of the detector's categories")
        keep = [j for j, label in enumerate(labels) if label in self.index]
        boxes = [json.loads(r["boxes"])[j] for j in keep]
        record = []
        # Every draw from the row's seed (epoch_items): the same run draws the same augmentation.
        seed = int(r["seed"])
        rng = np.random.default_rng(seed)
        if self.paste is not None and r["source"] == REAL:
            pixels_in, boxes, pasted_labels, record = self.paste(np.asarray(image), boxes,
                                                                 [labels[j] for j in keep], seed)
            image, labels, keep = Image.fromarray(pixels_in), pasted_labels, list(range(len(pasted_labels)))
        scale = rng.uniform(self.cfg.min_scale, self.cfg.max_scale) if self.train else 1.0
        flip = bool(rng.random() < self.cfg.flip_prob) if self.train else False
        crop = tuple(rng.random(2)) if self.train else (0.0, 0.0)
        pixels, mask, boxes, kept, valid = augment(image, boxes, [labels[j] for j in keep], self.size, scale,
                                                   flip, crop, self.keep_aspect)
        return {"pixels": pixels, "mask": mask, "source": r["source"],
                "target": json.dumps({"boxes": to_target(boxes, valid), "labels": [self.index[c] for c in kept]}),
                # The categories pasted and still visible: the trainer counts them per epoch.
                "pasted": json.dumps([p["category"] for p in record if p["box"] is not None])}


def epoch_items(cfg: DetectorConfig, plan: EpochPlan, epoch: int, world: int) -> list[list[dict]]:
    """Each worker's input of one epoch, the same for the same seed and epoch in any process: the
    planned samples in a seeded order, dealt to the workers in turn (so every worker gets the same
    number), each with a seed its augmentation is drawn from. A worker's real samples come in
    chunks, its synthetic ones as one item per shard (one pass over the tar), the items shuffled."""
    rng = random.Random(f"{cfg.seed}/{epoch}")
    samples = [(REAL, i) for i in range(len(plan.real))] + \
        [(url, key) for url, keys in plan.synthetic.items() for key in keys]
    rng.shuffle(samples)
    chunk = 4 * cfg.batch_size
    out = []
    for rank in range(world):
        real, synthetic = [], defaultdict(list)
        for source, x in samples[rank::world]:
            seed = rng.getrandbits(63)
            if source == REAL:
                real.append({**plan.real[x], "seed": seed})
            else:
                synthetic[source].append((x, seed))
        # JSON strings: one Arrow type for every item, whatever it holds.
        items = [{"url": "", "rows": json.dumps(real[i:i + chunk])} for i in range(0, len(real), chunk)]
        items += [{"url": url, "rows": json.dumps(keys)} for url, keys in synthetic.items()]
        rng.shuffle(items)
        out.append(items)
    return out


def read_item(item: dict) -> list[dict]:
    """The rows of one work item (epoch_items), in the item's order; a synthetic item reads its
    shard's tar once."""
    rows = json.loads(item["rows"])
    if not item["url"]:
        return [{"source": REAL, "file": r["file"], "image": b"", "boxes": r["boxes"], "labels": r["labels"],
                 "seed": r["seed"]} for r in rows]
    wanted, found = {key for key, _ in rows}, {}
    for sample in iter_samples([item["url"]], decode=False):
        key = sample["__key__"].rsplit("/", 1)[-1]
        if key in wanted:
            found[key] = (sample["jpg"], json.loads(sample["json"]))
    missing = wanted - set(found)
    if missing:
        raise DetectionDataError(f"shard {item['url']} no longer holds sample {sorted(missing)[0]!r}; it changed "
                                 f"after training started: regenerate it, then train again")
    return [{"source": SYNTHETIC, "file": f"{item['url']}#{key}", "image": found[key][0],
             "boxes": json.dumps(found[key][1]["boxes"]), "labels": json.dumps(found[key][1]["labels"]), "seed": seed}
            for key, seed in rows]


def dataset_name(rank: int, epoch: int) -> str:
    return f"train_r{rank}_e{epoch}"


def build_train_datasets(cfg: DetectorConfig, plan: EpochPlan, categories: list[str], keep_aspect: bool,
                         epochs: int, paste_index: Optional[PoolIndex] = None) -> dict:
    """One Ray Dataset per worker and epoch (dataset_name), its planned rows read and augmented on
    CPU workers. Built per worker rather than split by Ray, whose split deals blocks to whichever
    worker asks first: with their order kept (engine.training.runner) the same seed trains on the same
    batches. Only the epochs' work lists are held here; rows are read when an epoch runs."""
    import ray
    paste = (asdict(cfg.copy_paste), paste_index) if paste_index is not None else None
    datasets = {}
    for epoch in range(epochs):
        for rank, items in enumerate(epoch_items(cfg, plan, epoch, cfg.run.num_workers)):
            # One block per item, read and augmented by one actor; a fraction of a CPU, since the
            # trainer workers already hold most of a small machine.
            datasets[dataset_name(rank, epoch)] = (
                ray.data.from_items(items, override_num_blocks=len(items))
                .flat_map(Augmenter, fn_constructor_args=(categories, cfg.image_size, asdict(cfg.augment),
                                                          keep_aspect, True, paste),
                          num_cpus=0.25, compute=ray.data.ActorPoolStrategy(size=1)))
    return datasets


def collate(batch: dict, image_mean, image_std) -> dict:
    """Numpy batch -> the detector's inputs (transformers-style targets) plus the sources."""
    pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"])).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(image_mean, dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(image_std, dtype=torch.float32)[None, :, None, None]
    labels = []
    for t in batch["target"]:
        t = json.loads(t)
        labels.append({"class_labels": torch.tensor(t["labels"], dtype=torch.long),
                       "boxes": torch.tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4)})
    return {"pixel_values": (pixels - mean) / std, "pixel_mask": torch.from_numpy(batch["mask"]).long(),
            "labels": labels, "sources": list(batch["source"]),
            "pasted": [json.loads(p) for p in batch["pasted"]] if "pasted" in batch else []}


def shuffled_batches(stream: Iterable[dict], batch_size: int, buffer_rows: int, seed: int) -> Iterator[dict]:
    """Batches of `batch_size` rows drawn at random from a buffer of `buffer_rows` rows that the
    stream of numpy batches refills row by row; the rows a last, short batch would hold are left
    out. Each draw is decided by the row count alone, so the same stream and seed give the same
    batches however the stream arrives. (Ray Data's local shuffle draws from whatever blocks have
    arrived when a batch is asked for: timing decides, and one detector seed trained two ways.)"""
    rng = np.random.default_rng(seed)
    pending: list[tuple[dict, int]] = []  # (stream batch, row)

    def draw() -> dict:
        picked = [pending.pop(j) for j in sorted(rng.choice(len(pending), batch_size, replace=False), reverse=True)]
        return {key: np.stack([b[key][r] for b, r in picked]) for key in picked[0][0]}

    for b in stream:
        for r in range(len(next(iter(b.values())))):
            pending.append((b, r))
            if len(pending) == buffer_rows + batch_size:
                yield draw()
    while len(pending) >= batch_size:
        yield draw()


# --------------------------------------------------------------------------------------------
# Training


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker; everything it needs arrives in `config`."""
    import ray.train
    import ray.train.torch
    cfg: DetectorConfig = from_dict(DetectorConfig, config["detector"])
    categories, steps_per_epoch, total = config["categories"], config["steps_per_epoch"], config["total_steps"]
    rank = ray.train.get_context().get_world_rank()
    seed_everything(cfg.seed + rank)
    det = build_detector(cfg.kind, cfg.model, categories, cfg.image_size, cfg.attention, cfg.tiny)
    device = ray.train.torch.get_device() if cfg.run.use_gpu else torch.device("cpu")
    det.model.to(device).train()
    ema = ema_state = None
    if cfg.ema:  # fp32 copies, made before DeepSpeed casts the module
        from diffusers.training_utils import EMAModel
        names = [n for n, _ in det.model.named_parameters()]
        ema = EMAModel(det.model.parameters(), decay=cfg.ema_decay)

        def ema_state() -> dict:
            return {"ema": dict(zip(names, ema.shadow_params))}
    engine = deepspeed_engine(det.model, deepspeed_config(
        cfg.run.zero_stage, cfg.lr, cfg.weight_decay, cfg.warmup_steps, total, cfg.run.bf16,
        batch_per_worker=cfg.batch_size, clip=cfg.clip))
    history: dict[str, list] = {"losses": [], "epochs": []}

    def on_load(directory: str, meta: dict) -> None:
        history.update(meta["extra"])
        if ema is not None:  # a run begun without the average starts it at the restored weights
            state = load_tensors(directory, "ema") or {n: p.detach() for n, p in det.model.named_parameters()}
            for shadow, name in zip(ema.shadow_params, names):
                shadow.copy_(state[name])
            ema.optimization_step = int(meta["step"])

    step = restore_checkpoint(engine, on_load=on_load)
    dtype = torch.bfloat16 if cfg.run.bf16 else torch.float32
    while step < total:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        seen, pasted = Counter(), Counter()
        start = time.time()
        # The buffer mixes a shard's synthetic samples with real ones; seeded, as the rows are.
        stream = ray.train.get_dataset_shard(dataset_name(rank, epoch)).iter_batches(
            batch_size=cfg.batch_size, batch_format="numpy")
        batches = shuffled_batches(stream, cfg.batch_size, 4 * cfg.batch_size,
                                   random.Random(f"{cfg.seed}/{epoch}/{rank}").getrandbits(32))
        for i, rows in enumerate(batches):
            if i < done_in_epoch:
                continue  # resumed mid-epoch: these batches were trained on before the checkpoint
            if step >= total or i >= steps_per_epoch:
                break
            batch = collate(rows, det.image_mean, det.image_std)
            labels = [{k: v.to(device) for k, v in t.items()} for t in batch["labels"]]
            out = engine(pixel_values=batch["pixel_values"].to(device, dtype),
                         pixel_mask=batch["pixel_mask"].to(device), labels=labels)
            engine.backward(out.loss)
            engine.step()
            if ema is not None:
                ema.step(engine.module.parameters())
            step += 1
            seen.update(batch["sources"])
            pasted.update(c for cats in batch["pasted"] for c in cats)
            loss = _finite(float(all_reduce(out.loss.detach().float(), "mean")))
            history["losses"].append(round(loss, 6))
            end_of_epoch = i + 1 == steps_per_epoch or step == total
            metrics = {"loss": loss, "epoch": epoch, "lr": engine.get_lr()[0]}
            if end_of_epoch:
                counts = all_reduce(torch.tensor([seen[REAL], seen[SYNTHETIC]], device=device)).tolist()
                # Samples by source over the epoch's steps on all workers (the mixing check);
                # after a resume in mid-epoch, over the steps since the checkpoint.
                history["epochs"].append({"epoch": epoch, REAL: counts[0], SYNTHETIC: counts[1],
                                          "images_per_s": sum(counts) / max(time.time() - start, 1e-9)})
                if cfg.copy_paste.pool:  # the pool instances pasted (and left visible), per category
                    by_cat = all_reduce(torch.tensor([pasted[c] for c in categories], device=device)).tolist()
                    history["epochs"][-1]["pasted"] = {c: int(n) for c, n in zip(categories, by_cat) if n}
                metrics.update(history["epochs"][-1])
            report(metrics, engine, step, cfg.run.checkpoint_every, extra=history, last=step == total,
                   tensors=ema_state)


def _finite(loss: float) -> float:
    if not math.isfinite(loss):
        raise FloatingPointError(f"detector loss became {loss}; lower detector.lr or check the boxes of the data")
    return loss


def check_config(cfg: DetectorConfig) -> None:
    """The detector section's own checks, that its kind is one the detector registry builds, and
    that the datasets and shard outputs it names are there and whole."""
    if cfg.kind not in DETECTORS:
        raise ConfigError(f"detector.kind {cfg.kind!r} is unknown; choose one of {', '.join(sorted(DETECTORS))}")
    cfg.validate()
    # The paths it reads, before the real images are decoded (minutes on a large set) or Ray starts.
    if cfg.mix_ratio < 1.0:
        check_dataset(cfg.real_annotations, cfg.real_image_root,
                      ("detector.real_annotations", "detector.real_image_root"))
    for path in cfg.synthetic if cfg.mix_ratio > 0 else []:
        finished_shards(path, "detector.synthetic")


def prepare(cfg: DetectorConfig) -> tuple[list[str], EpochPlan]:
    """Everything the driver checks and plans before any worker starts."""
    check_config(cfg)
    categories, real_rows = detector_categories(cfg)
    pool = synthetic_pool(cfg.synthetic, categories, cfg.synthetic_complete_only) if cfg.mix_ratio > 0 else None
    return categories, plan_epoch(cfg, real_rows, pool)


def train_detector(cfg: DetectorConfig, ray_cfg: Optional[RayConfig] = None) -> TrainSummary:
    """Train on Ray Train workers (resuming an earlier run of the same storage_path/name), then
    save the detector to cfg.output_dir."""
    from safetensors.torch import load_file

    start = time.time()
    categories, plan = prepare(cfg)
    paste_index = load_pool_index(cfg.copy_paste, categories) if cfg.copy_paste.pool else None
    # Build once on the driver: a bad kind, folder or attention fails here, not in every worker.
    det = build_detector(cfg.kind, cfg.model, categories, cfg.image_size, "reference", cfg.tiny)
    total = plan.steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    connect(ray_cfg or RayConfig())
    datasets = build_train_datasets(cfg, plan, categories, det.keep_aspect, math.ceil(total / plan.steps_per_epoch),
                                    paste_index)
    loop_config = {"detector": asdict(cfg), "categories": categories,
                   "steps_per_epoch": plan.steps_per_epoch, "total_steps": total}
    result = fit(train_loop_per_worker, loop_config, cfg.run, datasets, "detector training", split_datasets=False)
    with result.checkpoint.as_directory() as d:
        meta = read_meta(d)
        det.model.load_state_dict(load_file(os.path.join(d, MODEL_FILE)))
        average = load_tensors(d, "ema") if cfg.ema else None
        if average:  # by parameter, not load_state_dict: a tied weight has one parameter, two keys
            params = dict(det.model.named_parameters())
            for name, value in average.items():
                params[name].data.copy_(value)
    history = meta["extra"]
    losses = history.get("losses", [])
    summary = TrainSummary(os.path.abspath(cfg.output_dir), int(meta["step"]), result.checkpoint.path,
                           {"loss": losses[-1] if losses else None, "losses": losses,
                            "epochs": history.get("epochs", []), "plan": plan.counts}, time.time() - start)
    record = {**asdict(summary), "categories": categories, "config": asdict(cfg)}
    det.save(cfg.output_dir, extra_files={"training.json": json.dumps(record, indent=2)})
    return summary
