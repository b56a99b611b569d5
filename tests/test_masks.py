"""Instance masks: RLE in and out of pycocotools, the tiny SAM, the mask stage of generate on a real
local Ray (shards read back by webdataset, the manifest's counts, COCO segmentation in the export)."""
import json
import os
import shutil
from collections import Counter
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from engine.config import ConfigError, CopyPasteConfig, MaskConfig, PoolConfig, load_config
from engine.data import masks as rle
from engine.data.shards import ShardError, ShardStore, iter_samples, samples_in_tar, shard_urls
from engine.generation.export import export
from engine.generation.masks import Masker, judge
from engine.generation.pipeline import generate
from engine.generation.pool import PoolError, build_pool
from engine.models.segmenter import SegmenterError, build_segmenter, tiny_sam
from engine.training.copy_paste import CopyPaste, CopyPasteError, Instance, PoolIndex, load_pool_index, paste
from engine.training.detection import Augmenter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 base categories x 2 images in shards of 4; up to two boxes per category, so there are boxes.
SMALL = ["prompts.images_per_category=2", "synthesis.steps=2", "synthesis.batch_size=4", "output.shard_size=4",
         "annotation.alpha=0.0", "annotation.max_per_category=2", "masks.enabled=true"]


def save_tiny_sam(folder) -> str:
    model, processor = tiny_sam(seed=3)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def sam_folder(tmp_path_factory):
    return save_tiny_sam(tmp_path_factory.mktemp("sam") / "sam")


@pytest.fixture(scope="module")
def masked(local_ray, tmp_path_factory, sam_folder):
    out = str(tmp_path_factory.mktemp("gen") / "run")
    cfg = load_config(os.path.join(ROOT, "configs/tiny.yaml"),
                      SMALL + [f"masks.model={sam_folder}", f"output.path={out}"])
    summary = generate(cfg)
    return cfg, summary, out


# -- RLE -------------------------------------------------------------------------------------------

def test_rle_round_trips_through_pycocotools():
    from pycocotools import mask as mask_utils
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        mask = rng.random((h, w)) < rng.random()
        encoded = rle.encode(mask)
        assert json.loads(json.dumps(encoded)) == encoded  # JSON-ready: text counts
        assert (rle.decode(encoded, h, w) == mask).all()
        assert (mask_utils.decode({**encoded, "counts": encoded["counts"].encode()}) == mask).all()
        assert int(mask_utils.area({**encoded, "counts": encoded["counts"].encode()})) == mask.sum()


def test_polygons_uncompressed_rle_and_empty_masks_decode():
    square = rle.decode([[2, 2, 8, 2, 8, 8, 2, 8]], 10, 10)
    assert rle.bbox(square) == [2.0, 2.0, 8.0, 8.0] and square.sum() == 36
    two = rle.decode([[0, 0, 2, 0, 2, 2, 0, 2], [6, 6, 8, 6, 8, 8, 6, 8]], 10, 10)
    assert two.sum() == 8  # both rings of a polygon mask, not the first only
    # column-major runs, as COCO stores them: 1 off, 2 on, 3 off
    assert (rle.decode({"size": [2, 3], "counts": [1, 2, 3]}, 2, 3) == [[0, 1, 0], [1, 0, 0]]).all()
    for empty in (None, [], {"size": [4, 4], "counts": [16]}):
        assert rle.decode(empty, 4, 4).shape == (4, 4) and not rle.decode(empty, 4, 4).any()
    assert rle.bbox(np.zeros((4, 4), bool)) is None


@pytest.mark.parametrize("bad", [
    {"size": [10, 10], "counts": "0T"},  # cut short
    {"size": [10, 10], "counts": "zz~~"},  # not RLE text
    {"size": [10, 10], "counts": [60, 60]},  # runs past the image
    {"size": [10, 12], "counts": "0T3"},  # another image's size
    {"counts": "0T3"}, [[1, 2, 3, 4]], 7])
