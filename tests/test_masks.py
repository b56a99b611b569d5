"""Instance masks: RLE in and out of pycocotools, the tiny SAM, the mask stage of generate on a real
local Ray (shards read back by webdataset, the manifest's counts, COCO segmentation in the export)."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from engine.config import ConfigError, MaskConfig, load_config
from engine.data import masks as rle
from engine.data.shards import ShardStore, iter_samples, shard_urls
from engine.generation.export import export
from engine.generation.masks import Masker, judge
from engine.generation.pipeline import generate
from engine.models.segmenter import SegmenterError, build_segmenter, tiny_sam

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
    assert sum(counts.values()) == boxes


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
