"""SD fine-tuning: crop and prompt logic on hand-made cases, config errors before training, and a
real run (two Ray Train workers, DeepSpeed ZeRO-2 on CPU over gloo, tiny SD) that trains,
checkpoints, survives a worker crash, resumes at the saved step and writes a pipeline the
generation stage draws with."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

from engine.config import ModelConfig, PromptConfig, RayConfig, SynthesisConfig
from engine.data.datasets import ImageRecord, SkipReport
from engine.config import Config, FinetuneConfig, TrainRunConfig
from engine.training.finetune import (NO_LAYOUT, NO_OBJECT, TOO_SMALL, crop_names, crop_scale, decode_crops, make_prompt, plan_crop, plan_samples, prepare, visible_fraction)
from conftest import ray_with_env
from fixtures_coco import load_json, make_coco_dataset, write_json

# ---------------------------------------------------------------------------------------------
# Crops and prompts


def test_object_fully_inside_counts():
    assert visible_fraction([10, 10, 20, 20], 0, 0, 32) == 1.0
    assert crop_names([[10, 10, 20, 20]], ["dog"], 0, 0, 32, 0.5) == ["dog"]


def test_cut_object_counts_only_above_threshold():
    # Box 20 wide, crop ends at x=32: 12/20 = 0.6 visible.
    box = [20, 0, 40, 10]
    assert visible_fraction(box, 0, 0, 32) == pytest.approx(0.6)
    assert crop_names([box], ["cat"], 0, 0, 32, 0.5) == ["cat"]
    assert crop_names([box], ["cat"], 0, 0, 32, 0.7) == []
    # Wholly outside.
    assert crop_names([[40, 40, 50, 50]], ["cat"], 0, 0, 32, 0.01) == []


def test_each_category_named_once_most_visible_first():
    boxes = [[0, 0, 4, 4], [5, 5, 9, 9], [10, 10, 30, 30], [0, 20, 8, 28], [30, 0, 60, 20]]
    labels = ["dog", "dog", "person", "dog", "car"]  # car is cut below threshold
    names = crop_names(boxes, labels, 0, 0, 32, 0.5)
    assert names == ["person", "dog"]
    assert make_prompt(names, "a photograph of {categories}") == "a photograph of person and dog"
    assert make_prompt(names, "a photograph of {categories}", "a {name}") == "a photograph of a person and a dog"


def test_plan_crop_finds_small_objects_and_gives_up_on_huge_ones():
    # A small dog in a corner of a large image: uniform crops rarely hold it, the anchored
    # fallback always does.
    rec = ImageRecord(1, "x.jpg", 100, 100, [[0, 0, 10, 10]], ["dog"])
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = plan_crop(rec, 32, 0.5, 1.0, rng, max_redraws=0)
        assert c is not None and c.names == ["dog"]
        assert visible_fraction([0, 0, 10, 10], c.x0, c.y0, 32) == 1.0
        assert 0 <= c.x0 <= 100 - 32 and 0 <= c.y0 <= 100 - 32
    # A bus filling a 100x100 image: a 32x32 crop shows at most 10% of it, never 50%.
    bus = ImageRecord(2, "y.jpg", 100, 100, [[0, 0, 100, 100]], ["bus"])
    assert plan_crop(bus, 32, 0.5, 1.0, rng, max_redraws=5) is None
    assert plan_crop(bus, 32, 0.1, 1.0, rng, max_redraws=5).names == ["bus"]


def test_small_images_upscaled_within_limit():
    assert crop_scale(640, 480, 512, 1.25) == pytest.approx(512 / 480)
    assert crop_scale(640, 300, 512, 1.25) is None
    assert crop_scale(64, 64, 32, 1.0) == 1.0
    rec = ImageRecord(1, "x.jpg", 60, 40, [[0, 0, 40, 40]], ["dog"])
    c = plan_crop(rec, 48, 0.5, 1.25, np.random.default_rng(0), 5)
    assert c.scale == pytest.approx(1.2) and c.x0 + 48 <= math.ceil(60 * 1.2) and c.y0 == 0


def test_plan_samples_counts_skips():
    fc = FinetuneConfig(crop_size=32, min_visible_fraction=0.9, max_redraws=0, seed=1)
    small = ImageRecord(1, "small.jpg", 16, 16, [[0, 0, 8, 8]], ["dog"])
    sparse = ImageRecord(2, "sparse.jpg", 200, 200, [[0, 0, 150, 150]], ["dog"])  # never 90% inside
    fits = ImageRecord(3, "fits.jpg", 32, 32, [[4, 4, 20, 20]], ["cat"])
    skipped = SkipReport()
    rows = plan_samples([small, sparse, fits], fc, 10, skipped)
    assert len(rows) == 10 and skipped.counts[TOO_SMALL] == 1 and skipped.counts[NO_OBJECT] >= 1
    assert {r["prompt"] for r in rows} <= {"a photograph of cat"}


def test_decode_crops_marks_bad_images(tmp_path):
    ann, root = make_coco_dataset(tmp_path, n_images=1, size=64)
    good = os.path.join(root, "000000.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(open(good, "rb").read()[:300])
    out = decode_crops({"file": np.array([good, str(bad), str(tmp_path / "gone.jpg")]),
                        "x0": np.array([16, 0, 0]), "y0": np.array([0, 0, 0]), "scale": np.array([1.0, 1.0, 1.0]),
                        "prompt": np.array(["a", "b", "c"])}, size=32)
    assert out["ok"].tolist() == [True, False, False]
    assert out["reason"].tolist() == ["", "corrupt image", "missing image"]
    # The crop at x0=16 starts inside the blue disc drawn at x 25..44 (cell 21 wide, side 16).
    assert out["pixels"].shape == (3, 32, 32, 3) and out["pixels"][0].std() > 10


# ---------------------------------------------------------------------------------------------
# Impossible configs fail before training


RUN_KEYS = {f.name for f in dataclasses.fields(TrainRunConfig)}


def _cfg(tmp_path, ann, root, **ft) -> Config:
    """A small fine-tuning config; keys of its `run` section may be given among the others."""
    run = dict(num_workers=2, cpus_per_worker=0.5, zero_stage=2, checkpoint_every=2,
               storage_path=str(tmp_path / "ray"), name="run")
    run.update({k: ft.pop(k) for k in list(ft) if k in RUN_KEYS})
    fields = dict(annotations=ann, image_root=root, crop_size=32, max_steps=4, warmup_steps=1, batch_size=2,
                  lr=1e-3, output_dir=str(tmp_path / "pipeline"), run=TrainRunConfig(**run))
    fields.update(ft)
    return Config(prompts=PromptConfig(base=["red square", "blue disc"]), ray=RayConfig(num_cpus=2),
                  finetune=FinetuneConfig(**fields))


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coco")
    return (tmp, *make_coco_dataset(tmp, n_images=6, categories=["red square", "blue disc", "green square"]))


@pytest.mark.parametrize("change, match", [
    ({"crop_size": 128}, "larger than every base-category image"),
    ({"batch_size": 4}, "more than the 6 usable"),
    ({"base": ["zebra"]}, "not among the dataset's categories"),
    ({"template": "no placeholder"}, "must contain"),
    ({"min_visible_fraction": 0.0}, "min_visible_fraction"),
    ({"zero_stage": 3}, "zero_stage"),
    ({"captions": "also.json"}, "exactly one of finetune.annotations"),
    ({"train": "text_encoder"}, "finetune.train must be unet, vae, decoder or gligen"),
    ({"train": "gligen", "annotations": "", "captions": "c.json"}, "finetune.train=gligen learns boxes"),
])
def test_impossible_config_is_clear_error(coco, change, match):
    tmp, ann, root = coco
    with pytest.raises(ValueError, match=match):
        prepare(_cfg(tmp, ann, root, **change))


def test_no_base_images_is_clear_error(coco):
    tmp, ann, root = coco
    data = load_json(ann)
    green = next(c["id"] for c in data["categories"] if c["name"] == "green square")
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] == green]
    path = str(tmp / "only_green.json")
    write_json(path, data)
    with pytest.raises(ValueError, match="no image .* holds a base category"):
        prepare(_cfg(tmp, path, root))


def test_captions_plan_whole_images_and_skip_malformed_entries(coco):
    tmp, ann, root = coco
    data = load_json(ann)
    images = data["images"][:3]
    captions = [{"id": i, "image_id": im["id"], "caption": f"a photograph of thing {i}"} for i, im in enumerate(images)]
    captions += [{"id": 98, "image_id": 12345, "caption": "no such image"}, {"id": 99, "image_id": images[0]["id"]}]
    path = str(tmp / "captions.json")
    write_json(path, {"images": images, "annotations": captions})
    fc, rows, skipped, n_images = prepare(_cfg(tmp, "", root, captions=path, num_workers=1, max_steps=3))
    assert n_images == 3 and len(rows) >= 3 * 2
    assert {r["prompt"] for r in rows} == {c["caption"] for c in captions[:3]}
    assert skipped.counts["malformed entry"] == 2
    # Scaled so the short side is crop_size, centre-cut: the caption still describes the crop.
    by_file = {os.path.basename(r["file"]): r for r in rows}
    for im in images:
        r = by_file[im["file_name"]]
        assert r["scale"] == pytest.approx(32 / min(im["width"], im["height"]))
    write_json(path, {"images": images})
    with pytest.raises(ValueError, match="COCO captions format"):
        prepare(_cfg(tmp, "", root, captions=path))


def test_gligen_rows_carry_each_whole_image_with_its_boxes(coco):
    """GLIGEN learns where things are: each row is a whole image (scaled, centre-cut) with its
    base-category boxes in [0, 1] and their names; a dropped row has neither caption nor boxes."""
    tmp, ann, root = coco
    fc, rows, _, _ = prepare(_cfg(tmp, ann, root, train="gligen", num_workers=1, caption_dropout=0.5))
    data = load_json(ann)
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {im["id"]: im["file_name"] for im in data["images"]}
    truth: dict = {}
    for a in data["annotations"]:
        if names[a["category_id"]] in ("red square", "blue disc"):
            x, y, w, h = a["bbox"]  # 64-pixel images, crop_size 32: the whole image at half size
            truth.setdefault(files[a["image_id"]], []).append((names[a["category_id"]], [x / 64, y / 64, (x + w) / 64, (y + h) / 64]))
    for r in rows:
        layout = json.loads(r["layout"])
        if not r["prompt"]:
            assert layout == {"boxes": [], "labels": []}
            continue
        assert sorted(zip(layout["labels"], layout["boxes"])) == sorted(truth[os.path.basename(r["file"])])
        assert r["prompt"] == make_prompt(list(dict.fromkeys(layout["labels"])), fc.template)
        assert r["scale"] == 0.5 and r["x0"] == r["y0"] == 0
    assert any(not r["prompt"] for r in rows) and any(r["prompt"] for r in rows)


def test_boxes_only_rows_keep_their_boxes_without_a_caption(coco):
    """GLIGEN learns to draw from its boxes when some rows give it nothing else: boxes_only empties
    the caption of a seeded fraction beside caption_dropout's rows, which lose both."""
    tmp, ann, root = coco
    kw = dict(train="gligen", num_workers=1, max_steps=200, batch_size=2)
    _, kept, _, _ = prepare(_cfg(tmp, ann, root, **kw))
    _, rows, _, _ = prepare(_cfg(tmp, ann, root, caption_dropout=0.2, boxes_only=0.4, **kw))
    both = [r["prompt"] == "" and r["layout"] == NO_LAYOUT for r in rows]
    boxes = [r["prompt"] == "" and r["layout"] != NO_LAYOUT for r in rows]
    assert 0.14 < np.mean(both) < 0.26 and 0.33 < np.mean(boxes) < 0.47
    assert all(r["layout"] == k["layout"] for r, k, b in zip(rows, kept, both) if not b)
    # Inpainting redraws inside the boxes also for guidance's unconditional rows: they keep them as holes.
    _, holed, _, _ = prepare(_cfg(tmp, ann, root, caption_dropout=0.2, boxes_only=0.4, inpaint=True, **kw))
    for r, h, k, b in zip(rows, holed, kept, both):
        assert h == r if not b else json.loads(h["layout"]) == {"boxes": [], "labels": [], "holes": json.loads(k["layout"])["boxes"]}
    with pytest.raises(ValueError, match="finetune.inpaint makes a GLIGEN inpainting model"):
        prepare(_cfg(tmp, ann, root, inpaint=True, num_workers=1))
    with pytest.raises(ValueError, match="boxes_only keeps the boxes"):
        prepare(_cfg(tmp, ann, root, boxes_only=0.5, num_workers=1))
    with pytest.raises(ValueError, match="caption_dropout \\+ boxes_only below 1"):
        prepare(_cfg(tmp, ann, root, caption_dropout=0.5, boxes_only=0.5, **kw))
    with pytest.raises(ValueError, match="finetune.gate"):
        prepare(_cfg(tmp, ann, root, gate=-0.1, **kw))