def test_a_corrupt_mask_is_one_clear_line(bad):
    with pytest.raises(rle.MaskError) as e:
        rle.decode(bad, 10, 10, "the mask of sample 000000001 box 0")
    message = str(e.value)
    assert "\n" not in message and "sample 000000001 box 0" in message and "regenerate" in message


# -- the segmenter and the stage's judgement ----------------------------------------------------------

def test_segmenter_loads_from_a_folder_and_gives_one_mask_per_box(sam_folder):
    image = np.asarray(Image.new("RGB", (64, 48), (200, 30, 30)))
    from_folder = build_segmenter(sam_folder, device="cpu")
    same = build_segmenter("tiny", seed=3, device="cpu")  # the weights the folder was saved from
    boxes = [[4, 4, 30, 30], [10, 20, 60, 44]]
    masks, scores = from_folder.segment_boxes(image, boxes)
    assert masks.shape == (2, 48, 64) and masks.dtype == bool and scores.shape == (2,)
    again, again_scores = same.segment_boxes(image, boxes)
    assert (masks == again).all() and np.allclose(scores, again_scores)
    background, score = from_folder.segment_background(image)
    assert background.shape == (48, 64) and isinstance(score, float)


def test_a_folder_that_is_no_sam_is_one_line(tmp_path):
    with pytest.raises(SegmenterError, match="not a SAM folder"):
        build_segmenter(str(tmp_path))


def test_masks_are_judged_and_rejections_keep_the_box():
    mask = np.zeros((10, 10), bool)
    mask[2:6, 2:6] = True  # 16 pixels in a 64-pixel box: fill 0.25
    box = [2, 2, 10, 10]
    assert judge(mask, 0.9, box, MaskConfig()) == ("ok", 0.25)
    assert judge(mask, 0.5, box, MaskConfig(min_iou=0.6))[0] == "low_iou"
    assert judge(mask, 0.9, box, MaskConfig(min_fill=0.5))[0] == "low_fill"
    assert judge(mask, 0.9, box, MaskConfig(max_fill=0.2))[0] == "high_fill"
    assert judge(np.zeros((10, 10), bool), 0.9, box, MaskConfig())[0] == "empty"
    masker = Masker(MaskConfig(model="tiny", min_iou=1.0))
    image = np.asarray(Image.new("RGB", (64, 64), (20, 90, 200)))
    out = masker.segment(image, [[0, 0, 32, 32], [16, 16, 60, 60]])
    # A random SAM never predicts IoU 1: both masks rejected, each with its reason, none stored.
    assert out["mask_status"] in (["low_iou", "low_iou"], ["low_iou", "empty"], ["empty", "low_iou"],
                                  ["empty", "empty"])
    assert out["masks"] == [None, None] and len(out["mask_scores"]) == len(out["mask_fill"]) == 2


def test_background_prompt_is_for_single_object_images():
    masker = Masker(MaskConfig(model="tiny", prompt="background"))
    image = np.asarray(Image.new("RGB", (64, 64), (240, 240, 240)))
    one = masker.segment(image, [[10, 10, 40, 40]])
    background, _ = masker.segmenter.segment_background(image)
    assert one["mask_prompt"] == "background"
    if one["mask_status"] == ["ok"]:
        assert (rle.decode(one["masks"][0], 64, 64) == background).all()
    two = masker.segment(image, [[10, 10, 40, 40], [0, 0, 20, 20]])
    assert two["mask_prompt"] == "box" and len(two["masks"]) == 2


def test_mask_settings_are_checked():
    for bad in ("masks.prompt=points", "masks.min_iou=2", "masks.min_fill=-1", "masks.model=s3://b/sam"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].split(".")[1]):
            load_config(os.path.join(ROOT, "configs/tiny.yaml"), [bad])


# -- the stage in generate, on Ray ------------------------------------------------------------------

