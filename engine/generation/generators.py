"""Several generators in one build (`models:` in the config; DiverGen's generative model diversity).

Whole shards are assigned to generators, so that a shard is drawn by one generator and flows
through the pipeline as one row, as with a single model: generator g gets its share of the shards
(largest remainder), and which shards a shuffle seeded by prompts.seed decides (a hash, not a
random generator, so no library upgrade can change it). The assignment is a pure function of the
config and the number of shards, both in the run's fingerprint: a rerun assigns every missing
shard to the generator it had. Each generator draws in its own synthesis actor pool
(`split_pool`); the pools' rows meet again before annotation.

A build with `model:` (one generator) is what it always was: no generator in its records, its
manifest or its fingerprint.
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional

from engine.config import Config, ConfigError, ModelConfig
from engine.runtime.cluster import PoolPlan


def generators(cfg: Config) -> list[ModelConfig]:
    """The generators of a build: `models`, or the one `model`."""
    return list(cfg.models) if cfg.models is not None else [cfg.model]


def single_model(cfg: Config, job: str) -> ModelConfig:
    """`model` for a job that uses one generator (fine-tuning, the grounding head, the recipe)."""
    if cfg.models is not None:
        raise ConfigError(f"{job} uses one generator (model:), and this config lists {len(cfg.models)} under "
                          f"models:; give the generator to use as model: (models: is for instagen generate)")
    return cfg.model


def largest_remainder(total: int, shares: list[float]) -> list[int]:
    """`total` split in proportion to `shares` (summing to 1) into whole numbers summing to `total`:
    each gets the floor of its quota, and the units left go to the largest remainders (the
    earlier generator on a tie)."""
    whole = sum(shares)  # 1 to within SHARE_TOLERANCE: normalised, so the quotas never sum above total
    quotas = [total * s / whole for s in shares]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(shares)), key=lambda g: (-(quotas[g] - counts[g]), g))
    for g in order[:max(0, total - sum(counts))]:
        counts[g] += 1
    return counts


def assign_shards(n_shards: int, shares: list[float], seed: int) -> list[int]:
    """The generator of each shard: generator g draws `largest_remainder(n_shards, shares)[g]` of
    them, which ones a hash of (seed, shard) decides, so the generators are spread over the
    categories rather than each drawing a run of them."""
    order = sorted(range(n_shards), key=lambda i: hashlib.sha256(f"generators:{seed}:{i}".encode()).digest())
    owner = [0] * n_shards
    start = 0
    for g, n in enumerate(largest_remainder(n_shards, shares)):
        for i in order[start:start + n]:
            owner[i] = g
        start += n
    return owner


def shard_owners(cfg: Config, n_shards: int) -> Optional[list[int]]:
    """Each shard's generator, or None for a build with one `model`."""
    if cfg.models is None:
        return None
    return assign_shards(n_shards, [g.share for g in cfg.models], cfg.prompts.seed)


def split_pool(pool: PoolPlan, shares: list[float]) -> list[PoolPlan]:
    """A synthesis pool divided among generators: its actors in proportion to the shares (largest
    remainder), at least one each. Where that makes more actors than the pool had, each actor's
    CPUs and GPUs shrink by the same factor, so that together they never ask for more than the one
    pool would have (on CPUs, Ray actors that ask for more than exists wait forever)."""
    total = max(pool.size, len(shares))
    sizes = largest_remainder(total, shares)
    while 0 in sizes:  # a small share rounded to no actor: one from the largest pool
        sizes[sizes.index(max(sizes))] -= 1
        sizes[sizes.index(0)] = 1
    scale = pool.size / total
    return [PoolPlan(n, pool.num_cpus * scale, pool.num_gpus * scale) for n in sizes]


def planned_images(owners: list[int], n_rows: int, shard_size: int, n_generators: int) -> list[int]:
    """Prompt rows per generator under an assignment (the last shard may be short)."""
    images = [0] * n_generators
    for i, g in enumerate(owners):
        images[g] += min(shard_size, n_rows - i * shard_size)
    return images


def check_generators(cfg: Config, layout: bool = False, inpaint: bool = False) -> None:
    """Each generator's source, checked on the driver before Ray starts (engine.models.diffusion);
    a bad entry of `models` is named by its index."""
    from engine.models.diffusion import ModelLoadError, check_source
    if cfg.models is None:
        check_source(cfg.model, layout=layout, inpaint=inpaint)
        return
    for i, g in enumerate(cfg.models):
        try:
            check_source(g, layout=layout, inpaint=inpaint)
        except ModelLoadError as e:
            raise ModelLoadError(str(e).replace("model.source", f"models[{i}].source")
                                 .replace("model.config_source", f"models[{i}].config_source")) from None