def test_caption_dropout_empties_a_seeded_fraction_of_prompts(coco):
    # Classifier-free guidance pushes away from the empty prompt's prediction: a generator trained
    # from scratch only has one if some training prompts were empty.
    tmp, ann, root = coco
    kw = dict(num_workers=1, max_steps=200, batch_size=2)
    _, kept, _, _ = prepare(_cfg(tmp, ann, root, **kw))
    _, rows, _, _ = prepare(_cfg(tmp, ann, root, caption_dropout=0.25, **kw))
    _, again, _, _ = prepare(_cfg(tmp, ann, root, caption_dropout=0.25, **kw))
    assert "" not in {r["prompt"] for r in kept}
    empty = [r["prompt"] == "" for r in rows]
    assert 0.18 < np.mean(empty) < 0.32 and rows == again  # the same prompts on a rerun
    # Only the prompt changes: the crops are those of the run without dropout.
    assert [{**r, "prompt": ""} for r in rows] == [{**r, "prompt": ""} for r in kept]
    with pytest.raises(ValueError, match="caption_dropout must lie in"):
        prepare(_cfg(tmp, ann, root, caption_dropout=1.0, **kw))


def test_replay_mixes_a_seeded_share_of_old_captions_into_the_crops(coco):
    # Fine-tuning on base crops alone made the toy world's generator forget its novel categories;
    # replay keeps a share of the pretraining captions in every stretch of training.
    tmp, ann, root = coco
    images = load_json(ann)["images"][:2]
    path = str(tmp / "replay.json")
    write_json(path, {"images": images, "annotations": [
        {"id": i, "image_id": im["id"], "caption": f"an old caption {i}"} for i, im in enumerate(images)]})
    kw = dict(num_workers=1, max_steps=200, batch_size=2)
    _, crops, _, _ = prepare(_cfg(tmp, ann, root, **kw))
    _, rows, _, _ = prepare(_cfg(tmp, ann, root, replay=0.25, replay_captions=path, replay_image_root=root, **kw))
    _, again, _, _ = prepare(_cfg(tmp, ann, root, replay=0.25, replay_captions=path, replay_image_root=root, **kw))
    old = [r["prompt"].startswith("an old caption") for r in rows]
    assert rows == again and sum(old) == round(0.25 * len(rows))
    assert 0.1 < np.mean(old[: len(rows) // 4]) < 0.4  # spread over the run, not a block at one end
    # Replayed rows are whole pictures (the caption describes all of it); the rest are the crops.
    assert all(os.path.basename(r["file"]) in {im["file_name"] for im in images} for r, o in zip(rows, old) if o)
    assert [r for r, o in zip(rows, old) if not o] == [r for r, o in zip(crops, old) if not o]
    with pytest.raises(ValueError, match="replay needs finetune.replay_captions"):
        prepare(_cfg(tmp, ann, root, replay=0.25, **kw))
    with pytest.raises(ValueError, match="replay must lie in"):
        prepare(_cfg(tmp, ann, root, replay=1.0, replay_captions=path, **kw))


def test_latent_cache_encodes_a_crop_once_and_still_samples_afresh():
    from engine.config import ModelConfig
    from engine.training.finetune import LatentCache
    from engine.models.diffusion import load_pipeline
    vae = load_pipeline(ModelConfig(source="tiny"), device="cpu").vae
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.manual_seed(0)
    with torch.no_grad():
        want = vae.encode(x).latent_dist.sample()
    cache = LatentCache(vae, max_mb=1)
    torch.manual_seed(0)
    torch.testing.assert_close(cache(["a", "b", "c"], x), want)  # what the trainer drew before
    calls = []
    hook = vae.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        torch.manual_seed(1)
        again = cache(["c", "a"], x[:2])  # pixels ignored: the keys say these crops were seen
        assert not calls
        mean = vae.encode(x).latent_dist.mean
        # A fresh draw around the same mean, not the first one replayed.
        assert not torch.allclose(again[1], want[0])
        assert (again - mean[[2, 0]]).abs().mean() < (again - mean[[0, 2]]).abs().mean()
        calls.clear()
        full = LatentCache(vae, max_mb=0)
        full(["a"], x[:1]), full(["a"], x[:1])
        assert len(calls) == 2  # nothing kept beyond the budget
    finally:
        hook.remove()


def test_job_driver_dry_run_and_one_line_errors(coco, capsys):
    from jobs.finetune_sd import main
    tmp, ann, root = coco
    ok = main(["--config", "configs/tiny.yaml", "--dry-run", f"finetune.annotations={ann}",
               f"finetune.image_root={root}", "finetune.crop_size=32", "finetune.max_steps=3", "finetune.warmup_steps=1",
               "prompts.base=[red square, blue disc]"])
    assert ok == 0 and "6 base-category images" in capsys.readouterr().out
    bad = main(["--config", "configs/tiny.yaml", "--dry-run", f"finetune.annotations={tmp / 'nope.json'}"])
    err = capsys.readouterr().err.strip()
    assert bad == 2 and err.startswith("error: finetune.annotations") and "\n" not in err
    assert main(["--config", "configs/tiny.yaml", "--dry-run", "finetune.crop_sise=32"]) == 2
    assert "unknown config key 'finetune.crop_sise'" in capsys.readouterr().err


def test_resuming_a_different_run_is_refused(coco):
    from engine.config import ConfigError
    from engine.training.finetune import _check_same_run
    tmp, ann, root = coco
    cfg = _cfg(tmp, ann, root, name="same")
    _check_same_run(cfg, cfg.finetune, ["red square"])
    _check_same_run(cfg, FinetuneConfig(**{**cfg.finetune.__dict__, "max_steps": 50}), ["red square"])  # may grow
    with pytest.raises(ConfigError, match="set finetune.run.name to a new run name"):
        _check_same_run(cfg, FinetuneConfig(**{**cfg.finetune.__dict__, "crop_size": 64}), ["red square"])


def test_more_workers_than_cluster_is_clear_error():
    from engine.training.runner import TrainingConfigError, check_resources
    from engine.config import TrainRunConfig
    with pytest.raises(TrainingConfigError, match="needs 2.5 CPUs but the Ray cluster has 2"):
        check_resources(TrainRunConfig(num_workers=4, cpus_per_worker=0.5), {"CPU": 2.0})
    with pytest.raises(TrainingConfigError, match="asks for 2 GPUs"):
        check_resources(TrainRunConfig(num_workers=2, use_gpu=True), {"CPU": 8.0, "GPU": 1.0})


# ---------------------------------------------------------------------------------------------
# A real run


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    # The fault injection makes a training worker die once at step 5 (marker file in the fault dir).
    faults = str(tmp_path_factory.mktemp("faults"))
    with ray_with_env({"INSTAGEN_FAULT_CRASH": "finetune:5", "INSTAGEN_FAULT_DIR": faults}):
        yield faults


def test_finetune_trains_checkpoints_resumes_and_generates(tmp_path, ray_cluster):
    from engine.training.finetune import finetune
    from engine.models.diffusion import finetuned_from, load_pipeline
    from engine.generation.synthesis import draw
    from engine.training.runner import read_meta

    ann, root = make_coco_dataset(tmp_path / "data", n_images=6,
                                  categories=["red square", "blue disc", "green square"])
    # A truncated image: counted (by the up-front check) and never reaches a worker.
    broken = os.path.join(root, "000005.jpg")
    data = open(broken, "rb").read()
    with open(broken, "wb") as f:
        f.write(data[: len(data) // 2])

    # Step 5 kills a training worker once: FailureConfig restarts the group, which resumes
    # from a checkpoint (checkpoint_every=2), not from 0: the step-4 one, or the step-2 one when
    # the worker died before Ray Train's controller had collected the step-4 report.
    cfg = _cfg(tmp_path, ann, root, max_steps=6, overfit_batch=True, ema=True, ema_decay=0.9)
    summary = finetune(cfg)
    assert os.path.exists(os.path.join(ray_cluster, "instagen-crashed-finetune"))
    assert summary.steps == 6 and summary.metrics["start_step"] in (2, 4)
    assert summary.metrics["skipped"]["counts"].get("corrupt image") == 1
    assert summary.metrics["images"] == 5
    ckpt = summary.checkpoint
    files = set(os.listdir(ckpt))
    assert {"meta.json", "model.safetensors", "ema.safetensors", "optim-rank0.pt", "optim-rank1.pt"} <= files
    assert read_meta(ckpt)["step"] == 6
    losses = summary.metrics["losses"]  # steps up to the checkpoint from before the crash (kept in it), then after
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[3] < losses[0]  # fixed batch, noise and t: the objective must fall

    # The saved folder is a pipeline the generation stage loads as it is, with the trained UNet.
    pipe = load_pipeline(ModelConfig(source=cfg.finetune.output_dir))
    assert finetuned_from(cfg.finetune.output_dir) == "tiny"  # it names the model it started from
    base = load_pipeline(ModelConfig())
    delta = sum((a - b).abs().sum().item() for a, b in zip(pipe.unet.parameters(), base.unet.parameters()))
    assert delta > 0
    out = draw(pipe, ["a photograph of red square"], [0], SynthesisConfig(height=32, width=32, steps=2))
    assert out.images.shape == (1, 32, 32, 3) and out.finite.all()
    assert not any(n.startswith(".finetune-") for n in os.listdir(tmp_path))  # no temporaries left


def test_gligen_inpainting_trains_the_unet_to_redraw_inside_the_boxes(tmp_path, ray_cluster):
    """finetune.inpaint: the UNet gains the kept image and its mask as inputs and trains whole; the
    saved folder loads as a GLIGEN inpainting pipeline (and is refused for generation) and draws."""
    from engine.generation.layouts import Layout
    from engine.generation.synthesis import draw
    from engine.models.checkpoints import ModelLoadError
    from engine.models.diffusion import load_pipeline
    from engine.training.finetune import finetune

    ann, root = make_coco_dataset(tmp_path / "data", n_images=6, categories=["red square", "blue disc", "green square"])
    cfg = _cfg(tmp_path, ann, root, train="gligen", inpaint=True, gate=0.1, max_steps=4, overfit_batch=True)
    losses = finetune(cfg).metrics["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    out = cfg.finetune.output_dir
    with pytest.raises(ModelLoadError, match="GLIGEN inpainting model"):
        load_pipeline(ModelConfig(source=out), "cpu", layout=True)
    pipe = load_pipeline(ModelConfig(source=out), "cpu", layout=True, inpaint=True)
    base = load_pipeline(ModelConfig(), "cpu")
    w = pipe.unet.conv_in.weight
    assert w.shape[1] == 9 and w[:, 4:].abs().sum() > 0  # it learnt to read the kept image and the mask
    assert not torch.equal(pipe.unet.conv_out.weight, base.unet.conv_out.weight)  # the whole UNet trained
    layout = Layout(((0.25, 0.25, 0.75, 0.75),), ("red square",), {})
    drawn = draw(pipe, ["a photograph of red square"], [0], SynthesisConfig(height=32, width=32, steps=2),
                 [layout], 1.0, torch.zeros(1, 3, 32, 32))
    assert drawn.images.shape == (1, 32, 32, 3) and drawn.finite.all()


def test_decoder_training_keeps_the_latent_space(tmp_path, ray_cluster):
    """finetune.train=decoder: the VAE's decoder learns to draw the images while the encoder, the
    latent scale and the UNet stay as they were, so the pipeline's UNet still fits its latents."""
    from engine.models.diffusion import load_pipeline
    from engine.training.finetune import finetune

    ann, root = make_coco_dataset(tmp_path / "data", n_images=6, categories=["red square", "blue disc", "green square"])
    cfg = _cfg(tmp_path, ann, root, train="decoder", lr=1e-2, max_steps=4, overfit_batch=True, ema=False)
    losses = finetune(cfg).metrics["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    tuned, base = (load_pipeline(ModelConfig(source=s), "cpu") for s in (cfg.finetune.output_dir, "tiny"))
    before, after = base.vae.state_dict(), tuned.vae.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("decoder.", "post_quant_conv.")) for k in moved)
    assert any(k.startswith("post_quant_conv.") for k in moved)
    assert tuned.vae.config.scaling_factor == base.vae.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(tuned.unet.state_dict().values(), base.unet.state_dict().values()))


# ---------------------------------------------------------------------------------------------
# Checkpoint helpers (engine.training.runner) without a cluster


def test_checkpoint_round_trip_restores_weights_optimizer_and_step(tmp_path):
    import torch
    from ray.train import Checkpoint

    from engine.training.runner import latest_checkpoint_step, restore_checkpoint, save_checkpoint

    def make():
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 2)
        return m, torch.optim.AdamW(m.parameters(), lr=0.1)

    m, opt = make()
    for _ in range(3):
        opt.zero_grad()
        m(torch.ones(1, 3)).sum().backward()
        opt.step()
    save_checkpoint(m, 3, {"note": "x"}, str(tmp_path), optimizer=opt, tensors={"ema": {"w": torch.ones(2)}})
    assert latest_checkpoint_step(Checkpoint.from_directory(str(tmp_path))) == 3

    m2, opt2 = make()
    seen = {}
    step = restore_checkpoint(m2, Checkpoint.from_directory(str(tmp_path)), optimizer=opt2,
                              on_load=lambda d, meta: seen.update(meta))
    assert step == 3 and seen["extra"] == {"note": "x"}
    assert torch.equal(m2.weight, m.weight)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_deepspeed_config_rejects_what_cannot_run():
    from engine.training.runner import TrainingConfigError, deepspeed_config
    cfg = deepspeed_config(2, 1e-4, 0.01, 10, 100, bf16=False, grad_accum=2, batch_per_worker=4, clip=1.0)
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["bf16"]["enabled"] is False
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 10 and cfg["train_micro_batch_size_per_gpu"] == 4
    with pytest.raises(TrainingConfigError, match="zero_stage"):
        deepspeed_config(3, 1e-4, 0.0, 1, 10, False)
    with pytest.raises(TrainingConfigError, match="warmup_steps"):
        deepspeed_config(1, 1e-4, 0.0, 20, 10, False)