def test_masks_are_in_the_shards_and_read_back_by_webdataset(masked, sam_folder):
    cfg, summary, out = masked
    assert summary.images == 8 and summary.boxes > 0
    segmenter = build_segmenter(sam_folder, device="cpu")
    boxes = 0
    for sample in iter_samples(shard_urls(out)):
        meta = sample["json"]
        n = len(meta["boxes"])
        assert len(meta["masks"]) == len(meta["mask_scores"]) == len(meta["mask_status"]) == n
        image = np.asarray(sample["jpg"])
        if n and boxes == 0:  # the stored masks are the segmenter's on the stored JPEG
            expected, scores = segmenter.segment_boxes(image, meta["boxes"])
            assert np.allclose(meta["mask_scores"], scores, atol=1e-4)
            for j, mask in enumerate(meta["masks"]):
                if mask is not None:
                    assert (rle.decode(mask, meta["height"], meta["width"]) == expected[j]).all()
        for mask, status in zip(meta["masks"], meta["mask_status"]):
            assert (mask is None) == (status != "ok")
        boxes += n
    assert boxes == summary.boxes
    entries = ShardStore(out).finished()
    counts = {}
    for entry in entries.values():
        for status, k in entry["masks"].items():
            counts[status] = counts.get(status, 0) + k
    assert sum(counts.values()) == boxes and counts["ok"] > 0  # some masks were kept: the checks above ran


def test_export_has_coco_segmentation(masked, tmp_path):
    cfg, summary, out = masked
    result = export(out, dest=str(tmp_path / "export"), write_images=False)
    coco = COCO(result["coco"])
    records = {s["json"]["id"]: s["json"] for s in iter_samples(shard_urls(out))}
    with_masks = 0
    for ann in coco.dataset["annotations"]:
        meta = records[ann["image_id"]]
        if "segmentation" in ann:
            with_masks += 1
            mask = coco.annToMask(ann).astype(bool)
            assert mask.sum() == ann["area"]
            assert any((rle.decode(m, meta["height"], meta["width"]) == mask).all() for m in meta["masks"] if m)
    assert with_masks == sum(m is not None for meta in records.values() for m in meta["masks"])


def test_masks_change_the_run_fingerprint(masked):
    from engine.generation.pipeline import run_fingerprint
    from engine.generation.prompts import PromptPlan
    cfg, _, _ = masked
    off = load_config(os.path.join(ROOT, "configs/tiny.yaml"), SMALL[:-1])
    on_plan, off_plan = PromptPlan(cfg.prompts), PromptPlan(off.prompts)
    assert run_fingerprint(cfg, on_plan) != run_fingerprint(off, off_plan)
    default = load_config(os.path.join(ROOT, "configs/tiny.yaml"), SMALL[:-1] + ["masks.min_iou=0.5"])
    # masks off: its settings do not touch the samples, so outputs without masks keep their fingerprint
    assert run_fingerprint(default, off_plan) == run_fingerprint(off, off_plan)


# -- the instance pool -----------------------------------------------------------------------------

POOL = PoolConfig(min_fill=0.0, min_area=4)


