"""Training the grounding head (paper 3.3 and 4.1).

Stage 1 (epochs before `transfer_epoch`): supervised on base-category triplets from generation
shards: (UNet features recomputed from the stored latents, teacher-detector boxes with score >=
alpha, the prompt). Stage 2 (from `transfer_epoch`): at the transfer the mean teacher becomes a
copy of the student and then follows it by EMA; on every step the teacher (eval mode, so no
dropout) labels a batch of novel-category features, its boxes with score >= beta become the
student's targets, and the student (dropout after each enhancer and decoder layer) minimises
L_base + L_novel. The learning rate drops 10x at `lr_drop_epoch` (1-based, paper: 11 of 12).

Each image's text is its prompt's categories plus `negatives` other categories of the same
split, so the contrastive scores learn to say "not here" as well as "here".

Driver: `train_grounding(cfg, model_cfg)` reads the shards through Ray Data and runs `train_loop_per_worker`
on Ray Train workers with DeepSpeed (engine.training.runner); rank 0 writes the head (safetensors) and
its config to `grounding.output`, loadable with `load_grounding_head`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from engine.config import (
    GroundingTrainConfig,
    GroundingTrainError,
    ModelConfig,
    RayConfig,
    from_dict,
)
from engine.data.shards import decode_sample, finished_shards, shard_urls, usable
from engine.models.diffusion import check_source, finetuned_from, load_pipeline
from engine.models.grounding.features import Featurizer
from engine.models.grounding.head import (
    HEAD_FILE,
    GroundingHead,
    build_head,
    ema_update,
    load_grounding_head,
    make_teacher,
    predictions,
    save_grounding_head,
)
from engine.models.grounding.loss import grounding_loss, targets_from_boxes
from engine.runtime.cluster import connect, threads_for
from engine.training.runner import (
    TrainSummary,
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

@dataclass
class GroundingJob:
    """What `jobs/train_grounding.py` reads: the pipeline whose features the head reads, the
    grounding section, and where Ray is."""
    model: ModelConfig = field(default_factory=ModelConfig)
    grounding: GroundingTrainConfig = field(default_factory=GroundingTrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> None:
        self.grounding.validate()


# ------------------------------------------------------------------------------------------------
# Rows: what one training sample is once read from a shard


def sample_to_row(sample: dict, allowed: set[str], alpha: float) -> dict:
    """A decoded shard sample -> a training row of plain columns. Boxes: the teacher detector's
    (a box another labeller made is no ground truth), of allowed categories, score >= alpha (the
    shards were filtered at generation time, possibly with another alpha), normalised xyxy."""
    meta = sample["json"]
    w, h = float(meta["width"]), float(meta["height"])
    labellers = meta.get("labellers") or ["detector"] * len(meta["boxes"])
    boxes, labels = [], []
    for box, label, score, who in zip(meta["boxes"], meta["labels"], meta["scores"], labellers):
        if who == "detector" and label in allowed and score >= alpha:
            x0, y0, x1, y1 = box
            boxes.append([x0 / w, y0 / h, x1 / w, y1 / h])
            labels.append(label)
    return {"key": str(sample["__key__"]), "latent": np.asarray(sample["latent"], np.float32),
            "prompt": str(meta["prompt"]),
            "categories": json.dumps(list(meta["categories"])), "boxes": json.dumps(boxes),
            "labels": json.dumps(labels)}


def collate(rows: list[dict]) -> dict:
    """Rows -> a column batch like Ray Data's numpy batches."""
    return {"latent": np.stack([r["latent"] for r in rows]),
            **{k: np.array([r[k] for r in rows], dtype=object)
               for k in ("key", "prompt", "categories", "boxes", "labels") if k in rows[0]}}


def read_rows(url: str, allowed: list[str], alpha: float):
    """A Ray dataset of training rows from the finished shards under `url`. Shards are read raw
    and decoded by engine.data.shards.decode_sample (never unpickled)."""
    import ray.data

    urls = shard_urls(url)
    allowed_set = set(allowed)

    def to_row(raw: dict) -> dict:
        raw = {k: v for k, v in raw.items() if k != "jpg"}  # the image is not needed to train
        return sample_to_row(decode_sample(raw), allowed_set, alpha)

    def kept(raw: dict) -> bool:  # an image the quality filter refused is not trained on
        return usable(json.loads(bytes(raw["json"])))

    return ray.data.read_webdataset(urls, decoder=None, suffixes=["latent.npy", "json"]).filter(kept).map(to_row)


