"""Detector registry, real + synthetic data mixing, augmentation, training on a real local Ray
(Ray Train + DeepSpeed), resume, evaluation, and the trained folder as the generation teacher."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import TrainRunConfig
from engine.config import ConfigError
from engine.evaluation.detector import evaluate_detector, load_trained
from engine.training.detection import (REAL, SYNTHETIC, DetectionDataError, augment, epoch_items, prepare, to_target,
                                      train_detector)
from engine.config import DetectorConfig
from engine.models.detectors import (DETECTORS, DetectorError, ProjectMSDeformAttn, build_detector, uses_project_attention)
from engine.data.shards import ShardError, ShardStore
from fixtures_coco import draw_image, make_coco_dataset

CATS = ["red square", "blue disc"]


# --------------------------------------------------------------------------------------------
# Fixtures


def make_shards(path, n_shards: int, per_shard: int, labels=("red square", "blue disc"), size: int = 64,
                unboxed=()) -> str:
    """Synthetic shards as the generate job writes them: jpg, step T-1 latent, JSON record. The
    samples numbered in `unboxed` carry no box: the labeller missed their prompted object."""
    store = ShardStore(str(path))
    claim = store.prepare({"fingerprint": "test", "categories": list(labels)})
    side = size // 3
    for s in range(n_shards):
        samples = []
        for k in range(per_shard):
            pid = s * per_shard + k
            label = labels[pid % len(labels)]
            x0 = (pid % 2) * (size - side)
            box = [float(x0), 8.0, float(x0 + side), float(8 + side)]
            tmp = os.path.join(str(path), "tmp.jpg")
            draw_image(tmp, size, [(CATS.index(label) if label in CATS else 2, box)])
            latent = io.BytesIO()
            np.save(latent, np.zeros((4, size // 8, size // 8), np.float32))
            boxed = pid not in unboxed
            record = {"id": pid, "prompt": f"a photograph of {label}", "categories": [label], "seed": pid,
                      "width": size, "height": size, "boxes": [box] * boxed, "labels": [label] * boxed,
                      "scores": [0.9] * boxed, "labellers": ["detector"] * boxed}
            samples.append({"__key__": f"{pid:09d}", "jpg": open(tmp, "rb").read(),
                            "latent.npy": latent.getvalue(), "json": json.dumps(record)})
            os.remove(tmp)
        store.write_shard(s, samples, [], claim)
    return str(path)


def base_config(tmp_path, **kw) -> DetectorConfig:
    ann, root = make_coco_dataset(tmp_path / "real", n_images=kw.pop("n_real", 8), categories=CATS)
    run = TrainRunConfig(storage_path=str(tmp_path / "runs"), name="detector", checkpoint_every=5, max_failures=0)
    cfg = DetectorConfig(real_annotations=ann, real_image_root=root, output_dir=str(tmp_path / "detector"),
                         eval_annotations=ann, eval_image_root=root, batch_size=4, lr=2e-4, run=run)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


# --------------------------------------------------------------------------------------------
# Registry


@pytest.mark.parametrize("kind", ["deformable_detr", "detr", "rt_detr"])
def test_registry_builds_each_kind_with_category_labels(kind):
    det = build_detector(kind, "tiny", CATS, image_size=64)
    assert det.model.config.id2label == {0: "red square", 1: "blue disc"}
    x = torch.randn(2, 3, 64, 64)
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])}] * 2
    loss = det.model(pixel_values=x, pixel_mask=torch.ones(2, 64, 64, dtype=torch.long), labels=labels).loss
    assert torch.isfinite(loss)
    found = det.predict([Image.new("RGB", (80, 48))], threshold=0.0)
    assert found[0] and all(f["category"] in CATS for f in found[0])
    # Boxes come back in the pixels of the original (80x48) image.
    assert all(-1 <= f["bbox"][0] <= f["bbox"][2] <= 81 and -1 <= f["bbox"][1] <= f["bbox"][3] <= 49 for f in found[0])


def torchvision_imports() -> bool:
    try:
        import torchvision.models.detection  # noqa: F401
        return True
    except Exception:  # the CUDA wheels fail in many ways on a CPU torch
        return False


def test_registry_errors_are_clear(tmp_path):
    if torchvision_imports():  # a CUDA host: the paper's Faster R-CNN builds
        assert build_detector("faster_rcnn", "tiny", CATS).kind == "faster_rcnn"
    else:
        with pytest.raises(DetectorError, match="torchvision is not importable on this host"):
            build_detector("faster_rcnn", "tiny", CATS)
    with pytest.raises(DetectorError, match="unknown; choose one of"):
        build_detector("yolo", "tiny", CATS)
    with pytest.raises(DetectorError, match="not a local folder"):
        build_detector("deformable_detr", str(tmp_path / "nope"), CATS)
    with pytest.raises(DetectorError, match="no multi-scale deformable attention"):
        build_detector("detr", "tiny", CATS, attention="project_op")
    assert {"deformable_detr", "detr", "rt_detr", "faster_rcnn"} <= set(DETECTORS)


@pytest.mark.parametrize("kind", ["deformable_detr", "rt_detr"])
def test_project_op_matches_reference_attention(kind):
    ref = build_detector(kind, "tiny", CATS, 64).model.eval()
    ours = build_detector(kind, "tiny", CATS, 64, attention="project_op").model.eval()
    assert uses_project_attention(ours) and not uses_project_attention(ref)
    assert sum(isinstance(m, ProjectMSDeformAttn) for m in ours.modules()) >= 1
    torch.manual_seed(1)
    x, mask = torch.randn(2, 3, 64, 64), torch.ones(2, 64, 64, dtype=torch.long)
    mask[1, :, 40:] = 0  # padding exercises masked values
    a, b = ref(pixel_values=x, pixel_mask=mask), ours(pixel_values=x, pixel_mask=mask)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.pred_boxes, b.pred_boxes, atol=1e-4, rtol=1e-4)
    # Gradients flow through the op to the sampling offsets.
    ours.train()
    labels = [{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    ours(pixel_values=x, pixel_mask=mask, labels=labels).loss.backward()
    grads = [p.grad for n, p in ours.named_parameters() if "sampling_offsets" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------------------------
# Augmentation


def test_flip_and_resize_move_a_known_box():
    img = Image.new("RGB", (100, 50), (0, 0, 0))
    img.paste((255, 0, 0), (10, 5, 30, 25))  # box [10, 5, 30, 25]
    # Resize only: longer side 100 -> 64, factor 0.64.
    px, mask, boxes, labels, valid = augment(img, [[10, 5, 30, 25]], ["a"], 64, 1.0, flip=False)
    assert valid == (64, 32) and mask[:32, :64].all() and not mask[32:].any()
    np.testing.assert_allclose(boxes[0], [6.4, 3.2, 19.2, 16.0], atol=1e-6)
    # Flip: x -> 64 - x, by hand: [64 - 19.2, 3.2, 64 - 6.4, 16.0].
    px, mask, boxes, labels, valid = augment(img, [[10, 5, 30, 25]], ["a"], 64, 1.0, flip=True)
    np.testing.assert_allclose(boxes[0], [44.8, 3.2, 57.6, 16.0], atol=1e-6)
    red = np.argwhere(px[..., 0] > 128)
    assert abs(red[:, 1].min() - 44.8) <= 1.5 and abs(red[:, 1].max() + 1 - 57.6) <= 1.5
    # Targets: (cx, cy, w, h) over the valid region.
    np.testing.assert_allclose(to_target(boxes, valid)[0], [51.2 / 64, 9.6 / 32, 12.8 / 64, 12.8 / 32], atol=1e-6)


def test_scale_jitter_crops_and_drops_boxes_outside():
    img = Image.new("RGB", (64, 64))
    # Scale 2: the image is 128 px; crop at the far corner (crop_xy=(1,1)) keeps [64, 128).
    _, mask, boxes, labels, valid = augment(img, [[0, 0, 10, 10], [40, 40, 60, 60]], ["a", "b"], 64, 2.0,
                                            flip=False, crop_xy=(1.0, 1.0))
    assert labels == ["b"] and valid == (64, 64) and mask.all()
    np.testing.assert_allclose(boxes[0], [16, 16, 56, 56])
    # RT-DETR style: squash to a square, no padding.
    _, mask, boxes, _, valid = augment(Image.new("RGB", (100, 50)), [[0, 0, 50, 50]], ["a"], 64, 1.0, False,
                                       keep_aspect=False)
    assert valid == (64, 64) and mask.all()
    np.testing.assert_allclose(boxes[0], [0, 0, 32, 64])


# --------------------------------------------------------------------------------------------
# Data: mixing and bad input


def test_mixing_plan_honours_the_ratio(tmp_path):
    shards = make_shards(tmp_path / "syn", n_shards=2, per_shard=5)
    cfg = base_config(tmp_path, synthetic=[shards], mix_ratio=0.5, n_real=8, batch_size=2)
    categories, plan = prepare(cfg)
    assert categories == CATS
    assert plan.counts == {REAL: 8, SYNTHETIC: 8} and plan.steps_per_epoch == 8
    assert sorted(r["id"] for r in plan.real) == list(range(100, 108))  # every real image once
    cfg.mix_ratio, cfg.samples_per_epoch = 0.25, 24
    _, plan = prepare(cfg)
    assert plan.counts == {REAL: 18, SYNTHETIC: 6}  # 8 real images repeated, 6 of 10 synthetic
    keys = [k for ks in plan.synthetic.values() for k in ks]
    assert len(set(keys)) == 6
    cfg.mix_ratio, cfg.samples_per_epoch, cfg.batch_size = 1.0, 0, 4
    cfg.categories = CATS
    _, plan = prepare(cfg)
    assert plan.counts == {REAL: 0, SYNTHETIC: 8}  # 10 samples, whole batches of 4
    # The stream itself (counted by the trainer, by source) is checked in the training test.


def test_each_epoch_deals_every_planned_sample_once_in_a_seeded_order(tmp_path):
    shards = make_shards(tmp_path / "syn", n_shards=2, per_shard=5)
    cfg = base_config(tmp_path, synthetic=[shards], mix_ratio=0.5, n_real=8, batch_size=2, samples_per_epoch=24)
    cfg.run.num_workers = 2
    _, plan = prepare(cfg)

    def rows(items):  # (source, sample, seed) of one worker's items, in order
        out = []
        for item in items:
            for r in json.loads(item["rows"]):
                out.append(("real", r["file"], r["seed"]) if not item["url"] else (item["url"], r[0], r[1]))
        return out

    first = [rows(w) for w in epoch_items(cfg, plan, 0, 2)]
    assert len(first[0]) == len(first[1]) == 12  # the same number on every worker: lock-step steps
    planned = sorted([("real", r["file"]) for r in plan.real] + [(u, k) for u, ks in plan.synthetic.items() for k in ks])
    assert sorted((s, x) for w in first for s, x, _ in w) == planned
    assert [rows(w) for w in epoch_items(cfg, plan, 0, 2)] == first  # the same seed and epoch: the same
    second = [rows(w) for w in epoch_items(cfg, plan, 1, 2)]
    assert sorted((s, x) for w in second for s, x, _ in w) == planned and second != first
    assert not {r[2] for w in first for r in w} & {r[2] for w in second for r in w}  # augmentation draws afresh
    cfg.seed = 1
    assert [rows(w) for w in epoch_items(cfg, plan, 0, 2)] != first


def test_complete_only_leaves_out_images_with_an_unboxed_prompted_object(tmp_path):
    shards = make_shards(tmp_path / "syn", n_shards=2, per_shard=5, unboxed=(1, 2, 7))
    cfg = base_config(tmp_path, synthetic=[shards], mix_ratio=1.0, categories=CATS, batch_size=1)
    _, plan = prepare(cfg)
    assert plan.counts[SYNTHETIC] == 10  # by default every image, boxed or not
    cfg.synthetic_complete_only = True
    _, plan = prepare(cfg)
    keys = sorted(k for ks in plan.synthetic.values() for k in ks)
    assert keys == [f"{i:09d}" for i in (0, 3, 4, 5, 6, 8, 9)]
    none = make_shards(tmp_path / "none", n_shards=1, per_shard=2, unboxed=(0, 1))
    cfg.synthetic = [none]
    with pytest.raises(DetectionDataError, match="no image has a box for every prompted category"):
        prepare(cfg)


def test_disagreeing_categories_and_empty_shards_are_named(tmp_path):
    bad = make_shards(tmp_path / "bad", 1, 2, labels=("red square", "green triangle"))
    cfg = base_config(tmp_path, synthetic=[bad])
    with pytest.raises(DetectionDataError, match="synthetic category 'green triangle' is not one of the detector"):
        prepare(cfg)
    empty = tmp_path / "empty"
    ShardStore(str(empty)).prepare({"fingerprint": "x", "categories": CATS})
    cfg.synthetic = [str(empty)]
    with pytest.raises(ShardError, match="detector.synthetic .* holds no output of `instagen generate`"):
        prepare(cfg)
    dropped = tmp_path / "dropped"
    store = ShardStore(str(dropped))
    claim = store.prepare({"fingerprint": "x", "categories": CATS})
    store.write_shard(0, [], [0, 1], claim)  # as generate writes it: the first shard claims the output
    cfg.synthetic = [str(dropped)]
    with pytest.raises(DetectionDataError, match="hold no usable samples .every prompt was dropped"):
        prepare(cfg)
    with pytest.raises(ConfigError, match="names no shard path"):
        prepare(base_config(tmp_path / "b", mix_ratio=0.5))
    with pytest.raises(ConfigError, match="mix_ratio must lie"):
        prepare(base_config(tmp_path / "c", mix_ratio=1.5))


# --------------------------------------------------------------------------------------------
# Training, resume, evaluation, teacher


@pytest.fixture(scope="module")
def trained(local_ray, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    # 6 synthetic samples fill 8 synthetic slots per epoch: the stream must repeat two.
    shards = make_shards(tmp / "syn", n_shards=2, per_shard=3)
    cfg = base_config(tmp, synthetic=[shards], mix_ratio=0.5, n_real=8, epochs=2, lr=1e-3)
    summary = train_detector(cfg)
    return cfg, summary


def test_training_loss_is_finite_and_falls(trained):
    cfg, summary = trained
    assert summary.steps == 8 and len(summary.metrics["losses"]) == 8  # 2 epochs x 16 samples / batch 4
    losses = np.array(summary.metrics["losses"])
    assert np.isfinite(losses).all()
    assert losses[-2:].mean() < losses[:2].mean()
    # Every epoch's stream really held half real, half synthetic samples (counted by the workers).
    assert [(e[REAL], e[SYNTHETIC]) for e in summary.metrics["epochs"]] == [(8, 8)] * 2
    saved = os.listdir(cfg.output_dir)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "training.json"} <= set(saved)


def test_the_same_config_and_seed_train_the_same_weights(trained, tmp_path):
    # Two runs of one config (own storage): the same batches, augmentations and initial weights, so
    # the same losses and weights, bit for bit (one worker on the CPU; the reductions of several
    # workers' gradients may sum in another order).
    from safetensors.torch import load_file
    cfg, summary = trained
    again = DetectorConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "again"),
                              "run": TrainRunConfig(**{**cfg.run.__dict__, "storage_path": str(tmp_path / "runs")})})
    repeat = train_detector(again)
    assert repeat.metrics["losses"] == summary.metrics["losses"]
    a, b = load_file(os.path.join(cfg.output_dir, "model.safetensors")), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rerun_resumes_from_the_checkpoint(trained, tmp_path):
    cfg, summary = trained
    # Same storage_path/name, one more epoch: continues at step 8, keeps the loss history.
    cfg2 = DetectorConfig(**{**cfg.__dict__, "epochs": 3, "output_dir": str(tmp_path / "det2")})
    resumed = train_detector(cfg2)
    assert resumed.steps == 12 and resumed.metrics["losses"][:8] == summary.metrics["losses"]
    assert len(resumed.metrics["losses"]) == 12
    assert len(resumed.metrics["epochs"]) == 3


def test_evaluation_writes_results_report_and_png(trained, tmp_path):
    from engine.evaluation.metrics import evaluate_coco, load_detections
    cfg, _ = trained
    cfg.base, cfg.novel = ["red square"], ["blue disc"]
    metrics = evaluate_detector(cfg, out_dir=str(tmp_path / "eval"))
    out = tmp_path / "eval"
    assert {"detections.json", "report.json", "report.md", "predictions.png"} <= set(os.listdir(out))
    dets = load_detections(out / "detections.json")
    assert dets and {d["category_id"] for d in dets} <= {1, 3}  # GT ids, not detector indices
    again = evaluate_coco(cfg.eval_annotations, str(out / "detections.json"), base=cfg.base, novel=cfg.novel)
    assert again["AP50"] == metrics["AP50"] and "AP50_novel" in metrics
    assert json.loads((out / "report.json").read_text())["num_detections"] == len(dets)
    assert Image.open(out / "predictions.png").size[0] > 0


def test_evaluation_inputs_are_checked_before_anything_is_written(tmp_path):
    """Without Ray: a saved (untrained) detector evaluates whole; an image the ground truth lists
    but the image root lacks is one error before a prediction is made or a file written."""
    cfg = base_config(tmp_path)
    build_detector(cfg.kind, cfg.model, CATS, cfg.image_size, "reference", cfg.tiny).save(cfg.output_dir)
    metrics = evaluate_detector(cfg, out_dir=str(tmp_path / "eval"))
    assert {"detections.json", "report.json", "report.md", "predictions.png"} <= set(os.listdir(tmp_path / "eval"))
    assert metrics["num_images"] == 8
    os.remove(os.path.join(cfg.eval_image_root, "000003.jpg"))
    with pytest.raises(DetectionDataError, match="1 image.s. listed in detector.eval_annotations are missing"):
        evaluate_detector(cfg, out_dir=str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()

def test_trained_folder_is_the_generation_teacher(trained):
    from engine.generation.annotation import build_labeller
    from engine.config import AnnotationConfig
    cfg, _ = trained
    labeller = build_labeller(AnnotationConfig(labeller="detector", model=cfg.output_dir, alpha=0.0), CATS)
    image = np.asarray(Image.open(os.path.join(cfg.real_image_root, "000000.jpg")).convert("RGB"))
    found = labeller.label([image], [CATS])[0]
    assert found and all(f["category"] in CATS for f in found)
    # No object boxed twice: a duplicate would be a wrong label for whatever trains on these.
    from engine.models.boxes import box_iou
    for cat in CATS:
        boxes = torch.tensor([f["bbox"] for f in found if f["category"] == cat]).reshape(-1, 4)
        assert (box_iou(boxes, boxes).triu(1) <= 0.7).all()
    every = build_labeller(AnnotationConfig(labeller="detector", model=cfg.output_dir, alpha=0.0, nms_iou=1.0),
                           CATS).label([image], [CATS])[0]
    assert len(every) > len(found)
    # The same weights load back for evaluation with the project's attention op.
    det = load_trained(cfg, attention="project_op")
    assert det.categories == CATS and uses_project_attention(det.model)


def test_labeller_nms_keeps_the_best_box_of_each_object_per_category():
    from engine.generation.annotation import per_category_nms
    boxes = [{"bbox": [0, 0, 10, 10], "category": "a", "score": 0.5},
             {"bbox": [1, 0, 11, 10], "category": "a", "score": 0.9},   # same object, better score
             {"bbox": [1, 0, 11, 10], "category": "b", "score": 0.3},   # another category keeps its box
             {"bbox": [30, 30, 40, 40], "category": "a", "score": 0.2}]  # another object
    assert [(b["category"], b["score"]) for b in per_category_nms(boxes, 0.7)] == [("a", 0.9), ("b", 0.3), ("a", 0.2)]
    assert len(per_category_nms(boxes, 1.0)) == 4
    # At most one box per category: the second object of "a" goes, "b" keeps its box.
    assert [(b["category"], b["score"]) for b in per_category_nms(boxes, 0.7, per_category=1)] == [("a", 0.9), ("b", 0.3)]
    assert [b["score"] for b in per_category_nms(boxes, 1.0, per_category=2)] == [0.9, 0.5, 0.3]


def test_job_reports_bad_config_in_one_line(tmp_path, capsys):
    import yaml

    from jobs.train_detector import main
    ann, root = make_coco_dataset(tmp_path / "real", n_images=2, categories=CATS)
    path = tmp_path / "det.yaml"
    path.write_text(yaml.safe_dump({"detector": {"real_annotations": ann, "real_image_root": root,
                                                 "mix_ratio": 0.5}}))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "detector.synthetic" in err and "\n" not in err
    assert main(["--config", str(path), "detector.kind=yolo"]) == 2
    assert "detector.kind 'yolo' is unknown" in capsys.readouterr().err


def test_ema_weights_are_the_saved_detector(local_ray, tmp_path):
    # With detector.ema the saved detector is the average the checkpoint holds, not the last step's
    # weights; the average is carried in each checkpoint, so a resumed run continues it.
    from safetensors.torch import load_file
    # A run begun without the average (1 epoch), resumed with it (2), resumed again (3): the average
    # starts at the restored weights, then is read back from the checkpoint.
    cfg = base_config(tmp_path, n_real=8, epochs=1, lr=1e-3, mix_ratio=0.0)
    train_detector(cfg)
    for epochs in (2, 3):
        cfg = DetectorConfig(**{**cfg.__dict__, "epochs": epochs, "ema": True, "ema_decay": 0.9})
        summary = train_detector(cfg)
    assert summary.steps == 6  # 2 steps an epoch (8 real images, batch 4)
    ema, last = (load_file(os.path.join(summary.checkpoint, f)) for f in ("ema.safetensors", "model.safetensors"))
    saved = dict(load_trained(cfg).model.named_parameters())  # the folder as generation and evaluation load it
    assert ema.keys() == saved.keys() and all(torch.equal(saved[k], ema[k]) for k in ema)
    assert any(not torch.equal(ema[k], last[k]) for k in ema)
    with pytest.raises(ConfigError, match="detector.ema_decay must lie in"):
        base_config(tmp_path, mix_ratio=0.0, ema_decay=1.0).validate()


def test_shuffled_batches_depend_on_the_rows_and_seed_alone():
    # The same 50 rows arriving in batches of 3 or of 7 (as a stream's timing might deal them): the
    # same shuffled batches. Every row at most once, the 2 that a short batch would hold left out.
    from engine.training.detection import shuffled_batches
    rows = np.arange(50)

    def stream(size):
        return ({"x": rows[i:i + size], "s": np.array([f"r{v}" for v in rows[i:i + size]])} for i in range(0, 50, size))
    a, b = (list(shuffled_batches(stream(n), 4, 16, seed=7)) for n in (3, 7))
    assert len(a) == 12 and all(np.array_equal(p["x"], q["x"]) and list(p["s"]) == list(q["s"]) for p, q in zip(a, b))
    drawn = np.concatenate([p["x"] for p in a])
    assert len(set(drawn.tolist())) == 48 and list(a[0]["s"]) == [f"r{v}" for v in a[0]["x"]]
    assert not np.array_equal(drawn, np.sort(drawn))  # mixed, not passed through
    other = np.concatenate([p["x"] for p in shuffled_batches(stream(3), 4, 16, seed=8)])
    assert not np.array_equal(drawn, other)