def test_pool_build_read_back_and_resume(masked, tmp_path):
    cfg, _, out = masked
    dest = str(tmp_path / "pool")
    summary = build_pool(out, dest, POOL)
    records = {s["__key__"]: s["json"] for s in iter_samples(shard_urls(out))}
    expected = {}
    for key, meta in records.items():
        for j, mask in enumerate(meta["masks"]):
            if mask is not None and rle.decode(mask, meta["height"], meta["width"]).sum() >= POOL.min_area:
                expected[f"{key}-{j:03d}"] = (meta, j)
    assert expected and summary.instances == len(expected) and summary.shards_written == summary.shards
    assert summary.rejected["no_mask"] == sum(m is None for meta in records.values() for m in meta["masks"])
    pooled = list(iter_samples(shard_urls(dest)))  # webdataset reads the pool's shards
    assert {s["__key__"] for s in pooled} == set(expected)
    for sample in pooled:
        meta, j = expected[sample["__key__"]]
        inst = sample["json"]
        full = rle.decode(meta["masks"][j], meta["height"], meta["width"])
        x0, y0, x1, y1 = inst["source"]["mask_bbox"]
        assert [x0, y0, x1, y1] == rle.bbox(full) and inst["category"] == meta["labels"][j]
        alpha = np.asarray(sample["png"])[..., 3]
        assert ((alpha == 255) == full[y0:y1, x0:x1]).all() and ((alpha == 0) | (alpha == 255)).all()
        assert (rle.decode(inst["mask"], y1 - y0, x1 - x0) == full[y0:y1, x0:x1]).all()
    manifest = json.loads((tmp_path / "pool" / "pool.json").read_text())
    assert sum(manifest["per_category"].values()) == len(expected)
    # Resume: a lost shard is redone, the same bytes; the others are left alone.
    store = ShardStore(dest)
    entries = store.finished()
    first = min(entries)
    os.remove(tmp_path / "pool" / "manifest" / f"shard-{first:06d}.json")
    again = build_pool(out, dest, POOL)
    assert again.shards_written == 1 and again.instances == summary.instances
    assert store.finished()[first]["sha256"] == entries[first]["sha256"]
    with pytest.raises(ShardError, match="different run") as e:
        build_pool(out, dest, PoolConfig(min_fill=0.0, min_area=5))
    assert "\n" not in str(e.value)


def test_pool_of_an_output_without_masks_or_of_unknown_categories_is_one_line(masked, tmp_path):
    cfg, _, out = masked
    copy = tmp_path / "nomasks"
    shutil.copytree(out, copy)
    for path in (copy / "manifest").glob("shard-*.json"):
        entry = json.loads(path.read_text())
        entry.pop("masks")
        path.write_text(json.dumps(entry))
    with pytest.raises(PoolError, match="holds no masks.*masks.enabled=true"):
        build_pool(str(copy), str(tmp_path / "p1"), POOL)
    with pytest.raises(PoolError, match="'zebra', which .* never generated"):
        build_pool(out, str(tmp_path / "p2"), PoolConfig(categories=["zebra"]))
    assert not (tmp_path / "p1").exists() and not (tmp_path / "p2").exists()


def test_a_corrupt_mask_in_the_source_stops_the_pool_with_one_line(masked, tmp_path):
    cfg, _, out = masked
    copy = tmp_path / "corrupt"
    shutil.copytree(out, copy)
    store = ShardStore(str(copy))
    entries = store.finished()
    index = min(entries)
    samples, bad = [], None
    for sample in samples_in_tar(store.read_shard(entries[index])):
        sample = {k: bytes(v) if k != "__key__" else v for k, v in sample.items()}
        meta = json.loads(sample["json"])
        if bad is None and any(m is not None for m in meta["masks"]):
            j = next(j for j, m in enumerate(meta["masks"]) if m is not None)
            meta["masks"][j]["counts"] = meta["masks"][j]["counts"][:-1] or "0"  # cut short
            bad = f"{sample['__key__']} box {j}"
            sample["json"] = json.dumps(meta).encode()
        samples.append({"__key__": sample["__key__"], "jpg": sample["jpg"], "latent.npy": sample["latent.npy"],
                        "json": sample["json"]})
    assert bad is not None, "the fixture's first shard has no mask to corrupt"
    store.write_shard(index, samples, entries[index]["dropped"])  # a whole shard, with a corrupt mask in it
    with pytest.raises(rle.MaskError) as e:
        build_pool(str(copy), str(tmp_path / "pool"), POOL)
    assert "\n" not in str(e.value) and bad in str(e.value) and "corrupt RLE" in str(e.value)


# -- copy-paste --------------------------------------------------------------------------------------

def solid(colour, mask, key) -> Instance:
    rgb = np.zeros((*mask.shape, 3), np.uint8)
    rgb[:] = colour  # one colour inside and outside the mask: where it shows after pasting is its mask
    return Instance(rgb, mask, "cat", key)


