"""The main job: prompts -> synthesis actors -> annotation actors -> WebDataset shards.

Work is planned in shards: shard i holds prompt rows [i*shard_size, (i+1)*shard_size). Only
shards missing from the manifest are generated, so rerunning the same command after an
interruption finishes the dataset without duplicating or losing a sample. Rows stream back to
the driver in order (Ray Data `preserve_order`), so the driver holds at most a shard or two of
samples whatever the dataset size, and writes each shard as soon as its last row arrives.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

from engine.config import Config, fingerprint
from engine.data.shards import ShardStore
from engine.generation.annotation import Annotator, build_labeller, check_labeller
from engine.generation.prompts import PromptSpec, make_prompts
from engine.generation.synthesis import Synthesizer
from engine.models.diffusion import load_pipeline
from engine.runtime.cluster import (
    cluster_state,
    connect,
    plan_pools,
    threads_for,
    user_error_in,
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

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else 0.0

    def line(self) -> str:
        return (f"{self.images} images, {self.boxes} boxes, {self.shards} shards "
                f"({self.shards_written} written now), {self.dropped} dropped, "
                f"{self.wall_s:.1f} s, {self.images_per_s:.2f} images/s -> {self.output}")


def run_fingerprint(cfg: Config) -> str:
    """What decides the samples: a resumed run must agree on all of it."""
    return fingerprint({"model": asdict(cfg.model), "prompts": asdict(cfg.prompts),
                        "synthesis": {k: v for k, v in asdict(cfg.synthesis).items()
                                      if k not in ("batch_size", "num_actors", "gpus_per_actor")},
                        "annotation": {"labeller": cfg.annotation.labeller, "model": cfg.annotation.model,
                                       "alpha": cfg.annotation.alpha, "beta": cfg.annotation.beta},
                        "shard_size": cfg.output.shard_size})


def all_categories(cfg: Config) -> list[str]:
    p = cfg.prompts
    return list(dict.fromkeys(list(p.base) + list(p.novel) + list(p.categories)))


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
    rows = make_prompts(cfg.prompts)
    categories = all_categories(cfg)
    size = cfg.output.shard_size
    n_shards = (len(rows) + size - 1) // size
    run_info = {"fingerprint": run_fingerprint(cfg), "name": cfg.name, "categories": categories,
                "base": cfg.prompts.base, "novel": cfg.prompts.novel, "prompts": len(rows), "shard_size": size}
    store = ShardStore(cfg.output.path)
    store.check_same_run(run_info)
    done = store.finished()
    for shard, why in store.damaged.items():
        print(f"[generate] {shard} is damaged ({why}): it is redone", file=sys.stderr, flush=True)
    todo = set(range(n_shards)) - set(done)
    todo_rows = [r for r in rows if r.id // size in todo]
    written: dict[int, dict] = {}
    if todo_rows:
        # Everything a user can get wrong is checked before the first byte is written.
        check_labeller(cfg.annotation)
        connect(cfg.ray)
        resources, nodes = cluster_state()
        synth, annot = plan_pools(resources, nodes, cfg.synthesis.num_actors, cfg.synthesis.gpus_per_actor,
                                  cfg.annotation.num_actors, cfg.annotation.gpus_per_actor,
                                  cfg.ray.allow_autoscale)
        _probe_models(cfg, categories, synth)
        store.prepare(run_info)
        store.remove_temporaries()
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        ds = ray.data.from_items([r.to_row() for r in todo_rows],
                                 override_num_blocks=max(1, len(todo_rows) // cfg.synthesis.batch_size))
        ds = ds.map_batches(
            Synthesizer, fn_constructor_args=(cfg.model, cfg.synthesis, threads_for(synth.num_cpus)),
            batch_size=cfg.synthesis.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=synth.size), **synth.remote_args())
        ds = ds.map_batches(
            Annotator, fn_constructor_args=(cfg.annotation, categories, threads_for(annot.num_cpus)),
            batch_size=cfg.annotation.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=annot.size), **annot.remote_args())
        try:
            written = _write_shards(ds, store, sorted(todo), todo_rows, size)
        except Exception as e:
            store.discard_unclaimed()
            user = user_error_in(e)
            if user is None:
                raise
            raise type(user)(str(user).splitlines()[0]) from None
    entries = {**done, **written}
    return Summary(images=sum(e["samples"] for e in entries.values()),
                   boxes=sum(e["boxes"] for e in entries.values()), shards=len(entries),
                   shards_written=len(written), dropped=sum(len(e["dropped"]) for e in entries.values()),
                   wall_s=time.time() - start, output=cfg.output.path)


def _load_models(cfg: Config, categories: list[str]) -> None:
    load_pipeline(cfg.model)
    build_labeller(cfg.annotation, categories)


def _probe_models(cfg: Config, categories: list[str], synth) -> None:
    """Load the generator and the labeller once, in one task with a synthesis actor's resources,
    before anything is written: a model that cannot load (a damaged folder or checkpoint, a
    checkpoint refused for its pickles) is then one line, not a pool of dying actors."""
    import ray
    try:
        ray.get(ray.remote(_load_models).options(max_retries=0, **synth.remote_args()).remote(cfg, categories))
    except Exception as e:
        user = user_error_in(e)
        if user is None:
            raise
        raise type(user)(str(user).splitlines()[0]) from None


def _write_shards(ds, store, todo: list[int], rows: list[PromptSpec], size: int) -> dict[int, dict]:
    expected = Counter(r.id // size for r in rows)
    pending: dict[int, list[dict]] = {i: [] for i in todo}
    dropped: dict[int, list[int]] = {i: [] for i in todo}
    written = {}
    progress = Progress(len(rows), len(todo))
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for j in range(len(batch["id"])):
            pid = int(batch["id"][j])
            index = pid // size
            if batch["status"][j] == "ok":
                sample = {"__key__": f"{pid:09d}", "jpg": batch["jpg"][j], "latent.npy": batch["latent"][j],
                          "json": batch["json"][j]}
                if "features" in batch:
                    sample["features.npz"] = batch["features"][j]
                pending[index].append(sample)
            else:
                dropped[index].append(pid)
            if len(pending[index]) + len(dropped[index]) == expected[index]:
                entry = store.write_shard(index, sorted(pending.pop(index), key=lambda s: s["__key__"]),
                                          dropped.pop(index))
                written[index] = entry.as_dict()
                progress.update(images=len(entry.keys), shards=1)
    if pending:
        missing = sorted(pending)
        raise RuntimeError(f"generation ended with shards {missing[:5]} incomplete; rerun the same command "
                           f"to finish them")
    return written
