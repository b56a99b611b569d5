"""The main job end to end on a real local Ray: shards, resume, export, and the user's errors."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import ray
import webdataset as wds

from engine.config import load_config
from engine.generation.export import export
from engine.generation.pipeline import generate
from engine.generation.prompts import make_prompts
from engine.data.shards import ShardError, iter_samples, shard_urls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 base categories x 2 images = 8 prompts in shards of 3, 3 and 2.
SMALL = ["prompts.images_per_category=2", "synthesis.steps=3", "synthesis.batch_size=2",
         "output.shard_size=3", "annotation.batch_size=4"]


def small_config(path, *extra):
    return load_config(os.path.join(ROOT, "configs/tiny.yaml"), SMALL + [f"output.path={path}", *extra])


@pytest.fixture(scope="module")
def dataset(local_ray, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gen") / "run")
    cfg = small_config(out)
    summary = generate(cfg)
    return cfg, summary, out


def expected_keys(cfg):
    return {f"{r.id:09d}" for r in make_prompts(cfg.prompts)}


def test_generate_writes_whole_shards(dataset):
    cfg, summary, out = dataset
    assert (summary.images, summary.shards, summary.shards_written, summary.dropped) == (8, 3, 3, 0)
    assert sorted(os.listdir(os.path.join(out, "shards"))) == [f"shard-00000{i}.tar" for i in range(3)]
    # Read back with the webdataset library itself, as a user would.
    raw = list(wds.WebDataset(shard_urls(out), shardshuffle=False))
    keys = [s["__key__"] for s in raw]
    assert len(keys) == len(set(keys)) == 8 and set(keys) == expected_keys(cfg)
    rows = {f"{r.id:09d}": r for r in make_prompts(cfg.prompts)}
    for s in raw:
        assert set(k for k in s if not k.startswith("__")) == {"jpg", "latent.npy", "json"}
        meta = json.loads(s["json"])
        row = rows[s["__key__"]]
        assert (meta["prompt"], tuple(meta["categories"]), meta["seed"]) == (row.text, row.categories, row.seed)
        latent = np.load(io.BytesIO(s["latent.npy"]), allow_pickle=False)
        down = 2 ** (len(cfg.model.tiny.vae_block_out_channels) - 1)  # the VAE halves size per level
        assert latent.shape == (4, 64 // down, 64 // down) and latent.dtype == np.float32 and np.isfinite(latent).all()
        assert meta["box_format"].startswith("xyxy")
        for box, label, score in zip(meta["boxes"], meta["labels"], meta["scores"]):
            assert label in row.categories and score >= cfg.annotation.alpha
            assert 0 <= box[0] < box[2] <= 64 and 0 <= box[1] < box[3] <= 64
        assert set(meta["labellers"]) <= {"detector"}
        assert "generator" not in meta  # one `model`: records as they always were (tests/test_generators.py)
    assert not any("generator" in json.load(open(os.path.join(out, "manifest", f)))
                   for f in os.listdir(os.path.join(out, "manifest")))
    assert "generators" not in json.load(open(os.path.join(out, "run.json")))


def test_ray_data_reads_the_shards(dataset):
    cfg, _, out = dataset
    ds = ray.data.read_webdataset(shard_urls(out), decoder=None)
    keys = [r["__key__"] for r in ds.take_all()]
    assert sorted(keys) == sorted(expected_keys(cfg))


def test_export_loads_in_pycocotools(dataset):
    from pycocotools.coco import COCO
    cfg, summary, out = dataset
    result = export(out)
    coco = COCO(result["coco"])
    assert len(coco.getImgIds()) == 8
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == cfg.prompts.base + cfg.prompts.novel
    assert len(coco.getAnnIds()) == summary.boxes
    for img in coco.loadImgs(coco.getImgIds()):
        assert os.path.exists(os.path.join(out, img["file_name"]))
    from PIL import Image
    assert Image.open(result["preview"]).size[0] > 0
    lvis = json.load(open(result["lvis"]))
    assert all(c["frequency"] in "rcf" for c in lvis["categories"])


def test_export_is_the_shards_records_in_order_and_their_jpeg_bytes(dataset, tmp_path):
    """Shards are exported by parallel tasks; the result is what one reader going through the
    shards in order would write: annotation ids running on across shards, images as stored."""
    cfg, _, out = dataset
    images, annotations, labels = [], [], []
    cat_id = {name: i + 1 for i, name in enumerate(cfg.prompts.base + cfg.prompts.novel)}
    for sample in iter_samples(shard_urls(out), decode=False):
        meta = json.loads(sample["json"])
        images.append({"id": meta["id"], "file_name": f"images/{sample['__key__']}.jpg", "width": meta["width"],
                       "height": meta["height"], "prompt": meta["prompt"], "seed": meta["seed_used"],
                       "image_category_ids": sorted(cat_id[c] for c in set(meta["categories"]))})
        labels.append({"file_name": f"images/{sample['__key__']}.jpg", "categories": sorted(set(meta["categories"]))})
        for (x0, y0, x1, y1), label, score, who in zip(meta["boxes"], meta["labels"], meta["scores"],
                                                      meta["labellers"]):
            annotations.append({"id": len(annotations) + 1, "image_id": meta["id"], "category_id": cat_id[label],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                                "score": score, "labeller": who})
    dest = tmp_path / "exported"
    for _ in range(2):  # a second export replaces the first whole
        export(out, dest=str(dest))
    coco = json.load(open(dest / "coco.json"))
    assert coco["images"] == images and coco["annotations"] == annotations
    assert len({a["image_id"] // cfg.output.shard_size for a in annotations}) > 1, "boxes of one shard only"
    for sample in iter_samples(shard_urls(out), decode=False):
        assert (dest / "images" / f"{sample['__key__']}.jpg").read_bytes() == sample["jpg"]
    assert sorted(os.listdir(dest)) == ["coco.json", "image_labels.jsonl", "images", "lvis.json", "preview.png"]
    # Image-level labels (the prompted categories, boxed or not), also as one JSON line per image.
    assert [json.loads(line) for line in open(dest / "image_labels.jsonl")] == labels
    assert all(labels[k]["categories"] for k in range(len(labels)))
    lvis = json.load(open(dest / "lvis.json"))
    assert [a["id"] for a in lvis["annotations"]] == [a["id"] for a in annotations]
    for image, sample in zip(lvis["images"], iter_samples(shard_urls(out), decode=False)):
        meta = json.loads(sample["json"])  # prompted but never boxed: drawn, probably, and missed
        assert image["not_exhaustive_category_ids"] == sorted(
            cat_id[c] for c in set(meta["categories"]) - set(meta["labels"])) and image["neg_category_ids"] == []
    assert sum(c["instance_count"] for c in lvis["categories"]) == len(annotations)


def test_rerun_writes_only_missing_shards(dataset, tmp_path):
    cfg, _, out = dataset
    # Simulate an interruption: shard 1 never finished (no manifest entry), a stale temporary lies around.
    os.remove(os.path.join(out, "manifest", "shard-000001.json"))
    open(os.path.join(out, "shards", ".shard-000001.tar.tmp-dead"), "wb").write(b"partial")
    summary = generate(cfg)
    assert summary.shards_written == 1 and summary.images == 8
    assert not [f for f in os.listdir(os.path.join(out, "shards")) if ".tmp-" in f]
    keys = [s["__key__"] for s in iter_samples(shard_urls(out), decode=False)]
    assert len(keys) == len(set(keys)) and set(keys) == expected_keys(cfg)
    # Nothing left to do: a third run writes nothing.
    assert generate(cfg).shards_written == 0


def test_different_run_in_same_output_is_refused(dataset):
    cfg, _, out = dataset
    with pytest.raises(ShardError, match="different run"):
        generate(small_config(out, "synthesis.guidance=2.0"))


def test_driver_killed_mid_run_then_resumed(local_ray, tmp_path):
    out = str(tmp_path / "killed")
    # 24 prompts in 12 shards: long enough to be caught between its first and last shard.
    longer = [*SMALL, "prompts.images_per_category=6", "synthesis.steps=6", "output.shard_size=2"]
    args = [sys.executable, "-m", "engine.cli", "generate", "--no-export", "--config", "configs/tiny.yaml",
            *longer, f"output.path={out}"]
    proc = subprocess.Popen(args, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "RAY_ADDRESS": ""})
    manifest = os.path.join(out, "manifest")
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.isdir(manifest) and len(os.listdir(manifest)) >= 1:
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, without warning
        proc.wait()
    # Killed once its first shard was whole; how many more it finished first depends on timing, so
    # the resume is checked against what was there, whatever that was.
    finished = len(os.listdir(manifest))
    assert finished >= 1
    cfg = load_config(os.path.join(ROOT, "configs/tiny.yaml"), longer + [f"output.path={out}"])
    summary = generate(cfg)
    assert summary.shards_written == 12 - finished and summary.shards == 12
    keys = [s["__key__"] for s in iter_samples(shard_urls(out), decode=False)]
    assert len(keys) == len(set(keys)) and set(keys) == expected_keys(cfg)


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ShardError, match="not writable"):
        generate(small_config(str(blocker / "run")))


def test_model_that_fails_in_the_actors_leaves_nothing_and_the_fix_runs(local_ray, tmp_path):
    from engine.models.diffusion import ModelLoadError
    broken = tmp_path / "sd"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")  # passes the driver's look, fails to load
    out = tmp_path / "run"
    with pytest.raises(ModelLoadError, match="could not load the diffusers folder") as err:
        generate(small_config(str(out), f"model.source={broken}"))
    assert "\n" not in str(err.value) and not out.exists()
    summary = generate(small_config(str(out)))  # the corrected run is not refused as another run
    assert summary.shards_written == summary.shards > 0


def test_a_folder_of_other_files_is_not_written_into(local_ray, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ShardError, match="holds other files \\(notes.txt\\)"):
        generate(small_config(str(tmp_path)))
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_cli_errors_are_one_line(tmp_path):
    cases = [
        (["synthesis.stepz=3"], "unknown config key 'synthesis.stepz'"),
        (["prompts.base=[]"], "no categories"),
        (["model.source=/does/not/exist"], "does not exist"),
        (["model.source=CompVis/stable-diffusion-v1-4"], "model-hub id"),
        (["prompts.generate=list", "prompts.categories=[unicorn]"], "unknown category 'unicorn'"),
        (["annotation.labeller=oracle"], "annotation.labeller 'oracle' is unknown"),
    ]
    for overrides, message in cases:
        out = tmp_path / "never"
        proc = subprocess.run([sys.executable, "-m", "engine.cli", "generate", "--config", "configs/tiny.yaml",
                               f"output.path={out}", *overrides], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert not out.exists(), "a failed run must leave nothing behind"


def test_actor_pools_fit_the_cluster_or_fail_clearly():
    from engine.runtime.cluster import ResourceError, plan_pools
    node = lambda cpus, gpus=0: {"Alive": True, "Resources": {"CPU": cpus, "GPU": gpus}}  # noqa: E731
    # 2 CPUs, no GPU: never ask for more CPUs than exist (Ray would wait forever without an error).
    synth, annot = plan_pools({"CPU": 2}, [node(2)], 0, 1.0, 0, 0.5)
    assert synth.size * synth.num_cpus + annot.size * annot.num_cpus <= 2 - 0.5 and synth.num_gpus == 0
    # Two 8-GPU nodes: one synthesis actor per GPU at gpus_per_actor=1.
    synth, annot = plan_pools({"CPU": 64, "GPU": 16}, [node(32, 8), node(32, 8)], 0, 1.0, 0, 0.25)
    assert (synth.size, synth.num_gpus, annot.num_gpus) == (16, 1.0, 0.25)
    with pytest.raises(ResourceError, match="largest node has 8 GPUs"):
        plan_pools({"CPU": 64, "GPU": 16}, [node(32, 8), node(32, 8)], 0, 10.0, 0, 0.25)
    with pytest.raises(ResourceError, match="synthesis.num_actors"):
        plan_pools({"CPU": 2}, [node(2)], 8, 1.0, 0, 0.5)