def where(image, colour) -> np.ndarray:
    return (image == np.array(colour, np.uint8)).all(-1)


REAL_COLOURS = [(10, 200, 10), (10, 10, 200)]
PASTE_COLOURS = [(250, 0, 0), (0, 250, 250), (250, 250, 0), (250, 0, 250)]


def test_pasted_boxes_are_the_visible_masks_and_occluded_real_boxes_shrink_or_drop():
    cfg = CopyPasteConfig(pool="p", per_image=4, min_size=0.1, max_size=0.9, min_visible=0.3)
    yy, xx = np.mgrid[-10:10, -10:10]
    disc = np.hypot(yy, xx) < 9.5  # round masks: their boxes are not their crops
    ring = disc & ~(np.hypot(yy, xx) < 4)
    real = [[4.0, 4.0, 18.0, 14.0], [12.0, 10.0, 60.0, 60.0]]  # the second lies over the first
    dropped = shrunk = untouched = pasted_dropped = 0
    for seed in range(60):
        image = np.zeros((64, 64, 3), np.uint8)
        for (x0, y0, x1, y1), colour in zip(real, REAL_COLOURS):
            image[int(y0):int(y1), int(x0):int(x1)] = colour
        picks = [solid(c, ring if k % 2 else disc, f"i{k}") for k, c in enumerate(PASTE_COLOURS)]
        out, boxes, labels, pasted = paste(image, real, ["dog", "car"], picks, np.random.default_rng(seed), cfg)
        under_pastes = np.any([where(out, c) for c in PASTE_COLOURS], axis=0)
        k = 0
        for j, label in enumerate(["dog", "car"]):
            full = np.zeros((64, 64), bool)  # a real object without a mask is its box
            x0, y0, x1, y1 = (int(v) for v in real[j])
            full[y0:y1, x0:x1] = True
            left = full & ~under_pastes
            if left.sum() < cfg.min_visible * full.sum():
                dropped += 1
                continue
            assert labels[k] == label
            if left.sum() == full.sum():
                untouched += 1
                assert boxes[k] == real[j]  # untouched: its box exactly as it was
            else:
                assert boxes[k] == rle.bbox(left)  # shrunk to what stays visible
                shrunk += boxes[k] != real[j]
            k += 1
        for p in pasted:
            visible = where(out, PASTE_COLOURS[int(p["key"][1:])])
            if p["box"] is None:  # hidden by later pastes
                assert visible.sum() < cfg.min_visible * p["area"]
                pasted_dropped += 1
                continue
            assert p["box"] == rle.bbox(visible)  # the pasted box is its visible mask's bounding box
            assert boxes[k] == p["box"] and labels[k] == "cat"
            k += 1
        assert k == len(boxes) == len(labels)
    assert dropped and shrunk and untouched and pasted_dropped, (dropped, shrunk, untouched, pasted_dropped)
    same = paste(image, real, ["dog", "car"], picks, np.random.default_rng(59), cfg)
    assert (same[0] == out).all() and same[1:] == (boxes, labels, pasted)  # seeded: the same pastes


