"""The toy world's own CLIP (engine.training.clip): the word tokenizer, the zero-shot arithmetic,
config errors, and one short training run through the toy world's `clip` stage."""
import dataclasses
import json
import os

import pytest
import torch
from PIL import Image
from transformers import CLIPProcessor

from engine.config import (
    ClipTowersConfig,
    ClipTrainConfig,
    ConfigError,
    GroundingTrainConfig,
    RayConfig,
    TrainRunConfig,
)
from engine.models.clip import build_clip, check_clip_folder
from engine.toyworld.loop import AblationConfig, Loop
from engine.toyworld.world import WorldConfig, draw_world
from engine.training.clip import (
    build_processor,
    caption_words,
    contrastive_loss,
    prepare,
    word_tokenizer,
    zero_shot,
)


def small_world(**kw) -> WorldConfig:
    return WorldConfig(**{"pretrain_images": 16, "train_images": 4, "test_images": 8, **kw})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("clip") / "world")
    cfg = small_world()
    draw_world(out, cfg)
    return out, cfg


def test_every_caption_word_is_one_token_and_the_processor_round_trips(world, tmp_path):
    out, _ = world
    with open(os.path.join(out, "pretrain", "captions.json")) as f:
        captions = [a["caption"] for a in json.load(f)["annotations"]]
    words = caption_words(captions)
    assert {"a", "photograph", "of", "red", "circle"} <= set(words)
    tokenizer = word_tokenizer(words, 16)
    assert all(tokenizer.tokenize(w) == [w + "</w>"] for w in words)
    assert len(tokenizer.tokenize("a photo of a red circle")) > 6  # an unseen word falls back to pieces
    processor = build_processor(words, ClipTowersConfig())
    processor.save_pretrained(str(tmp_path))
    again = CLIPProcessor.from_pretrained(str(tmp_path), local_files_only=True)
    assert again.tokenizer(captions)["input_ids"] == processor.tokenizer(captions)["input_ids"]


def test_identical_captions_are_matches_not_negatives():
    # Two images of the same caption and one of another: the model that cannot tell the first two
    # apart is the better one when their captions are the same, the worse when they differ.
    blurred = torch.tensor([[5.0, 5.0, -5.0], [5.0, 5.0, -5.0], [-5.0, -5.0, 5.0]])
    sharp = torch.tensor([[5.0, -5.0, -5.0], [-5.0, 5.0, -5.0], [-5.0, -5.0, 5.0]])
    same = torch.tensor([0, 0, 1])
    assert contrastive_loss(blurred, same) < contrastive_loss(sharp, same)
    assert contrastive_loss(blurred, torch.tensor([0, 1, 2])) > contrastive_loss(sharp, torch.tensor([0, 1, 2]))


class AlwaysSays:
    """A scorer whose answer is always category `k` of the list it is given."""

    def __init__(self, k: int):
        self.k, self.calls = k, []

    def scores(self, images, categories, template):
        self.calls.append((len(images), list(categories), template, [im.size for im in images]))
        sims = torch.zeros(len(images), len(categories))
        sims[:, self.k] = 1.0
        return sims


@pytest.mark.parametrize("k", [0, 1])  # "red circle" (novel), "red square" (base)
def test_zero_shot_accuracy_counts_each_box(world, k):
    out, cfg = world
    with open(os.path.join(out, "test", "instances.json")) as f:
        gt = json.load(f)
    names = {c["id"]: c["name"] for c in gt["categories"]}
    labels = [names[a["category_id"]] for a in gt["annotations"]]
    said = cfg.categories[k]
    scorer = AlwaysSays(k)
    z = zero_shot(scorer, os.path.join(out, "test", "instances.json"), os.path.join(out, "test"),
                  "a photograph of {name}", cfg.base, cfg.novel, batch=5)
    base = [x for x in labels if x in cfg.base]
    novel = [x for x in labels if x in cfg.novel]
    assert z["boxes"] == len(labels) and z["boxes_base"] == len(base) and z["boxes_novel"] == len(novel)
    assert z["accuracy"] == pytest.approx(labels.count(said) / len(labels))
    assert z["accuracy_base"] == pytest.approx(base.count(said) / len(base))
    assert z["accuracy_novel"] == pytest.approx(novel.count(said) / len(novel))
    assert z["per_category"][said] == (1.0 if said in labels else None)
    assert all(v in (0.0, None) for n, v in z["per_category"].items() if n != said)
    # Every box cropped at its own size, in batches of 5, against every category with the template.
    assert sum(c[0] for c in scorer.calls) == len(labels) and max(c[0] for c in scorer.calls) == 5
    assert all(c[1] == cfg.categories and c[2] == "a photograph of {name}" for c in scorer.calls)
    assert sorted(s for c in scorer.calls for s in c[3]) == sorted((a["bbox"][2], a["bbox"][3]) for a in gt["annotations"])