# ------------------------------------------------------------------------------------------------
# One training step, shared by the Ray Train worker and the plain loop


class GroundingStep:
    """Turns column batches into the loss of Eq. 2 (base) plus, when a teacher exists, the
    self-training loss on novel batches."""

    def __init__(self, cfg: GroundingTrainConfig, featurizer: Featurizer, rng: random.Random):
        self.cfg, self.featurizer, self.rng = cfg, featurizer, rng

    def texts(self, categories: list[list[str]], pool: list[str]) -> list[list[str]]:
        """Each image's category list: its prompt's categories, then `negatives` others from `pool`."""
        out = []
        for cats in categories:
            others = [c for c in pool if c not in cats]
            out.append(list(cats) + self.rng.sample(others, min(self.cfg.negatives, len(others))))
        return out

    def inputs(self, batch: dict, pool: list[str], device, split: str):
        latents = torch.as_tensor(np.stack(list(batch["latent"])), dtype=torch.float32)
        # Keys name samples within one output; base and novel outputs number theirs alike.
        keys = [f"{split}/{k}" for k in batch["key"]] if "key" in batch else None
        feats = self.featurizer.unet_features(latents, [str(p) for p in batch["prompt"]], keys)
        cats = [json.loads(c) for c in batch["categories"]]
        names = self.texts(cats, pool)
        text, mask = self.featurizer.text_batch(names)
        return [f.to(device) for f in feats], text.to(device), mask.to(device), cats, names

    def base_loss(self, student, batch: dict, device) -> tuple[torch.Tensor, dict]:
        feats, text, mask, cats, names = self.inputs(batch, self.cfg.base, device, "base")
        labels, boxes = [], []
        for n, ls, bs in zip(names, batch["labels"], batch["boxes"]):
            # A box of a category the prompt did not name has no text slot to be scored against.
            kept = [(n.index(lab), box) for lab, box in zip(json.loads(ls), json.loads(bs)) if lab in n]
            labels.append([lab for lab, _ in kept])
            boxes.append([box for _, box in kept])
        targets = targets_from_boxes(labels, boxes, device)
        scored = without_missed(mask, labels, [len(c) for c in cats])
        loss, parts = grounding_loss(student(feats, text, mask), scored, targets, self.cfg.loss)
        return loss, {f"base_{k}": v for k, v in parts.items()} | {"base_boxes": sum(map(len, labels))}

    def novel_loss(self, student, teacher, batch: dict, device) -> tuple[torch.Tensor, dict]:
        feats, text, mask, cats, names = self.inputs(batch, self.cfg.novel, device, "novel")
        with torch.no_grad():
            teacher_out = teacher(feats, text, mask)
        prompted = [len(c) for c in cats]
        labels, boxes = pseudo_labels(teacher_out, mask, prompted, self.cfg.beta, self.cfg.nms_iou,
                                      self.cfg.max_per_category)
        targets = targets_from_boxes(labels, boxes, device)
        scored = without_missed(mask, labels, prompted)
        loss, parts = grounding_loss(student(feats, text, mask), scored, targets, self.cfg.loss)
        return loss, {f"novel_{k}": v for k, v in parts.items()} | {"pseudo_boxes": sum(map(len, labels))}


def without_missed(text_mask: torch.Tensor, labels: list[list[int]], prompted: list[int]) -> torch.Tensor:
    """The text slots the classification loss scores: all but the prompted categories that got no
    box in that image. The prompt says such an object is there, so no box means the labeller
    (teacher at alpha, EMA teacher at beta) missed it; scoring the slot as background would teach
    the head that the category is never there, and a labeller that misses most objects at first
    would make self-training suppress exactly the novel categories it is meant to learn."""
    scored = text_mask.clone()
    for b, (found, n) in enumerate(zip(labels, prompted)):
        for c in set(range(n)) - set(found):
            scored[b, c] = False
    return scored