def test_real_masks_as_polygons_or_rle_and_empty_instances():
    cfg = CopyPasteConfig(pool="p", per_image=1, min_size=1.0, max_size=1.0, min_visible=0.5)
    image = np.zeros((32, 32, 3), np.uint8)
    left_half = [[0, 0, 16, 0, 16, 32, 0, 32]]  # polygon: the left half
    top_half = rle.encode(np.arange(32)[:, None].repeat(32, 1) < 16)
    top_uncompressed = {"size": [32, 32], "counts": [0] + [16, 16] * 32}  # column-major: top 16 of each column
    cover = np.zeros((32, 32), bool)
    cover[:, 16:] = True  # an instance over the right half, pasted at full size
    inst = solid((250, 0, 0), cover, "i0")
    for masks in ([left_half, top_half], [left_half, top_uncompressed]):
        out, boxes, labels, pasted = paste(image, [[0, 0, 32, 32], [0, 0, 32, 32]], ["dog", "car"], [inst],
                                           np.random.default_rng(0), cfg, masks)
        # the left half is untouched; the top half loses its right part (half its area: kept, shrunk)
        assert labels == ["dog", "car", "cat"]
        assert boxes[0] == [0, 0, 32, 32] and boxes[1] == [0.0, 0.0, 16.0, 16.0] and boxes[2] == [16.0, 0.0, 32.0, 32.0]
    tiny = np.zeros((40, 40), bool)
    tiny[0, 0] = True  # one pixel: scaled down it is empty, and must not become a box
    counter = CopyPaste(cfg, PoolIndex({"cat": [("u", "i0")]}, {"cat": 1.0}))
    small = CopyPasteConfig(pool="p", per_image=1, min_size=0.1, max_size=0.1)
    out, boxes, labels, pasted = paste(image, [[0, 0, 8, 8]], ["dog"], [solid((250, 0, 0), tiny, "i0")],
                                       np.random.default_rng(0), small, None, counter)
    assert boxes == [[0, 0, 8, 8]] and labels == ["dog"] and pasted == [] and counter.skipped_empty == 1
    with pytest.raises(rle.MaskError, match="real box 0"):
        paste(image, [[0, 0, 8, 8]], ["dog"], [inst], np.random.default_rng(0), cfg, [{"size": [32, 32], "counts": "0"}])


def test_copy_paste_from_a_pool_and_its_one_line_errors(masked, tmp_path):
    cfg, _, out = masked
    dest = str(tmp_path / "pool")
    build_pool(out, dest, POOL)
    categories = cfg.prompts.base
    counts = json.loads((tmp_path / "pool" / "pool.json").read_text())["per_category"]
    present = [c for c in categories if counts.get(c)]
    absent = [c for c in categories if not counts.get(c)]
    index = load_pool_index(CopyPasteConfig(pool=dest, rare=present[:1], rare_boost=3.0), categories)
    assert set(index.instances) == set(present) and index.weights[present[0]] == 3.0
    paster = CopyPaste(CopyPasteConfig(pool=dest, per_image=3, seed=1), index)
    again = CopyPaste(CopyPasteConfig(pool=dest, per_image=3, seed=1), index)
    image = np.zeros((64, 64, 3), np.uint8)
    a = paster(image, [[0, 0, 20, 20]], ["dog"], 7)
    b = again(image, [[0, 0, 20, 20]], ["dog"], 7)
    assert (a[0] == b[0]).all() and a[1:] == b[1:]  # seeded by (copy_paste.seed, the sample's seed)
    assert len(a[3]) + paster.skipped_empty == 3 and all(p["category"] in present for p in a[3])
    c = paster(image, [[0, 0, 20, 20]], ["dog"], 8)  # the sample's seed in the next epoch draws afresh
    assert c[3] != a[3] or (c[0] != a[0]).any() or len(present) == 1
    if absent:
        with pytest.raises(CopyPasteError) as e:
            load_pool_index(CopyPasteConfig(pool=dest, categories=[absent[0]]), categories)
        assert f"no instance of category {absent[0]!r}" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CopyPasteError, match="not one of the detector's categories"):
        load_pool_index(CopyPasteConfig(pool=dest, categories=["zebra"]), categories)
    with pytest.raises(CopyPasteError, match="no instance pool"):
        load_pool_index(CopyPasteConfig(pool=out), categories)  # a generate output, not a pool


