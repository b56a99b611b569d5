"""Several generators in one build (`models:`): the shard assignment, the pools, what each sample
and shard records, and resume."""
import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from engine.config import ConfigError, load_config
from engine.data.shards import iter_samples, shard_urls
from engine.generation.generators import assign_shards, largest_remainder, shard_owners, split_pool
from engine.generation.layouts import make_plan
from engine.generation.pipeline import generate, run_fingerprint
from engine.generation.synthesis import Synthesizer
from engine.runtime.cluster import PoolPlan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 base categories x 2 images = 8 prompts in 4 shards of 2: two tiny generators of different
# random weights, half the shards each.
SMALL = ["prompts.images_per_category=2", "synthesis.steps=3", "synthesis.batch_size=2",
         "output.shard_size=2", "annotation.batch_size=4"]
TWO = "models=[{source: tiny, share: 0.5}, {source: tiny, share: 0.5, tiny: {seed: 1}}]"


def config(path, *extra):
    return load_config(os.path.join(ROOT, "configs/tiny.yaml"), SMALL + [f"output.path={path}", *extra])


def test_largest_remainder_gives_exact_counts():
    assert largest_remainder(8, [0.5, 0.5]) == [4, 4]
    assert largest_remainder(4, [0.25, 0.75]) == [1, 3]
    assert largest_remainder(7, [1 / 3, 1 / 3, 1 / 3]) == [3, 2, 2]  # a tie goes to the earlier one
    assert largest_remainder(10, [0.15, 0.15, 0.7]) == [2, 1, 7]
    for n in (*range(0, 40), 10**6):
        assert sum(largest_remainder(n, [0.1, 0.2, 0.3, 0.4])) == n
        assert sum(largest_remainder(n, [0.5 + 5e-7, 0.5])) == n  # shares a hair above 1 in sum


def test_shard_assignment_is_the_configs_and_spread():
    owners = assign_shards(40, [0.25, 0.75], seed=0)
    assert owners == assign_shards(40, [0.25, 0.75], seed=0)  # the same config, the same assignment
    assert owners.count(0) == 10 and owners.count(1) == 30
    assert owners[:10] != [0] * 10 and owners != sorted(owners)  # not a run of categories each
    assert owners != assign_shards(40, [0.25, 0.75], seed=1)
    # Pinned: an upgrade of any library must never move a shard to another generator.
    assert assign_shards(10, [0.5, 0.5], seed=0) == [0, 1, 0, 0, 0, 1, 0, 1, 1, 1]
    one = load_config(os.path.join(ROOT, "configs/tiny.yaml"), SMALL)
    assert shard_owners(one, 4) is None


def test_actors_are_split_by_share_at_least_one_each():
    pools = split_pool(PoolPlan(8, 1.0, 1.0), [0.9, 0.05, 0.05])
    assert [p.size for p in pools] == [6, 1, 1] and all(p.num_gpus == 1.0 for p in pools)
    # More generators than actors: each gets one, and together they take what the one pool had.
    pools = split_pool(PoolPlan(1, 1.5, 0.0), [0.5, 0.5])
    assert [p.size for p in pools] == [1, 1] and sum(p.size * p.num_cpus for p in pools) == 1.5
    pools = split_pool(PoolPlan(2, 1.0, 1.0), [0.25, 0.25, 0.5])
    assert [p.size for p in pools] == [1, 1, 1] and sum(p.size * p.num_gpus for p in pools) == pytest.approx(2.0)


@pytest.mark.parametrize("models, words", [
    ("[{source: tiny, share: 0.5}, {source: tiny, share: 0.6}]", "sum to 1.1, not 1"),
    ("[{source: tiny, share: -0.5}, {source: tiny, share: 1.5}]", "models[0].share must be > 0"),
    ("[]", "empty list"),
])
def test_bad_shares_are_one_clear_error(models, words, tmp_path):
    with pytest.raises(ConfigError, match=words.replace("[", "\\[").replace("]", "\\]")):
        config(tmp_path, f"models={models}")


