"""The CLIP quality filter: the scorer (tiny, and a folder saved by the test through the real loading
path), its verdicts, the manifest's counts, the readers that must skip a refused image (detector
pool, grounding rows, export, instance pool), the preview, and the stage in generate on a real
local Ray."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from engine.config import ConfigError, FilterConfig, PoolConfig, load_config
from engine.data.shards import ShardStore, iter_samples, shard_urls
from engine.generation.export import export, preview_tile
from engine.generation.filter import LOW_BOX_SCORE, LOW_IMAGE_SCORE, QualityFilter, apply
from engine.generation.pipeline import generate, run_fingerprint
from engine.generation.pool import PoolError, build_pool
from engine.generation.prompts import PromptPlan
from engine.models.clip import ClipError, build_clip, tiny_clip
from engine.training.detection import DetectionDataError, synthetic_pool
from engine.training.grounding import read_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs/tiny.yaml")
# 4 base categories x 2 images in shards of 4; up to two boxes per category, so there are boxes.
SMALL = ["prompts.images_per_category=2", "synthesis.steps=2", "synthesis.batch_size=4", "output.shard_size=4",
         "annotation.alpha=0.0", "annotation.max_per_category=2", "filter.enabled=true", "filter.seed=3"]
NOTHING = ["filter.min_image_score=-1", "filter.min_box_score=-1"]


def save_tiny_clip(folder) -> str:
    model, processor = tiny_clip(seed=3)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def record(boxes, labels, categories, **more):
    return {"id": 7, "prompt": "p", "categories": categories, "width": 64, "height": 64, "boxes": boxes,
            "labels": labels, "scores": [0.5] * len(boxes), "labellers": ["detector"] * len(boxes), **more}


# -- the scorer ------------------------------------------------------------------------------------

def test_a_saved_clip_folder_scores_as_the_model_it_was_saved_from(clip_folder):
    images = [Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (20, 90), (10, 200, 30))]
    from_folder = build_clip(clip_folder, device="cpu").scores(images, ["dog", "red car"])
    same = build_clip("tiny", seed=3, device="cpu").scores(images, ["dog", "red car"])
    other = build_clip("tiny", seed=4, device="cpu").scores(images, ["dog", "red car"])
    assert from_folder.shape == (2, 2) and (from_folder.abs() <= 1 + 1e-6).all()  # cosines
    assert np.allclose(from_folder, same, atol=1e-5) and not np.allclose(from_folder, other, atol=1e-3)


def test_a_folder_that_is_no_clip_is_one_line(tmp_path, clip_folder):
    (tmp_path / "empty").mkdir()
    (tmp_path / "sam").mkdir()
    (tmp_path / "sam" / "config.json").write_text(json.dumps({"model_type": "sam"}))
    shutil.copytree(clip_folder, tmp_path / "noweights")
    os.remove(tmp_path / "noweights" / "model.safetensors")
    for folder, why in (("empty", "no config.json"), ("sam", "holds a sam, not a CLIP model"),
                        ("noweights", "could not load the CLIP")):
        with pytest.raises(ClipError, match=why) as e:
            build_clip(str(tmp_path / folder))
        assert "\n" not in str(e.value) and str(tmp_path / folder) in str(e.value)


def test_a_bad_clip_folder_stops_generate_before_anything_is_written(tmp_path):
    (tmp_path / "sam").mkdir()
    (tmp_path / "sam" / "config.json").write_text(json.dumps({"model_type": "sam"}))
    out = tmp_path / "out"
    cfg = load_config(TINY, SMALL + [f"filter.model={tmp_path / 'sam'}", f"output.path={out}"])
    with pytest.raises(ClipError, match="not a CLIP model.*CLIPModel.save_pretrained") as e:
        generate(cfg)
    assert "\n" not in str(e.value) and not out.exists()


def test_filter_settings_are_checked():
    for bad in ("filter.min_image_score=1.5", "filter.min_box_score=-2", "filter.num_actors=-1",
                "filter.model=s3://b/clip"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].split(".")[1]) as e:
            load_config(TINY, [bad])
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="pool.min_clip"):
        PoolConfig(min_clip=2).validate()


# -- the verdicts ----------------------------------------------------------------------------------

def test_boxes_under_the_threshold_are_listed_refused_with_their_reason():
    meta = record([[0, 0, 8, 8], [4, 4, 20, 20], [1, 1, 2, 2]], ["dog", "cat", "dog"], ["dog", "cat"],
                  refused=[{"bbox": [0, 0, 1, 1], "category": "dog", "reason": "no detection of its category",
                            "iou": 0.0}])
    out = apply(meta, {"dog": 0.3, "cat": 0.25}, [0.3, 0.1, 0.2], FilterConfig(min_image_score=0.2, min_box_score=0.2))
    assert out["boxes"] == [[0, 0, 8, 8], [1, 1, 2, 2]] and out["labels"] == ["dog", "dog"]
    assert out["clip_scores"] == [0.3, 0.2] and len(out["scores"]) == len(out["labellers"]) == 2
    assert out["clip_image"] == {"dog": 0.3, "cat": 0.25} and "refused_image" not in out
    # the layout verification's refusal is kept, the filter's added with its scores
    assert out["refused"][0]["reason"] == "no detection of its category"
    assert out["refused"][1] == {"bbox": [4, 4, 20, 20], "category": "cat", "score": 0.5, "labeller": "detector",
                                 "reason": LOW_BOX_SCORE, "clip": 0.1}
    # the image's worst prompted category decides
    worst = apply(meta, {"dog": 0.3, "cat": 0.19}, [0.3, 0.1, 0.2], FilterConfig(min_image_score=0.2))
    assert worst["refused_image"] == {"reason": LOW_IMAGE_SCORE, "category": "cat", "clip": 0.19}
    everything = apply(meta, {"dog": 0.3, "cat": 0.25}, [0.3, 0.1, 0.2], FilterConfig(min_image_score=1, min_box_score=1))
    assert everything["boxes"] == [] and len(everything["refused"]) == 4 and "refused_image" in everything
    nothing = apply(meta, {"dog": -0.9, "cat": -1.0}, [-1.0, -0.5, 0], FilterConfig(min_image_score=-1, min_box_score=-1))
    assert nothing["boxes"] == meta["boxes"] and nothing["refused"] == meta["refused"] and "refused_image" not in nothing


def test_the_actor_scores_each_prompted_category_and_each_box_crop():
    import io
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    jpg = io.BytesIO()
    image.save(jpg, format="JPEG")
    meta = record([[0, 0, 30, 30], [20.5, 10.2, 60, 33]], ["dog", "cat"], ["dog", "cat", "car"])
    stage = QualityFilter(FilterConfig(seed=3, min_image_score=-1, min_box_score=-1))
    out = stage({"json": [json.dumps(meta), ""], "jpg": [jpg.getvalue(), b""]})
    assert out["json"][1] == ""  # a dropped sample stays dropped
    got = json.loads(out["json"][0])
    stored = Image.open(io.BytesIO(jpg.getvalue())).convert("RGB")
    sims = build_clip("tiny", seed=3, device="cpu").scores(
        [stored, stored.crop((0, 0, 30, 30)), stored.crop((20, 10, 60, 33))], ["dog", "cat", "car"])
    assert got["clip_image"] == pytest.approx({"dog": float(sims[0, 0]), "cat": float(sims[0, 1]),
                                               "car": float(sims[0, 2])}, abs=1e-4)
    assert got["clip_scores"] == pytest.approx([float(sims[1, 0]), float(sims[2, 1])], abs=1e-4)


# -- the manifest and the readers, without Ray -----------------------------------------------------

def write_filtered(tmp_path, verdicts: list[bool]) -> str:
    """An output of one shard whose samples the filter refused where verdicts says False."""
    out = str(tmp_path / "out")
    store = ShardStore(out)
    claim = store.prepare({"fingerprint": "x", "categories": ["dog", "cat"]})
    samples = []
    for k, ok in enumerate(verdicts):
        meta = apply(record([[0, 0, 8, 8], [2, 2, 9, 9]], ["dog", "cat"], ["dog"], id=k),
                     {"dog": 0.3 if ok else 0.1}, [0.3, 0.1], FilterConfig())
        samples.append({"__key__": f"{k:09d}", "jpg": b"", "json": json.dumps(meta)})
    store.write_shard(0, samples, [], claim)
    return out


def test_the_manifest_counts_per_reason_and_lists_refused_images_apart(tmp_path):
    out = write_filtered(tmp_path, [True, False, True])
    entry = ShardStore(out).finished()[0]
    assert entry["keys"] == ["000000000", "000000002"] and entry["refused_keys"] == ["000000001"]
    assert entry["samples"] == 2 and entry["boxes"] == 2  # the usable images' kept boxes
    assert entry["filter"] == {"images": {"kept": 2, LOW_IMAGE_SCORE: 1}, "boxes": {"kept": 3, LOW_BOX_SCORE: 3}}
    assert entry["refused"] == {LOW_BOX_SCORE: 3}


def test_the_detector_pool_never_uses_a_refused_image(tmp_path):
    out = write_filtered(tmp_path, [True, False, True])
    for complete_only in (False, True):  # from the manifest's keys, and from the records
        pool = synthetic_pool([out], ["dog", "cat"], complete_only=complete_only)
        assert sorted(key for _, key in pool.samples) == ["000000000", "000000002"]
    everything = write_filtered(tmp_path / "all", [False, False])
    with pytest.raises(DetectionDataError, match="hold no usable samples"):
        synthetic_pool([everything], ["dog", "cat"])


def test_the_preview_marks_refused_images_and_boxes():
    meta = apply(record([[0, 0, 8, 8], [2, 2, 9, 9]], ["dog", "cat"], ["dog"]), {"dog": 0.12}, [0.3, 0.1],
                 FilterConfig())
    tile = preview_tile(Image.new("RGB", (64, 64)), meta, set())
    labels = [label for _, label, _ in tile.boxes]
    assert labels == ["dog 0.50", "cat refused clip 0.10", "refused image"]
    assert tile.boxes[-1][0] == [0, 0, 64, 64] and tile.caption[-1] == "refused: clip 0.12 (dog)"
    kept = preview_tile(Image.new("RGB", (64, 64)), {k: v for k, v in meta.items() if k != "refused_image"}, set())
    assert "refused image" not in [label for _, label, _ in kept.boxes]


def pool_source(tmp_path, scored: bool = True) -> str:
    """A masked output of one shard: a usable image with three boxes of CLIP scores 0.1, 0.3 and
    0.5 (masks filling their boxes), and an image the filter refused, with the same boxes."""
    import io
    from engine.data import masks as rle
    jpg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpg, format="JPEG")
    boxes = [[0, 0, 16, 16], [16, 16, 40, 40], [40, 40, 64, 64]]
    out = str(tmp_path / ("scored" if scored else "unscored"))
    store = ShardStore(out)
    claim = store.prepare({"fingerprint": "src", "categories": ["dog"]})
    samples = []
    for k, image_score in enumerate((0.3, 0.1)):
        meta = record(boxes, ["dog"] * 3, ["dog"], id=k)
        if scored:
            meta = apply(meta, {"dog": image_score}, [0.1, 0.3, 0.5], FilterConfig(min_box_score=-1))
        full = [np.zeros((64, 64), bool) for _ in boxes]
        for mask, (x0, y0, x1, y1) in zip(full, boxes):
            mask[y0:y1, x0:x1] = True
        meta.update(masks=[rle.encode(m) for m in full], mask_scores=[0.9] * 3, mask_fill=[1.0] * 3,
                    mask_status=["ok"] * 3, mask_prompt="box")
        samples.append({"__key__": f"{k:09d}", "jpg": jpg.getvalue(), "json": json.dumps(meta)})
    store.write_shard(0, samples, [], claim)
    return out


def test_the_instance_pool_filters_on_clip_scores_and_skips_refused_images(tmp_path):
    from dataclasses import asdict
    from engine.generation.pool import pool_shard
    source = pool_source(tmp_path)
    dest = str(tmp_path / "pool")
    cfg = PoolConfig(min_fill=0.0, min_area=1, min_clip=0.25)
    claim = ShardStore(dest).prepare({"fingerprint": "pool"})
    entry = ShardStore(source).finished()[0]
    written = json.loads(pool_shard({"entry": json.dumps(entry)}, source, dest, asdict(cfg), claim)["entry"])
    assert written["keys"] == ["000000000-001", "000000000-002"]  # 0.3 and 0.5 pass, 0.1 does not
    assert written["rejected"]["clip"] == 1 and written["rejected"]["refused_image"] == 3
    assert [s["json"]["clip_score"] for s in iter_samples(shard_urls(dest))] == [0.3, 0.5]


def test_a_pool_min_clip_on_an_output_without_scores_is_one_line(tmp_path):
    source = pool_source(tmp_path, scored=False)
    with pytest.raises(PoolError, match="min_clip.*filter.enabled=true") as e:
        build_pool(source, str(tmp_path / "p"), PoolConfig(min_clip=0.1))
    assert "\n" not in str(e.value) and not (tmp_path / "p").exists()


# -- the stage in generate, on Ray -----------------------------------------------------------------

@pytest.fixture(scope="module")
def unfiltered(local_ray, tmp_path_factory):
    """Scored, nothing refused: the scores every later verdict can be predicted from."""
    out = str(tmp_path_factory.mktemp("gen") / "all")
    cfg = load_config(TINY, SMALL + NOTHING + [f"output.path={out}"])
    return cfg, generate(cfg), out


@pytest.fixture(scope="module")
def filtered(unfiltered, tmp_path_factory, clip_folder):
    """The same samples, filtered at the middle of their scores by the same CLIP loaded from a
    folder, with masks for the instance pool."""
    _, _, source = unfiltered
    records = [s["json"] for s in iter_samples(shard_urls(source))]
    image = sorted(min(r["clip_image"].values()) for r in records)
    boxes = sorted(s for r in records for s in r["clip_scores"])
    thresholds = image[len(image) // 2], boxes[len(boxes) // 2]
    out = str(tmp_path_factory.mktemp("gen") / "filtered")
    cfg = load_config(TINY, SMALL + [f"filter.model={clip_folder}", f"filter.min_image_score={thresholds[0]}",
                                     f"filter.min_box_score={thresholds[1]}", "masks.enabled=true",
                                     f"output.path={out}"])
    return cfg, generate(cfg), out, {r["id"]: r for r in records}


def test_every_prompted_category_and_box_is_scored_and_nothing_refused_at_minus_one(unfiltered):
    cfg, summary, out = unfiltered
    assert summary.images == 8 and summary.refused == 0 and summary.boxes > 0
    records = [s["json"] for s in iter_samples(shard_urls(out))]
    assert len(records) == 8
    for r in records:
        assert set(r["clip_image"]) == set(r["categories"]) and len(r["clip_scores"]) == len(r["boxes"])
        assert all(-1 <= s <= 1 for s in [*r["clip_image"].values(), *r["clip_scores"]])
        assert "refused" not in r and "refused_image" not in r
    entries = ShardStore(out).finished().values()
    assert sum(e["filter"]["images"]["kept"] for e in entries) == 8
    assert sum(e["filter"]["boxes"]["kept"] for e in entries) == summary.boxes
    assert all(e["refused_keys"] == [] and set(e["filter"]["images"]) == {"kept"} for e in entries)


def test_verdicts_at_a_threshold_follow_the_scores_and_are_counted(filtered):
    cfg, summary, out, before = filtered
    records = {s["json"]["id"]: s["json"] for s in iter_samples(shard_urls(out))}
    assert set(records) == set(before)  # every image is written, refused or not
    refused_images = {i for i, r in before.items() if min(r["clip_image"].values()) < cfg.filter.min_image_score}
    assert 0 < len(refused_images) < len(before) and summary.refused == len(refused_images)
    refused_boxes = 0
    for i, r in records.items():
        assert ("refused_image" in r) == (i in refused_images)
        assert r["clip_image"] == before[i]["clip_image"]  # the folder's CLIP is the tiny one it was saved from
        kept = [j for j, s in enumerate(before[i]["clip_scores"]) if s >= cfg.filter.min_box_score]
        assert r["boxes"] == [before[i]["boxes"][j] for j in kept]
        assert len(r["masks"]) == len(r["boxes"])  # the mask stage saw only the kept boxes
        gone = [b for b in r.get("refused", []) if b["reason"] == LOW_BOX_SCORE]
        assert [b["bbox"] for b in gone] == [b for j, b in enumerate(before[i]["boxes"]) if j not in kept]
        assert all(b["clip"] < cfg.filter.min_box_score for b in gone)
        refused_boxes += len(gone)
    assert refused_boxes > 0
    entries = ShardStore(out).finished().values()
    assert sum(e["filter"]["images"].get(LOW_IMAGE_SCORE, 0) for e in entries) == len(refused_images)
    assert sum(e["filter"]["boxes"].get(LOW_BOX_SCORE, 0) for e in entries) == refused_boxes
    assert {int(k) for e in entries for k in e["refused_keys"]} == refused_images
    assert summary.images == len(before) - len(refused_images)
    assert summary.boxes == sum(len(r["boxes"]) for i, r in records.items() if i not in refused_images)


def test_trainers_and_export_skip_refused_images(filtered, tmp_path):
    cfg, summary, out, _ = filtered
    records = {s["json"]["id"]: s["json"] for s in iter_samples(shard_urls(out))}
    usable = {i for i, r in records.items() if "refused_image" not in r}
    pool = synthetic_pool([out], cfg.prompts.base + cfg.prompts.novel)
    assert {int(key) for _, key in pool.samples} == usable
    rows = read_rows(out, cfg.prompts.base, 0.0).take_all()
    assert {int(r["key"]) for r in rows} == usable
    result = export(out, dest=str(tmp_path / "export"), write_images=True)
    coco = json.loads(open(result["coco"]).read())
    assert {im["id"] for im in coco["images"]} == usable and result["images"] == len(usable)
    assert len(coco["annotations"]) == summary.boxes
    assert sorted(os.listdir(tmp_path / "export" / "images")) == sorted(f"{i:09d}.jpg" for i in usable)
    assert os.path.getsize(result["preview"]) > 0


def test_the_filter_is_part_of_the_run_fingerprint():
    off = load_config(TINY, SMALL[:-2])
    plan = PromptPlan(off.prompts)
    on = load_config(TINY, SMALL)
    stricter = load_config(TINY, SMALL + ["filter.min_box_score=0.3"])
    more_actors = load_config(TINY, SMALL + ["filter.num_actors=2"])
    prints = {run_fingerprint(c, plan) for c in (off, on, stricter)}
    assert len(prints) == 3 and run_fingerprint(more_actors, plan) == run_fingerprint(on, plan)
    # the filter off: its settings touch no sample, so outputs without it keep their fingerprints
    assert run_fingerprint(load_config(TINY, SMALL[:-2] + ["filter.min_box_score=0.5"]), plan) == \
        run_fingerprint(off, plan)