def test_augmenter_pastes_onto_real_rows_only(masked, tmp_path):
    cfg, _, out = masked
    dest = str(tmp_path / "pool")
    build_pool(out, dest, POOL)
    index = load_pool_index(CopyPasteConfig(pool=dest), cfg.prompts.base)
    path = tmp_path / "real.png"
    Image.new("RGB", (64, 64), (0, 0, 0)).save(path)
    item = {"url": "", "rows": json.dumps([{"file": str(path), "boxes": json.dumps([[2, 2, 20, 20]]),
                                            "labels": json.dumps(["dog"]), "seed": 3}])}
    no_jitter = {"flip_prob": 0.0, "min_scale": 1.0, "max_scale": 1.0}
    [plain] = Augmenter(cfg.prompts.base, 64, no_jitter, True)(item)
    # Instances scaled to the image's side: none is scaled to nothing.
    paste_cfg = CopyPasteConfig(pool=dest, per_image=2, min_size=1.0, max_size=1.0, min_visible=0.0)
    [pasted] = Augmenter(cfg.prompts.base, 64, no_jitter, True, True, (asdict(paste_cfg), index))(item)
    expected = CopyPaste(paste_cfg, index)(np.zeros((64, 64, 3), np.uint8), [[2, 2, 20, 20]], ["dog"], 3)
    assert len(expected[3]) == 2 and json.loads(plain["target"])["labels"] == [cfg.prompts.base.index("dog")]
    assert json.loads(pasted["target"])["labels"] == [cfg.prompts.base.index(c) for c in expected[2]]
    assert (pasted["pixels"] == expected[0]).all() and (pasted["pixels"] != plain["pixels"]).any()


def test_pool_command_errors_are_one_line(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "pool", "--from", str(tmp_path / "never"), "--output",
                           str(tmp_path / "pool")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "no output of `instagen generate`" in proc.stderr and "pool --from" in proc.stderr


def test_copy_paste_runs_in_the_ray_data_training_input(masked, tmp_path):
    """The detector's input pipeline on Ray Data: every real image comes out with the pastes that
    sample's seed in the epoch draws, read from the pool's shards inside the workers."""
    from fixtures_coco import make_coco_dataset

    from engine.config import AugmentConfig, DetectorConfig, TrainRunConfig
    from engine.training.detection import build_train_datasets, dataset_name, epoch_items, prepare, train_detector
    cfg, _, out = masked
    dest = str(tmp_path / "pool")
    build_pool(out, dest, POOL)
    categories = cfg.prompts.base
    ann, root = make_coco_dataset(tmp_path / "real", n_images=4, categories=categories)
    paste_cfg = CopyPasteConfig(pool=dest, per_image=2, min_size=1.0, max_size=1.0, min_visible=0.0, seed=5)
    det = DetectorConfig(real_annotations=ann, real_image_root=root, mix_ratio=0.0, batch_size=2,
                         augment=AugmentConfig(flip_prob=0.0, min_scale=1.0, max_scale=1.0), copy_paste=paste_cfg)
    det.validate()
    found, plan = prepare(det)
    index = load_pool_index(paste_cfg, found)
    rows = build_train_datasets(det, plan, found, True, 1, index)[dataset_name(0, 0)].take_all()
    assert len(rows) == len(plan.real) == 4
    local = CopyPaste(paste_cfg, index)
    expected = []
    for r in (r for item in epoch_items(det, plan, 0, 1)[0] for r in json.loads(item["rows"])):
        image = np.asarray(Image.open(r["file"]).convert("RGB"))
        pasted, _, labels, record = local(image, json.loads(r["boxes"]), json.loads(r["labels"]), r["seed"])
        assert len(record) == 2
        expected.append((pasted.tobytes(), [found.index(c) for c in labels]))
    got = [(row["pixels"].tobytes(), json.loads(row["target"])["labels"]) for row in rows]
    assert sorted(got) == sorted(expected)
    # Training on it: the trainer counts the pasted instances that stayed visible, per category.
    det.run = TrainRunConfig(storage_path=str(tmp_path / "runs"), name="paste", checkpoint_every=5, max_failures=0)
    det.output_dir, det.max_steps = str(tmp_path / "detector"), 2
    summary = train_detector(det)
    visible = Counter(json.loads(p)[k] for row in rows for p in [row["pasted"]] for k in range(len(json.loads(p))))
    assert summary.steps == 2 and summary.metrics["epochs"][-1]["pasted"] == dict(visible)
