"""The main job: shards -> synthesis actors -> annotation actors [-> quality filter] [-> masks] -> shard writers.

Work is planned in shards: shard i holds prompt rows [i*shard_size, (i+1)*shard_size). Only
shards missing from the manifest are generated, so rerunning the same command after an
interruption finishes the dataset without duplicating or losing a sample. The driver plans and
counts; it never holds a prompt list, an image or a latent: each shard travels through the
actor pools as one row (made from its index by the synthesis actor) and is written by a Ray task
where it is finished, tar first, manifest entry after, in whatever order shards finish.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

from engine.config import Config, fingerprint, to_dict
from engine.data.shards import ShardError, ShardStore, ShardWriter
from engine.generation.annotation import Annotator, build_labeller, check_labeller
from engine.generation.captions import Captioner, caption_pool
from engine.generation.expansion import settings as expansion_settings, uncached
from engine.generation.filter import QualityFilter, plan_filter_pool
from engine.generation.generators import check_generators, generators, planned_images, shard_owners, split_pool
from engine.generation.layouts import make_plan
from engine.generation.masks import Masker, plan_mask_pool
from engine.generation.prompts import ROWS_VERSION, PromptPlan
from engine.generation.synthesis import Synthesizer
from engine.models.captioner import load_captioner
from engine.models.clip import build_clip, check_clip_folder
from engine.models.diffusion import load_pipeline
from engine.models.language import load_language_model
from engine.models.open_vocab import KINDS as OPEN_VOCAB
from engine.models.segmenter import build_segmenter
from engine.runtime.cluster import (
    cluster_state,
    connect,
    plan_pools,
    quiet_data_context,
    raise_as_one_line,
    threads_for,
)


@dataclass
class Summary:
    images: int
    boxes: int
    shards: int
    shards_written: int
    dropped: int
    wall_s: float
    output: str
    refused: int = 0  # images the quality filter refused: in the shards, marked, used by no reader
    per_generator: Optional[list[int]] = None  # images each generator drew (a build with `models`)

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else 0.0

    def line(self) -> str:
        return (f"{self.images} images, {self.boxes} boxes, {self.shards} shards "
                f"({self.shards_written} written now), {self.dropped} dropped, "
                f"{f'{self.refused} refused by the filter, ' if self.refused else ''}"
                f"{'by generator ' + ' / '.join(map(str, self.per_generator)) + ', ' if self.per_generator else ''}"
                f"{self.wall_s:.1f} s, {self.images_per_s:.2f} images/s -> {self.output}")


def run_fingerprint(cfg: Config, plan: PromptPlan) -> str:
    """What decides the samples: a resumed run must agree on all of it, down to the categories and
    budgets a dataset file gave (the file may change under the same path)."""
    # Prompt expansion only when on, so that outputs without it keep their fingerprints.
    prompts = {k: v for k, v in asdict(cfg.prompts).items()
               if not (k == "expand" and not cfg.prompts.expand.enabled or k == "extra" and not v)}
    if "expand" in prompts:
        prompts["expand"] = expansion_settings(cfg.prompts.expand)
    # A build with several generators: the list, shares included (which decide the assignment of
    # shards), in place of the one model, so that single-model outputs keep their fingerprints.
    models = ({"models": [to_dict(g) for g in cfg.models]} if cfg.models is not None
              else {"model": to_dict(cfg.model)})
    return fingerprint({**models, "prompts": prompts,
                        "categories": [plan.categories, plan.counts, plan.words] + ([plan.extra] if plan.extra else []),
                        "synthesis": {k: v for k, v in asdict(cfg.synthesis).items()
                                      if k not in ("batch_size", "num_actors", "gpus_per_actor")},
                        "annotation": {"labeller": cfg.annotation.labeller, "model": cfg.annotation.model,
                                       "alpha": cfg.annotation.alpha, "beta": cfg.annotation.beta,
                                       **({"verify_iou": cfg.annotation.verify_iou}
                                          if cfg.annotation.labeller == "layout+detector" else {}),
                                       # only for the zero-shot detectors, so that other outputs keep their fingerprints
                                       **({k: getattr(cfg.annotation, k) for k in ("open_vocab", "box_threshold", "text_threshold")}
                                          if cfg.annotation.labeller in OPEN_VOCAB else {})},
                        "shard_size": cfg.output.shard_size, "rows": ROWS_VERSION,
                        # only when on, so that outputs without masks keep their fingerprints
                        **({"masks": asdict(cfg.masks)} if cfg.masks.enabled else {}),
                        # Its thresholds decide which samples are usable; its actors' resources do not.
                        **({"filter": {k: v for k, v in asdict(cfg.filter).items()
                                       if k not in ("num_actors", "gpus_per_actor")}} if cfg.filter.enabled else {}),
                        # Layout rows: their config (less the caption batch size, which changes no
                        # sample) and the dataset's qualifying images and boxes.
                        **({"layout": [{k: v for k, v in asdict(cfg.layout).items() if k != "caption_batch_size"},
                                       plan.fingerprint_data()]} if _layouts(plan) else {})})


def _layouts(plan) -> bool:
    return getattr(plan, "layouts", False)


class Progress:
    """A line every few seconds with images/s, for hours-long builds read in job logs."""

    def __init__(self, total_images: int, total_shards: int, every_s: float = 5.0):
        self.total_images, self.total_shards, self.every_s = total_images, total_shards, every_s
        self.start = self.last = time.time()
        self.images = self.shards = 0

    def update(self, images: int = 0, shards: int = 0) -> None:
        self.images += images
        self.shards += shards
        now = time.time()
        if now - self.last >= self.every_s or self.shards == self.total_shards:
            self.last = now
            rate = self.images / max(now - self.start, 1e-9)
            print(f"[generate] shards {self.shards}/{self.total_shards}  images {self.images}/"
                  f"{self.total_images}  {rate:.2f} images/s", file=sys.stderr, flush=True)


def generate(cfg: Config) -> Summary:
    import ray

    start = time.time()
    plan = make_plan(cfg)  # prompt rows, or layout rows when layout.annotations is set
    categories = plan.all_categories
    size = cfg.output.shard_size
    n_shards = (len(plan) + size - 1) // size
    run_info = {"fingerprint": run_fingerprint(cfg, plan), "name": cfg.name, "categories": categories,
                "base": plan.base, "novel": plan.novel, "prompts": len(plan), "shard_size": size}
    if plan.extra:
        run_info["extra"] = plan.extra
    if plan.summary:
        run_info["plan"] = plan.summary
    owners = shard_owners(cfg, n_shards)  # each shard's generator; None with one model
    if owners is not None:
        planned = planned_images(owners, len(plan), size, len(cfg.models))
        run_info["generators"] = [{"source": g.source, "share": g.share, "shards": owners.count(k),
                                   "images": planned[k]} for k, g in enumerate(cfg.models)]
    store = ShardStore(cfg.output.path)
    store.check_same_run(run_info)
    done = store.finished()
    for shard, why in store.damaged.items():
        print(f"[generate] {shard} is damaged ({why}): it is redone", file=sys.stderr, flush=True)
    todo = sorted(set(range(n_shards)) - set(done))
    written: dict[int, dict] = {}
    if todo:
        # Everything a user can get wrong is checked before the first byte is written.
        check_labeller(cfg.annotation)
        if cfg.filter.enabled:
            check_clip_folder(cfg.filter.model)
        check_generators(cfg, layout=_layouts(plan), inpaint=_layouts(plan) and cfg.layout.mode == "inpainting")
        connect(cfg.ray)
        resources, nodes = cluster_state()
        synth, annot = plan_pools(resources, nodes, cfg.synthesis.num_actors, cfg.synthesis.gpus_per_actor,
                                  cfg.annotation.num_actors, cfg.annotation.gpus_per_actor,
                                  cfg.ray.allow_autoscale)
        if cfg.filter.enabled:
            synth, filt = plan_filter_pool(cfg.filter, synth, annot)
        # The language model is needed (and probed) only for shards whose expansions are not cached.
        expand = (cfg.prompts.expand.enabled and not _layouts(plan)
                  and bool(uncached(cfg.prompts.expand, cfg.output.path, plan, size, todo)))
        _probe_models(cfg, categories, synth, _layouts(plan), expand)
        claim = store.prepare(run_info)
        store.remove_temporaries()
        quiet_data_context()
        if owners is None:
            ds = _synthesis(ray, cfg, plan, size, todo, cfg.model, synth, annot)
        else:
            # A pool per generator, its actors its share of synth's. The split is the config's,
            # whatever is left to draw (a generator done already gets no pool), so that a resumed
            # shard is drawn by actors of the same size (torch threads) as in the first attempt.
            pools = split_pool(synth, [g.share for g in cfg.models])
            branches = [_synthesis(ray, cfg, plan, size, [i for i in todo if owners[i] == g], cfg.models[g],
                                   pools[g], annot, generator=g)
                        for g in sorted({owners[i] for i in todo})]
            ds = branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]
        ds = ds.map(Annotator, fn_constructor_args=(cfg.annotation, categories, threads_for(annot.num_cpus)),
                    compute=ray.data.ActorPoolStrategy(size=annot.size), **annot.remote_args())
        if cfg.filter.enabled:  # before the masks: a refused box is never segmented
            ds = ds.map(QualityFilter, fn_constructor_args=(cfg.filter, threads_for(filt.num_cpus)),
                        compute=ray.data.ActorPoolStrategy(size=filt.size), **filt.remote_args())
        if cfg.masks.enabled:
            masks = plan_mask_pool(cfg.masks, annot)
            ds = ds.map(Masker, fn_constructor_args=(cfg.masks, threads_for(masks.num_cpus)),
                        compute=ray.data.ActorPoolStrategy(size=masks.size), **masks.remote_args())
        # A writer per four synthesis actors: a shard's write takes a small part of its drawing.
        ds = ds.map(ShardWriter, fn_constructor_args=(cfg.output.path, claim), num_cpus=0.25,
                    compute=ray.data.ActorPoolStrategy(size=max(1, synth.size // 4)))
        progress = Progress(sum(min(size, len(plan) - i * size) for i in todo), len(todo))
        failed_writes = []
        try:
            for row in ds.iter_rows():
                if row["error"]:
                    failed_writes.append(row["error"])
                    continue
                entry = json.loads(row["entry"])
                written[entry["index"]] = entry
                progress.update(images=entry["samples"] + len(entry["dropped"]) + len(entry.get("refused_keys", ())),
                                shards=1)
        except Exception as e:
            store.discard_unclaimed()
            raise_as_one_line(e)
        if failed_writes:
            store.discard_unclaimed()
            more = f" ({len(failed_writes) - 1} more shards failed to write)" if len(failed_writes) > 1 else ""
            raise ShardError(failed_writes[0] + more)
        missing = sorted(set(todo) - set(written))
        if missing:  # cannot happen unless Ray Data lost a row: never report such a run as whole
            raise RuntimeError(f"generation ended with shards {missing[:5]} unwritten; rerun the same command "
                               f"to finish them")
    entries = {**done, **written}
    per_generator = None
    if owners is not None:
        per_generator = [0] * len(cfg.models)
        for e in entries.values():
            per_generator[owners[e["index"]]] += e["samples"]
    return Summary(images=sum(e["samples"] for e in entries.values()),
                   boxes=sum(e["boxes"] for e in entries.values()), shards=len(entries),
                   shards_written=len(written), dropped=sum(len(e["dropped"]) for e in entries.values()),
                   wall_s=time.time() - start, output=cfg.output.path,
                   refused=sum(len(e.get("refused_keys", ())) for e in entries.values()),
                   per_generator=per_generator)


def _synthesis(ray, cfg: Config, plan, size: int, shards: list[int], model, synth, annot,
               generator: Optional[int] = None):
    """The rows of `shards` drawn by `model` in a synthesis actor pool of its own (after a caption
    pool of their own for captioned layouts); `generator`: its index in `models`, which the rows
    then carry to the sample records and the manifest."""
    ds = ray.data.from_items([{"shard": i} for i in shards], override_num_blocks=len(shards))
    if _layouts(plan) and cfg.layout.captioner:  # BLIP-2 captions as the layouts' prompts
        synth, capt = caption_pool(synth, annot)
        ds = ds.map(Captioner, fn_constructor_args=(cfg.layout, plan, size, threads_for(capt.num_cpus)),
                    compute=ray.data.ActorPoolStrategy(size=capt.size), **capt.remote_args())
    return ds.map(Synthesizer, fn_constructor_args=(model, cfg.synthesis, plan, size, threads_for(synth.num_cpus),
                                                    cfg.prompts.expand, cfg.output.path, generator),
                  compute=ray.data.ActorPoolStrategy(size=synth.size), **synth.remote_args())


def _load_models(cfg: Config, categories: list[str], layout: bool = False, expand: bool = False) -> None:
    for model in generators(cfg):  # one after the other: only one is held at a time
        load_pipeline(model, layout=layout, inpaint=layout and cfg.layout.mode == "inpainting")
    if expand:
        load_language_model(cfg.prompts.expand.model)
    if layout and cfg.layout.captioner:
        load_captioner(cfg.layout.captioner)
    build_labeller(cfg.annotation, categories)
    if cfg.masks.enabled:
        build_segmenter(cfg.masks.model, cfg.masks.seed)
    if cfg.filter.enabled:
        build_clip(cfg.filter.model, cfg.filter.seed)


def _probe_models(cfg: Config, categories: list[str], synth, layout: bool = False, expand: bool = False) -> None:
    """Load the generator and the labeller once, in one task with a synthesis actor's resources,
    before anything is written: a model that cannot load (a damaged folder or checkpoint, a
    checkpoint refused for its pickles) is then one line, not a pool of dying actors."""
    import ray
    try:
        ray.get(ray.remote(_load_models).options(max_retries=0, **synth.remote_args()).remote(cfg, categories, layout, expand))
    except Exception as e:
        raise_as_one_line(e)