def pseudo_labels(teacher_out: dict, text_mask: torch.Tensor, prompted: list[int], beta: float,
                  nms_iou: float = 0.7, per_category: int = 0) -> tuple[list[list[int]], list[list[list[float]]]]:
    """The teacher's boxes with score >= beta, of the categories the prompt named (the first
    `prompted[b]` entries of image b's list; the rest are negatives, never labelled), as
    (label indices, normalised xyxy boxes) per image."""
    labels, boxes = [], []
    for b, found in enumerate(predictions(teacher_out, text_mask, beta, nms_iou, per_category=per_category)):
        keep = [(c, box) for c, _, box in found if c < prompted[b]]
        labels.append([c for c, _ in keep])
        boxes.append([box for _, box in keep])
    return labels, boxes


def lr_at(cfg: GroundingTrainConfig, epoch: int) -> float:
    """Epoch is 0-based; lr_drop_epoch is 1-based, as the paper counts."""
    return cfg.lr * (0.1 if epoch + 1 >= cfg.lr_drop_epoch else 1.0)


def _cycle(make: Callable[[], Iterator[dict]]) -> Iterator[dict]:
    while True:
        empty = True
        for batch in make():
            empty = False
            yield batch
        if empty:
            raise GroundingTrainError("the novel-category dataset gave no batch; it needs at least "
                                      "batch_size / num_workers samples")


@dataclass
class Optimizer:
    """What the epoch loop needs of its optimizer: what to call forward (a DeepSpeed engine, or the
    head itself), the head it trains, a step on a loss, and the parameter groups (the paper's step
    drop of the lr is set on them per epoch)."""
    model: Callable
    module: torch.nn.Module
    step: Callable[[torch.Tensor], None]
    param_groups: list


def run_epochs(cfg: GroundingTrainConfig, trainer: GroundingStep, opt: Optimizer, base_batches: Callable[[], Iterator[dict]],
               novel_batches: Optional[Iterator[dict]], device, start_epoch: int = 0, skip: int = 0,
               teacher: Optional[torch.nn.Module] = None, on_step: Callable[..., bool] = lambda **kw: False,
               on_epoch_end: Callable[..., None] = lambda **kw: None) -> Optional[torch.nn.Module]:
    """The grounding head's epochs (paper 3.3): supervised on base batches; from transfer_epoch on,
    an EMA teacher (a copy of the student at the transfer) labels novel batches for the student,
    which then drops out after each layer. `skip` batches of `start_epoch` are passed over (done
    before a restart). `on_step(step_in_epoch=, epoch=, loss=, metrics=, teacher=)` after every
    step (True stops training) and `on_epoch_end(epoch=, batches=, teacher=)` after every epoch
    report progress. Returns the teacher."""
    head = opt.module
    for epoch in range(start_epoch, cfg.epochs):
        self_training = novel_batches is not None and epoch >= cfg.transfer_epoch
        if self_training and teacher is None:
            teacher = make_teacher(head)  # the transfer: teacher = student
        head.set_layer_dropout(cfg.head.layer_dropout if self_training else 0.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, epoch)
        seen = 0
        for i, batch in enumerate(base_batches()):
            seen += 1
            if epoch == start_epoch and i < skip:
                continue  # done before the restart
            opt.model.train()
            loss, metrics = trainer.base_loss(opt.model, batch, device)
            if self_training:
                novel_loss, novel_metrics = trainer.novel_loss(opt.model, teacher, next(novel_batches), device)
                loss = loss + novel_loss
                metrics |= novel_metrics
            opt.step(loss)
            if self_training:
                ema_update(teacher, head, cfg.ema_momentum)
            if on_step(step_in_epoch=i + 1, epoch=epoch, loss=float(loss.detach()), metrics=metrics, teacher=teacher):
                return teacher  # the caller's budget of steps or time is spent
        on_epoch_end(epoch=epoch, batches=seen, teacher=teacher)
    return teacher


# ------------------------------------------------------------------------------------------------
# Ray Train worker


