"""The toy world: exact boxes, captions that match them, the base/novel split, and a draw that is
deterministic, whole or absent, and free to repeat."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from engine.toyworld import world as toyworld
from engine.config import ConfigError
from engine.models.segmenter import build_segmenter
from engine.toyworld.world import JITTER, SPLITS, WorldConfig, draw_scene, draw_world, merge_splits, object_masks


def small(**changes) -> WorldConfig:
    return WorldConfig(**{"pretrain_images": 20, "train_images": 20, "test_images": 40, **changes})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy") / "world")
    return out, small(), draw_world(out, small())


def load(out: str, split: str, kind: str = "instances") -> dict:
    with open(os.path.join(out, split, f"{kind}.json")) as f:
        return json.load(f)


def boxes_by_image(coco: dict) -> dict[int, list[tuple[str, list[int]]]]:
    names = {c["id"]: c["name"] for c in coco["categories"]}
    found: dict[int, list] = {im["id"]: [] for im in coco["images"]}
    for a in sorted(coco["annotations"], key=lambda a: a["id"]):
        found[a["image_id"]].append((names[a["category_id"]], a["bbox"]))
    return found


def intersects(a, b, margin: int = 0) -> bool:
    return (a[0] - margin < b[0] + b[2] and b[0] < a[0] + a[2] + margin
            and a[1] - margin < b[1] + b[3] and b[1] < a[1] + a[3] + margin)


def test_boxes_are_the_exact_pixel_extent():
    """On clean pretrain pictures, the pixels of an object's colour span exactly its box."""
    cfg = small()
    checked = 0
    for i in range(cfg.pretrain_images):
        img, objects = draw_scene(cfg, "pretrain", i)
        pixels = np.asarray(img, np.int32)
        for k, (cat, (x, y, w, h)) in enumerate(objects):
            others = [b for j, (_, b) in enumerate(objects) if j != k]
            if any(intersects([x, y, w, h], b, margin=1) for b in others):
                continue  # another shape touches this one: its pixels are not this box's alone
            rgb = np.array(cfg.colors[cat.split(" ")[0]])
            x0, y0 = max(x - 1, 0), max(y - 1, 0)  # one pixel of background around the box
            window = pixels[y0:y + h + 1, x0:x + w + 1]
            ys, xs = np.nonzero(np.abs(window - rgb).max(axis=2) <= JITTER + 15)
            extent = [xs.min() + x0, ys.min() + y0, xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert extent == [x, y, w, h], (i, cat)
            checked += 1
    assert checked >= 15


def test_object_masks_are_the_visible_pixels():
    """A later object hides what it covers of an earlier one; a mask spans its box exactly where
    nothing covers it."""
    objects = [("red square", [10, 10, 20, 20]), ("blue circle", [20, 20, 12, 12])]
    square, circle = object_masks(objects, 64)
    assert square[10:30, 10:20].all() and not square[25, 25] and circle[25, 25]
    assert not (square & circle).any() and square.sum() == 400 - (circle[10:30, 10:30]).sum()
    ys, xs = np.nonzero(object_masks(objects[1:], 64)[0])
    assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [20, 20, 32, 32]


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_the_colour_segmenter_cuts_drawn_objects_out():
    """The toy world's segmenter against the exact masks: a plain picture's single object by
    its background, cluttered scenes' objects by their boxes, and nothing where a box holds none."""
    cfg, seg = small(pretrain_images=60), build_segmenter("colour")
    plain, cluttered = [], []
    for i in range(60):
        img, objects = draw_scene(cfg, "pretrain", i)
        if len(objects) == 1:
            mask, score = seg.segment_background(np.asarray(img))
            plain.append(iou(mask, object_masks(objects, cfg.size)[0]))
            assert score > 0.8  # a plain background (less where the object touches the edge)
    for i in range(cfg.test_images):
        img, objects = draw_scene(cfg, "test", i)
        masks, _ = seg.segment_boxes(np.asarray(img), [[x, y, x + w, y + h] for _, (x, y, w, h) in objects])
        cluttered += [iou(m, e) for m, e in zip(masks, object_masks(objects, cfg.size))]
    assert len(plain) >= 15 and np.mean(plain) > 0.98
    assert len(cluttered) >= 40 and np.mean(cluttered) > 0.75
    blank = np.full((64, 64, 3), 230, np.uint8)
    masks, scores = seg.segment_boxes(blank, [[5, 5, 30, 30]])
    assert not masks.any() and scores[0] == 1.0


def test_written_objects_have_their_colour_and_lie_inside(world):
    """In the JPEGs of the cluttered test split, an object no later one covers shows its category's
    colour at the middle of its box."""
    out, cfg, _ = world
    coco = load(out, "test")
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    checked = 0
    for image_id, objects in boxes_by_image(coco).items():
        pixels = np.asarray(Image.open(os.path.join(out, "test", files[image_id])).convert("RGB"), np.float32)
        for k, (cat, (x, y, w, h)) in enumerate(objects):
            assert 0 <= x and 0 <= y and x + w <= cfg.size and y + h <= cfg.size and w * h > 0
            if any(intersects([x, y, w, h], b) for _, b in objects[k + 1:]):
                continue  # drawn over in part
            cx, cy = x + w // 2, y + h // 2
            mean = pixels[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(axis=0)
            assert np.abs(mean - cfg.colors[cat.split(" ")[0]]).max() <= JITTER + 15, (image_id, cat)
            checked += 1
    assert checked >= 40


def test_captions_name_the_objects_of_each_picture(world):
    out, _, _ = world
    captions = {a["image_id"]: a["caption"] for a in load(out, "pretrain", "captions")["annotations"]}
    objects = boxes_by_image(load(out, "pretrain"))
    assert set(captions) == set(objects)
    for image_id, found in objects.items():
        assert 1 <= len(found) <= 2
        assert captions[image_id] == "a photograph of " + " and ".join(c for c, _ in found)


def test_train_is_base_only_and_test_holds_novel(world):
    out, cfg, summary = world
    assert summary["base"] == cfg.base and summary["novel"] == cfg.novel
    assert not set(cfg.base) & set(cfg.novel) and set(cfg.base) | set(cfg.novel) == set(cfg.categories)
    names = {split: {c for found in boxes_by_image(load(out, split)).values() for c, _ in found}
             for split in SPLITS}
    assert names["train"] <= set(cfg.base)
    assert names["test"] & set(cfg.novel) and names["test"] & set(cfg.base)
    assert names["pretrain"] & set(cfg.novel)  # the generator has seen every category
    for split in SPLITS:
        coco = load(out, split)
        assert coco["info"]["base"] == cfg.base and coco["info"]["novel"] == cfg.novel
        assert summary["splits"][split] == {"images": len(coco["images"]), "boxes": len(coco["annotations"])}


def test_coco_files_load_with_pycocotools_and_share_category_ids(world):
    out, cfg, _ = world
    ids = None
    for split in SPLITS:
        coco = COCO(os.path.join(out, split, "instances.json"))
        cats = [(c["id"], c["name"], c["supercategory"]) for c in coco.loadCats(coco.getCatIds())]
        assert cats == [(i + 1, n, n.split(" ")[0]) for i, n in enumerate(cfg.categories)]
        assert ids is None or cats == ids
        ids = cats
        for a in coco.loadAnns(coco.getAnnIds()):
            assert a["area"] == a["bbox"][2] * a["bbox"][3] and a["iscrowd"] == 0
        for im in coco.loadImgs(coco.getImgIds()):
            assert os.path.exists(os.path.join(out, split, im["file_name"]))
            assert im["file_name"] == f"images/{split}_{im['id'] - 1:06d}.jpg"
    captions = COCO(os.path.join(out, "pretrain", "captions.json"))
    assert len(captions.getAnnIds()) == cfg.pretrain_images


def test_merged_splits_keep_every_image_and_box(world, tmp_path):
    # GLIGEN inpainting learns from the pretraining pictures and the train scenes as one dataset.
    out, cfg, summary = world
    merged = str(tmp_path / "merged" / "instances.json")
    counts = merge_splits(out, ["pretrain", "train"], merged)
    coco = COCO(merged)
    assert counts == {k: summary["splits"]["pretrain"][k] + summary["splits"]["train"][k] for k in ("images", "boxes")}
    assert len(coco.getImgIds()) == counts["images"] and len(coco.getAnnIds()) == counts["boxes"]
    # Each image, under the world folder, keeps exactly the boxes its split gave it.
    want = {(split, im["file_name"]): sorted(map(tuple, boxes_by_image(load(out, split))[im["id"]]))
            for split in ("pretrain", "train") for im in load(out, split)["images"]}
    got = {}
    for im in coco.loadImgs(coco.getImgIds()):
        assert os.path.exists(os.path.join(out, im["file_name"]))
        split, name = im["file_name"].split("/", 1)
        got[(split, name)] = sorted((coco.cats[a["category_id"]]["name"], tuple(a["bbox"]))
                                    for a in coco.loadAnns(coco.getAnnIds(imgIds=im["id"])))
    assert got == {k: [(c, tuple(b)) for c, b in v] for k, v in want.items()}
    with pytest.raises(ConfigError, match="cannot merge splits"):
        merge_splits(out, ["pretrain", "validation"], str(tmp_path / "bad" / "instances.json"))
    assert not os.path.exists(tmp_path / "bad")


def files_of(out: str) -> dict[str, bytes]:
    found = {}
    for folder, _, names in os.walk(out):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                found[os.path.relpath(os.path.join(folder, name), out)] = f.read()
    return found


def test_same_seed_same_bytes_other_seed_other_world(world, tmp_path):
    out, cfg, _ = world
    draw_world(str(tmp_path / "again"), cfg)
    assert files_of(str(tmp_path / "again")) == files_of(out)
    draw_world(str(tmp_path / "other"), small(seed=1))
    other = files_of(str(tmp_path / "other"))
    assert other["test/images/test_000000.jpg"] != files_of(out)["test/images/test_000000.jpg"]
    assert other["test/instances.json"] != files_of(out)["test/instances.json"]


def test_an_image_does_not_depend_on_the_others():
    a = np.asarray(draw_scene(small(), "train", 7)[0])
    b = np.asarray(draw_scene(small(train_images=3000), "train", 7)[0])
    assert (a == b).all()


def test_interrupted_draw_leaves_nothing(tmp_path, monkeypatch):
    written = []

    def failing(img, path, quality):
        if len(written) == 5:
            raise OSError("disk full")
        written.append(path)

    monkeypatch.setattr(toyworld, "_save_jpeg", failing)
    with pytest.raises(OSError, match="disk full"):
        draw_world(str(tmp_path / "world"), small())
    assert os.listdir(tmp_path) == []


def test_interrupted_redraw_keeps_the_old_world(tmp_path, monkeypatch):
    out = str(tmp_path / "world")
    draw_world(out, small(), splits=("pretrain",))
    before = files_of(out)

    def failing(img, path, quality):
        raise OSError("disk full")

    monkeypatch.setattr(toyworld, "_save_jpeg", failing)
    with pytest.raises(OSError):
        draw_world(out, small(), splits=("train",))
    assert os.listdir(tmp_path) == ["world"] and files_of(out) == before


def test_rerun_is_free_and_another_config_is_refused(world):
    out, cfg, summary = world
    calls = []
    mtime = os.stat(os.path.join(out, "world.json")).st_mtime_ns
    assert draw_world(out, cfg, progress=lambda *a: calls.append(a)) == summary
    assert calls == [] and os.stat(os.path.join(out, "world.json")).st_mtime_ns == mtime
    with pytest.raises(ConfigError, match=r"holds another world.*world\.noise"):
        draw_world(out, small(noise=3.0))


def test_adding_a_split_keeps_the_others(tmp_path):
    out = str(tmp_path / "world")
    draw_world(out, small(), splits=("pretrain",))
    first = files_of(out)
    summary = draw_world(out, small(), splits=("test",))
    assert list(summary["splits"]) == ["pretrain", "test"]
    assert all(files_of(out)[k] == v for k, v in first.items() if k != "world.json")


def test_a_folder_that_is_not_a_world_is_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a toy world"):
        draw_world(str(tmp_path), small())
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_progress_counts_every_image(tmp_path):
    calls = []
    draw_world(str(tmp_path / "world"), small(), progress=lambda *a: calls.append(a))
    assert len(calls) == 80 and calls[-1] == ("test", 40, 40) and calls[19] == ("pretrain", 20, 20)


@pytest.mark.parametrize("changes, message", [
    ({"size": 60}, r"world\.size must be a multiple of 8"),
    ({"size": 8, "min_object": 4, "max_object": 8}, r"world\.size .* at least 16"),
    ({"novel": ["purple circle"]}, r"colour 'purple' is not in world\.colors"),
    ({"novel": ["red hexagon"]}, r"shape 'hexagon' is not in world\.shapes"),
    ({"novel": ["circle"]}, r"must be '<colour> <shape>'"),
    ({"novel": ["red circle", "red square", "red triangle"]}, r"colour 'red' occurs in no base category"),
    ({"novel": ["red circle", "green circle", "blue circle"]}, r"shape 'circle' occurs in no base category"),
    ({"novel": []}, r"world\.novel is empty"),
    ({"shapes": ["circle", "star"]}, r"world\.shapes must be"),
    ({"colors": {"dark red": [120, 0, 0]}}, r"world\.colors key 'dark red' must be one word"),
    ({"colors": {"red": [300, 0, 0]}}, r"world\.colors\.red must be three values"),
    ({"min_object": 20, "max_object": 10}, r"world\.min_object \(20\) must not exceed world\.max_object"),
    ({"max_object": 80}, r"world\.max_object \(80\) must not exceed world\.size"),
    ({"test_images": 0}, r"world\.test_images must be at least 1"),
    ({"max_objects": 0}, r"world\.max_objects must be at least 1"),
    ({"max_overlap": 1.5}, r"world\.max_overlap must lie in \[0, 1\]"),
    ({"distractors": -1}, r"world\.distractors must be >= 0"),
    ({"noise": -1.0}, r"world\.noise .* must be >= 0"),
    ({"jpeg_quality": 0}, r"world\.jpeg_quality must lie in 1\.\.100"),
])
def test_bad_configs_name_the_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        WorldConfig(**changes).validate()
