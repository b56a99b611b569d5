"""Detection dataset loading: whole-file errors are DatasetError naming the file and field;
bad items are counted skips; boxes come out as clipped xyxy pixels."""
import json
import os

import pytest
from fixtures_coco import load_json, make_coco_dataset, write_json

from engine.data.datasets import (BAD_BOX, CORRUPT_IMAGE, CROWD, DUPLICATE_IMAGE, MISSING_IMAGE, UNKNOWN_CATEGORY, DatasetError, check_dataset, load_detection_dataset, open_image, split_records)


@pytest.fixture
def coco(tmp_path):
    ann, root = make_coco_dataset(tmp_path, n_images=4, categories=["red square", "blue disc", "green square"])
    return tmp_path, ann, root


def test_loads_real_coco_with_exact_boxes(coco):
    _, ann, root = coco
    ds = load_detection_dataset(ann, root)
    assert ds.categories == ["red square", "blue disc", "green square"]
    assert [r.id for r in ds.records] == [100, 101, 102, 103]
    assert ds.skipped.total == 0 and ds.skipped.summary() == "nothing skipped"
    r = ds.records[1]  # odd image: objects on the bottom row plus an extra red square
    assert r.labels == ["red square", "blue disc", "green square", "red square"]
    x0, y0, x1, y1 = r.boxes[1]
    assert (x1 - x0, y1 - y0) == (12.0, 12.0) and y1 == 64.0
    # The drawn pixels are where the box says: the blue disc's centre is blue.
    px = open_image(r.file).getpixel((int((x0 + x1) / 2), int((y0 + y1) / 2)))
    assert px[2] > 150 and px[0] < 100


@pytest.mark.parametrize("content, match", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "holds a JSON list"),
    (json.dumps({"images": [], "annotations": []}), "has no 'categories' field"),
    (json.dumps({"images": [], "categories": []}), "has no 'annotations' field"),
    (json.dumps({"images": {}, "annotations": [], "categories": []}), "field 'images' must be a list"),
])
def test_malformed_file_is_dataset_error_naming_file_and_field(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=match) as e:
        load_detection_dataset(str(path), str(tmp_path))
    assert str(path) in str(e.value)


def test_missing_annotation_file_is_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_detection_dataset(str(tmp_path / "nope.json"), str(tmp_path))


def test_bad_items_are_counted_and_skipped(coco):
    tmp, ann, root = coco
    data = load_json(ann)
    os.remove(os.path.join(root, "000000.jpg"))  # missing image
    full = open(os.path.join(root, "000001.jpg"), "rb").read()
    with open(os.path.join(root, "000001.jpg"), "wb") as f:  # truncated JPEG: header fine, pixels cut
        f.write(full[: len(full) // 2])
    anns = data["annotations"]
    img2 = [a for a in anns if a["image_id"] == 102]
    img2[0]["bbox"] = [10, 10, -5, 8]  # negative width
    img2[1]["bbox"] = [70, 70, 5, 5]  # wholly outside the 64x64 image
    img2[2]["category_id"] = 999  # unknown category id
    anns.append({"id": 999, "image_id": 103, "category_id": 1, "bbox": [0, 0, 64, 64], "iscrowd": 1})
    anns.append({"id": 1000, "image_id": 103, "category_id": 1, "bbox": [50, 50, 30, 30]})  # partly out: clipped
    data["images"].append(dict(data["images"][3], file_name="000003_copy.jpg"))  # duplicated id 103
    data["images"].append({"id": 104, "file_name": "000003.jpg", "width": 64, "height": 64})
    anns.append({"id": 1001, "image_id": 104, "category_id": 3, "bbox": [50, 50, 30, 30]})
    write_json(ann, data)

    ds = load_detection_dataset(ann, root)
    counts = ds.skipped.counts
    assert counts[MISSING_IMAGE] == 1 and counts[CORRUPT_IMAGE] == 1
    assert counts[BAD_BOX] == 2 and counts[UNKNOWN_CATEGORY] == 1
    assert counts[DUPLICATE_IMAGE] == 2 and counts[CROWD] == 0  # crowd was on the dropped image 103
    assert [r.id for r in ds.records] == [102, 104]
    assert ds.records[1].boxes == [[50.0, 50.0, 64.0, 64.0]]  # clipped to the image
    summary = ds.skipped.summary()
    assert "1 missing image" in summary and "000000.jpg" in summary and "2 duplicated image id" in summary

    # Without the image check, the file problems are left for the training data pipeline.
    unchecked = load_detection_dataset(ann, root, check_images=False)
    assert [r.id for r in unchecked.records] == [100, 101, 102, 104]


def test_split_keeps_only_base_boxes_and_images(coco):
    tmp, ann, root = coco
    data = load_json(ann)
    # Image 100 keeps only its green square (a novel category here).
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 100 or a["category_id"] == 5]
    write_json(ann, data)
    ds = load_detection_dataset(ann, root)
    base = split_records(ds, ["red square", "blue disc"])
    assert base.categories == ["red square", "blue disc"]
    assert [r.id for r in base.records] == [101, 102, 103]
    assert all(set(r.labels) <= {"red square", "blue disc"} for r in base.records)
    with pytest.raises(DatasetError, match="'zebra'"):
        split_records(ds, ["zebra"])
    with pytest.raises(DatasetError, match="not in"):
        load_detection_dataset(ann, root, categories=["zebra"])


def test_lvis_format_and_fsspec_urls(coco):
    import fsspec
    tmp, ann, root = coco
    data = load_json(ann)
    for img in data["images"]:  # LVIS v1 names images by coco_url only
        img["coco_url"] = f"http://images.cocodataset.org/images/{img.pop('file_name')}"
        img["not_exhaustive_category_ids"], img["neg_category_ids"] = [], []
    for c in data["categories"]:
        c["frequency"] = "f"
    fs = fsspec.filesystem("memory")
    with fs.open("/lvis/ann.json", "w") as f:
        json.dump(data, f)
    for name in os.listdir(root):
        fs.pipe(f"/lvis/images/{name}", open(os.path.join(root, name), "rb").read())
    ds = load_detection_dataset("memory://lvis/ann.json", "memory://lvis", fmt="lvis")
    assert len(ds.records) == 4 and ds.skipped.total == 0
    assert ds.records[0].file == "memory://lvis/images/000000.jpg"
    assert open_image(ds.records[0].file).size == (64, 64)
    with pytest.raises(DatasetError, match="format 'voc' is unknown"):
        load_detection_dataset(ann, root, fmt="voc")
    # The up-front check of the same paths, by URL: the keys named, a file for a folder refused.
    check_dataset("memory://lvis/ann.json", "memory://lvis/images", ("a", "r"))
    with pytest.raises(DatasetError, match="r 'memory://lvis/imgs' does not exist"):
        check_dataset("memory://lvis/ann.json", "memory://lvis/imgs", ("a", "r"))
    with pytest.raises(DatasetError, match="a 'memory://lvis/images' is a folder"):
        check_dataset("memory://lvis/images", "", ("a", "r"))
    with pytest.raises(DatasetError, match="r 'memory://lvis/ann.json' is a file"):
        check_dataset("memory://lvis/ann.json", "memory://lvis/ann.json", ("a", "r"))


def test_an_image_that_is_not_one_is_named(tmp_path):
    bad = tmp_path / "000001.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(DatasetError, match="000001.jpg' cannot be read as an image .* replace it"):
        open_image(str(bad))
    with pytest.raises(DatasetError, match="gone.jpg' cannot be read"):
        open_image(str(tmp_path / "gone.jpg"))