def clip_config(out: str, **kw) -> ClipTrainConfig:
    return ClipTrainConfig(captions=os.path.join(out, "pretrain", "captions.json"),
                           image_root=os.path.join(out, "pretrain"), **kw)


@pytest.mark.parametrize("changes, message", [
    ({"towers": ClipTowersConfig(hidden_size=30, heads=4)}, "clip.towers.hidden_size (30) must be divisible"),
    ({"towers": ClipTowersConfig(image_size=60, patch_size=8)}, "clip.towers.image_size (60) must be a multiple"),
    ({"batch_size": 1}, "clip.batch_size must be >= 2"),
    ({"warmup_steps": 20, "max_steps": 10}, "clip.warmup_steps (20)"),
    ({"template": "a photograph of {c1}"}, "clip.template"),
    ({"eval_annotations": "x.json"}, "clip.eval_annotations and clip.eval_image_root"),
    ({"batch_size": 64}, "clip.batch_size=64 is more than the 16 image-caption pairs"),
    ({"run": TrainRunConfig(zero_stage=3)}, "clip.run.zero_stage"),
])
def test_bad_configs_are_one_line_naming_the_key(world, changes, message):
    out, _ = world
    with pytest.raises(ConfigError) as e:
        prepare(clip_config(out, **changes))
    assert message in str(e.value) and "\n" not in str(e.value)


def ablation(workdir: str, clip: ClipTrainConfig, **kw) -> AblationConfig:
    # A self-training batch that the default 4 novel images per category can fill.
    return AblationConfig(workdir=workdir, clip=clip, grounding=GroundingTrainConfig(batch_size=4), **kw)


def test_toy_world_config_checks_the_clip_section_only_when_enabled(tmp_path):
    bad = ClipTrainConfig(batch_size=1)
    ablation(str(tmp_path), bad).validate()
    with pytest.raises(ConfigError, match="clip.batch_size must be >= 2"):
        ablation(str(tmp_path), dataclasses.replace(bad, enabled=True)).validate()


def test_clip_stage_trains_saves_a_loadable_clip_and_is_skipped_on_rerun(local_ray, world, tmp_path):
    out, cfg = world
    clip = ClipTrainConfig(enabled=True, towers=ClipTowersConfig(hidden_size=32, layers=1, heads=2, projection_dim=32),
                           lr=2e-3, weight_decay=0.0, warmup_steps=3, max_steps=40, batch_size=8,
                           run=TrainRunConfig(cpus_per_worker=1, zero_stage=0, data_cpus=0, checkpoint_every=1000,
                                              max_failures=0))
    acfg = ablation(str(tmp_path / "ws"), clip, world=cfg, ray=RayConfig())
    acfg.validate()
    logs = []
    loop = Loop(acfg, logs.append)
    loop.world()
    loop.clip()
    result = loop.run()["clip"]
    losses = result["loss_first"] + result["loss_last"]
    assert result["steps"] == 40 and len(losses) == 40
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.7 * first, (first, last)  # it learns to tell 16 pictures' captions apart
    z = result["zero_shot"]
    assert z["boxes"] > 0 and 0.0 <= z["accuracy"] <= 1.0 and set(z) >= {"accuracy_base", "accuracy_novel"}

    folder = result["model"]
    check_clip_folder(folder)  # what filter.model=<folder> is checked with, and loaded with below
    with open(os.path.join(folder, "training.json")) as f:
        assert json.load(f)["zero_shot"] == z
    scorer = build_clip(folder, device="cpu")
    sims = scorer.scores([Image.new("RGB", (20, 20), (220, 40, 40))], ["red circle", "blue square"],
                         "a photograph of {name}")
    assert sims.shape == (1, 2) and bool((sims.abs() <= 1.0 + 1e-5).all())

    again = Loop(acfg, logs.append)
    again.world()
    again.clip()
    assert again.run()["clip"] == result
    assert any(m.startswith("clip: done earlier") for m in logs)