def test_the_list_is_in_the_fingerprint(tmp_path):
    one = config(tmp_path)
    two = config(tmp_path, TWO)
    other = config(tmp_path, "models=[{source: tiny, share: 0.25}, {source: tiny, share: 0.75, tiny: {seed: 1}}]")
    prints = {run_fingerprint(c, make_plan(c)) for c in (one, two, other)}
    assert len(prints) == 3


def test_dry_run_prints_each_generators_plan(tmp_path, capsys, monkeypatch):
    from engine.cli import main
    monkeypatch.chdir(ROOT)
    assert main(["generate", "--dry-run", "--config", "configs/tiny.yaml", *SMALL, f"output.path={tmp_path / 'o'}",
                 "models=[{source: tiny, share: 0.25}, {source: tiny, share: 0.75, tiny: {seed: 1}}]"]) == 0
    assert "generators: [0] tiny (share 0.25) 1 shards / 2 images, [1] tiny (share 0.75) 3 shards / 6 images" \
        in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def two(local_ray, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gens") / "run")
    cfg = config(out, TWO)
    return cfg, generate(cfg), out


def test_each_generator_draws_its_share_and_records_it(two):
    cfg, summary, out = two
    owners = shard_owners(cfg, 4)
    assert sorted(owners) == [0, 0, 1, 1]
    assert (summary.images, summary.shards, summary.per_generator) == (8, 4, [4, 4])
    assert "by generator 4 / 4" in summary.line()
    run = json.load(open(os.path.join(out, "run.json")))
    assert [(g["share"], g["shards"], g["images"]) for g in run["generators"]] == [(0.5, 2, 4), (0.5, 2, 4)]
    for i in range(4):
        entry = json.load(open(os.path.join(out, "manifest", f"shard-{i:06d}.json")))
        assert entry["generator"] == owners[i]
        samples = list(iter_samples(shard_urls(out, [i]), decode=False))
        assert [json.loads(s["json"])["generator"] for s in samples] == [owners[i]] * entry["samples"]


def test_the_generators_draw_differently(two):
    """A stored image is what its own generator draws from its prompt row and seed, and far from
    what the other one draws (the tiny weights differ by their seed)."""
    cfg, _, out = two
    plan, owners = make_plan(cfg), shard_owners(cfg, 4)
    shard = owners.index(1)
    stored = [np.asarray(Image.open(io.BytesIO(s["jpg"])), dtype=np.float32)
              for s in iter_samples(shard_urls(out, [shard]), decode=False)]
    drawn = {}
    for g in (0, 1):
        row = Synthesizer(cfg.models[g], cfg.synthesis, plan, cfg.output.shard_size, threads=1)({"shard": shard})
        drawn[g] = [np.asarray(Image.open(io.BytesIO(j)), dtype=np.float32) for j in row["jpg"]]
    for image, own, other in zip(stored, drawn[1], drawn[0]):
        assert np.abs(image - own).mean() < 2.0 and np.abs(image - other).mean() > 10.0


def test_a_lost_shard_is_redrawn_by_its_generator_byte_for_byte(two):
    cfg, _, out = two
    owners = shard_owners(cfg, 4)
    lost = owners.index(1)
    tar = os.path.join(out, "shards", f"shard-{lost:06d}.tar")
    before = {i: hashlib.sha256(open(os.path.join(out, "shards", f"shard-{i:06d}.tar"), "rb").read()).hexdigest()
              for i in range(4)}
    mtimes = {i: os.stat(os.path.join(out, "shards", f"shard-{i:06d}.tar")).st_mtime_ns for i in range(4)}
    os.remove(tar)
    summary = generate(cfg)
    assert (summary.shards_written, summary.images, summary.per_generator) == (1, 8, [4, 4])
    after = {i: hashlib.sha256(open(os.path.join(out, "shards", f"shard-{i:06d}.tar"), "rb").read()).hexdigest()
             for i in range(4)}
    assert after == before
    assert [i for i in range(4) if os.stat(os.path.join(out, "shards", f"shard-{i:06d}.tar")).st_mtime_ns
            != mtimes[i]] == [lost]