def _teacher_state(teacher) -> Callable[[], dict]:
    return lambda: {"teacher": teacher.state_dict()} if teacher is not None else {}


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: everything it needs arrives in `config`."""
    import ray.train


    job = from_dict(GroundingJob, config["job"])
    cfg = job.grounding
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    seed_everything(cfg.seed)  # same head initialisation on every rank
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.run.use_gpu else "cpu")
    pipe = load_pipeline(job.model, str(device))
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    featurizer = Featurizer(pipe, cfg.synthesis_steps, cfg.feature_cache_mb)
    head = build_head(cfg.head, pipe).to(device)
    if cfg.init_head:  # sizes checked on the driver (check_inputs); a restored checkpoint replaces these
        from safetensors.torch import load_file
        head.load_state_dict(load_file(os.path.join(cfg.init_head, HEAD_FILE)))

    per_worker = cfg.batch_size // world
    ds_cfg = deepspeed_config(cfg.run.zero_stage, cfg.lr, cfg.weight_decay, 0, 1, cfg.run.bf16,
                              batch_per_worker=per_worker, clip=cfg.clip)
    # The paper's schedule is a step drop by epoch, set on the optimizer below (lr_at); DeepSpeed's
    # warmup-decay scheduler is not used, so there is no scheduler state to checkpoint either.
    ds_cfg.pop("scheduler")
    engine = deepspeed_engine(head, ds_cfg)

    holder: dict = {"teacher": None, "extra": {}}

    def on_load(directory: str, meta: dict) -> None:
        holder["extra"] = meta.get("extra", {})
        state = load_tensors(directory, "teacher")
        if state is not None:
            teacher = make_teacher(engine.module)
            teacher.load_state_dict({k: v.to(device) for k, v in state.items()})
            holder["teacher"] = teacher

    step = restore_checkpoint(engine, on_load=on_load)
    teacher = holder["teacher"]
    start_epoch = int(holder["extra"].get("epoch", cfg.transfer_epoch if cfg.init_head else 0))
    skip = int(holder["extra"].get("batches", 0))
    if skip < 0:  # the checkpoint was taken at the end of that epoch
        start_epoch, skip = start_epoch + 1, 0

    rng = random.Random(cfg.seed * 1000 + rank)
    trainer = GroundingStep(cfg, featurizer, rng)
    base_ds = ray.train.get_dataset_shard("base")
    novel_ds = ray.train.get_dataset_shard("novel") if cfg.novel_shards else None
    novel_iter = None
    if novel_ds is not None:
        novel_iter = _cycle(lambda: novel_ds.iter_batches(batch_size=per_worker, batch_format="numpy",
                                                          drop_last=True))
    state = {"step": step, "metrics": {}}

    def on_step(step_in_epoch: int, epoch: int, loss: float, metrics: dict, teacher) -> bool:
        state["step"] += 1
        state["metrics"] = {"loss": loss, "epoch": epoch, **metrics}
        report(state["metrics"], engine, state["step"], cfg.run.checkpoint_every,
               extra={"epoch": epoch, "batches": step_in_epoch}, tensors=_teacher_state(teacher))
        return False

    def on_epoch_end(epoch: int, batches: int, teacher) -> None:
        if not batches:
            raise GroundingTrainError(f"the base-category shards gave no batch of {per_worker} samples to this "
                                      f"worker; generate more samples or lower grounding.batch_size")
        # An end-of-epoch checkpoint, so a restart never redoes a finished epoch.
        report({**state["metrics"], "epoch_end": 1}, engine, state["step"], cfg.run.checkpoint_every,
               extra={"epoch": epoch, "batches": -1}, last=True, tensors=_teacher_state(teacher))

    def engine_step(loss: torch.Tensor) -> None:
        engine.backward(loss)
        engine.step()

    run_epochs(cfg, trainer, Optimizer(engine, engine.module, engine_step, engine.optimizer.param_groups),
               lambda: base_ds.iter_batches(batch_size=per_worker, batch_format="numpy", drop_last=True),
               novel_iter, device, start_epoch, skip, teacher, on_step, on_epoch_end)
    if rank == 0:
        save_grounding_head(cfg.output, engine.module, job.model, cfg)


def check_inputs(cfg: GroundingTrainConfig, model: ModelConfig) -> None:
    """Every user error that can be found on the driver, before Ray or any worker starts."""
    cfg.validate()
    check_source(model)
    finished_shards(cfg.base_shards, "grounding.base_shards")
    if cfg.novel_shards:
        finished_shards(cfg.novel_shards, "grounding.novel_shards")
    if cfg.init_head:
        _, meta = load_grounding_head(cfg.init_head)
        sizes = ("d_model", "enhancer_layers", "decoder_layers", "num_queries", "n_levels", "n_heads", "n_points",
                 "ffn_dim")
        # A head of the model this one was fine-tuned from reads features of the same UNet, moved
        # by fine-tuning: a start to train on, as the paper's fine-tuned generator keeps its features.
        same_model = meta["model"].get("source") in (model.source, finetuned_from(model.source))
        if not same_model or any(meta["head"][k] != getattr(cfg.head, k) for k in sizes):
            raise GroundingTrainError(f"grounding.init_head {cfg.init_head!r} was trained on the features of "
                                      f"{meta['model'].get('source')!r} with other head sizes or another model than "
                                      f"this job's ({model.source!r}); start from a head trained with the same model "
                                      f"and grounding.head, or leave init_head out")


def train_grounding(cfg: GroundingTrainConfig, model: ModelConfig, ray_cfg: Optional[RayConfig] = None) -> TrainSummary:
    """Driver: read the shards through Ray Data and train on Ray Train + DeepSpeed (resuming an
    earlier run of the same run.storage_path/name). The head is written to cfg.output."""
    start = time.time()
    check_inputs(cfg, model)
    connect(ray_cfg or RayConfig())
    job = GroundingJob(model=model, grounding=cfg)
    datasets = {"base": read_rows(cfg.base_shards, cfg.base, cfg.alpha)}
    if cfg.novel_shards:
        # Novel shards' own boxes are never used: the EMA teacher labels novel images.
        datasets["novel"] = read_rows(cfg.novel_shards, cfg.novel, 1.0)
    loop_config = {"job": dataclasses.asdict(job), "threads": threads_for(cfg.run.cpus_per_worker)}
    result = fit(train_loop_per_worker, loop_config, cfg.run, datasets, "grounding-head training")
    with result.checkpoint.as_directory() as d:
        steps = int(read_meta(d)["step"])
    # A rerun of a finished run trains (and reports) nothing: its figures are those of the checkpoint.
    return TrainSummary(cfg.output, steps, result.checkpoint.path, dict(result.metrics or {}), time.time() - start)


# ------------------------------------------------------------------------------------------------
# The trained head on disk


# ------------------------------------------------------------------------------------------------
# In this process (tests, bench/grounding_learns.py): the same epoch loop without Ray or DeepSpeed


def train_local(cfg: GroundingTrainConfig, featurizer: Featurizer, head: GroundingHead,
                base_rows: list[dict], novel_rows: Optional[list[dict]] = None,
                max_steps: Optional[int] = None, time_limit_s: Optional[float] = None,
                log_every: int = 0) -> list[float]:
    """Train `head` in place on in-memory rows (see sample_to_row) in this process, with torch's
    AdamW in place of DeepSpeed's and run_epochs' loop; returns the loss per step."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    adamw = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses: list[float] = []
    start = time.time()

    def step(loss: torch.Tensor) -> None:
        adamw.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.clip)
        adamw.step()

    def base_batches() -> Iterator[dict]:
        order = rng.sample(range(len(base_rows)), len(base_rows))
        for i in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            yield collate([base_rows[j] for j in order[i:i + cfg.batch_size]])

    def on_step(epoch: int, loss: float, **_) -> bool:
        losses.append(loss)
        if log_every and len(losses) % log_every == 0:
            print(f"step {len(losses)} epoch {epoch} loss {np.mean(losses[-log_every:]):.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)
        return bool((max_steps and len(losses) >= max_steps) or (time_limit_s and time.time() - start > time_limit_s))

    novel = None
    if novel_rows:
        novel = _cycle(lambda: (collate(novel_rows[i:i + cfg.batch_size])
                                for i in range(0, len(novel_rows) - cfg.batch_size + 1, cfg.batch_size)))
    run_epochs(cfg, GroundingStep(cfg, featurizer, rng), Optimizer(head, head, step, adamw.param_groups),
               base_batches, novel, "cpu", on_step=on_step)
    return losses
