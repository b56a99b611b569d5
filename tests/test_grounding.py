"""The grounding head: shapes and masks, the matcher, loss values, EMA, pseudo-labels, a training
run that learns, Ray Train + DeepSpeed with resume, and the labeller. CPU, tiny sizes."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch

from engine.generation.annotation import LABELLERS, build_labeller
from engine.config import AnnotationConfig, ModelConfig
from engine.models.grounding.features import Featurizer
from engine.generation.annotation import GroundingHeadLabeller, TeacherPlusHeadLabeller
from engine.config import LossConfig
from engine.models.boxes import generalized_iou
from engine.models.grounding.loss import grounding_loss, hungarian_match, sigmoid_focal_loss, targets_from_boxes
from engine.models.grounding.head import MASKED_LOGIT, GroundingHead, ema_update, inverse_sigmoid, make_teacher
from engine.config import GroundingConfig
from engine.models.grounding.head import build_head
from engine.training.grounding import (load_grounding_head, pseudo_labels, sample_to_row, save_grounding_head, train_local, without_missed)
from engine.config import GroundingTrainConfig
from engine.models.diffusion import FINETUNED_FROM, load_pipeline

CATS = ["red square", "blue square", "green square", "yellow square"]
COLOURS = {"red": (1.0, -1.0, -1.0), "blue": (-1.0, -1.0, 1.0), "green": (-1.0, 1.0, -1.0), "yellow": (1.0, 1.0, -1.0)}


def tiny_head_config(**kw) -> GroundingConfig:
    base = dict(d_model=32, enhancer_layers=1, decoder_layers=2, num_queries=16, n_levels=2, n_heads=4,
                n_points=2, ffn_dim=64, in_channels=[64, 32], text_dim=32)
    return GroundingConfig(**{**base, **kw})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The CI machine is shared; tiny models run faster without thread contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(ModelConfig(source="tiny"), device="cpu")


def toy_rows(pipe, n: int, seed: int) -> list[dict]:
    """32x32 images with one coloured square each, VAE-encoded and noised to the last step's input."""
    rng = random.Random(seed)
    featurizer = Featurizer(pipe, 10)
    images, rows = [], []
    for _ in range(n):
        cat = rng.choice(CATS)
        s = rng.randint(10, 16)
        x0, y0 = rng.randint(0, 32 - s), rng.randint(0, 32 - s)
        img = torch.zeros(3, 32, 32)
        img[:, y0:y0 + s, x0:x0 + s] = torch.tensor(COLOURS[cat.split()[0]])[:, None, None]
        images.append(img)
        rows.append({"prompt": f"a photograph of {cat}", "categories": json.dumps([cat]),
                     "boxes": json.dumps([[x0 / 32, y0 / 32, (x0 + s) / 32, (y0 + s) / 32]]),
                     "labels": json.dumps([cat])})
    with torch.no_grad():
        z0 = pipe.vae.encode(torch.stack(images)).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
        zt = featurizer.scheduler.add_noise(z0, noise, featurizer.timestep.repeat(n))
    for r, z in zip(rows, zt):
        r["latent"] = z.numpy()
    return rows


# ------------------------------------------------------------------------------------------------
# The head


def test_head_shapes_and_text_padding():
    torch.manual_seed(0)
    head = GroundingHead(tiny_head_config()).eval()
    feats = [torch.randn(2, 64, 8, 8), torch.randn(2, 32, 16, 16)]
    text = torch.randn(2, 3, 32)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = head(feats, text, mask)
    assert out["logits"].shape == (2, 16, 3) and out["boxes"].shape == (2, 16, 4)
    # one aux output per earlier decoder layer, plus the query-selection proposals
    assert len(out["aux"]) == 2 and all(a["logits"].shape == (2, 16, 3) for a in out["aux"])
    assert ((out["boxes"] > 0) & (out["boxes"] < 1)).all()
    assert (out["logits"][0, :, 2] == MASKED_LOGIT).all() and (out["logits"][1] > MASKED_LOGIT).all()
    # What sits in a padded text slot must not change anything for the real categories.
    text2 = text.clone()
    text2[0, 2] = 100.0
    out2 = head(feats, text2, mask)
    torch.testing.assert_close(out2["logits"][:, :, :2], out["logits"][:, :, :2])
    torch.testing.assert_close(out2["boxes"], out["boxes"])


def test_head_query_count_capped_by_tokens_and_levels_checked():
    head = GroundingHead(tiny_head_config(num_queries=500)).eval()
    out = head([torch.randn(1, 64, 4, 4), torch.randn(1, 32, 8, 8)], torch.randn(1, 2, 32), torch.ones(1, 2, dtype=bool))
    assert out["logits"].shape == (1, 16 + 64, 2)  # all 80 tokens become queries
    with pytest.raises(ValueError, match="n_levels=2"):
        GroundingHead(tiny_head_config(n_levels=3))


# ------------------------------------------------------------------------------------------------
# Loss parts


def test_focal_loss_values_by_hand():
    logits = torch.tensor([0.0, 0.0, math.log(3.0)])
    targets = torch.tensor([1.0, 0.0, 1.0])
    got = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    ln2 = math.log(2.0)
    # p = 0.5: alpha_t * (1 - p_t)^2 * -log p_t; p = 0.75 for logit log 3
    expected = torch.tensor([0.25 * 0.25 * ln2, 0.75 * 0.25 * ln2, 0.25 * 0.0625 * -math.log(0.75)])
    torch.testing.assert_close(got, expected)


def test_giou_values_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0], [3.0, 0.0, 4.0, 1.0]])
    got = generalized_iou(a, b)[0]
    # identical: 1; overlap 1 of union 7 in a 3x3 hull: 1/7 - 2/9; disjoint: 0 - (hull 8 - union 5) / 8
    torch.testing.assert_close(got, torch.tensor([1.0, 1 / 7 - 2 / 9, -3 / 8]))


def test_matcher_finds_the_known_optimal_assignment():
    cfg = LossConfig()
    # Query 0 sits on target 1's box, query 2 on target 0's, query 1 is far from both.
    boxes = torch.tensor([[[0.7, 0.7, 0.2, 0.2], [0.5, 0.1, 0.05, 0.05], [0.2, 0.2, 0.2, 0.2]]])
    logits = torch.zeros(1, 3, 2)
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.2, 0.2, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])}]
    (q, t), = hungarian_match(logits, boxes, targets, cfg)
    assert dict(zip(q.tolist(), t.tolist())) == {0: 1, 2: 0}
    # Same boxes for both queries: the class score decides.
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])
    logits = torch.tensor([[[-4.0, 4.0], [4.0, -4.0]]])
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    (q, t), = hungarian_match(logits, boxes, targets, cfg)
    assert q.tolist() == [1] and t.tolist() == [0]
    # No target: nothing matched, and the loss is the focal "no object" term alone.
    (q, t), = hungarian_match(logits, boxes, [{"labels": torch.zeros(0, dtype=torch.long),
                                               "boxes": torch.zeros(0, 4)}], cfg)
    assert len(q) == len(t) == 0


def test_loss_is_zero_box_error_for_perfect_boxes_and_counts_aux_outputs():
    cfg = LossConfig()
    target = torch.tensor([[0.3, 0.4, 0.2, 0.2]])
    boxes = torch.tensor([[[0.3, 0.4, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]]])
    logits = torch.tensor([[[8.0, -8.0], [-8.0, -8.0]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    one = {"logits": logits, "boxes": boxes}
    targets = [{"labels": torch.tensor([0]), "boxes": target}]
    loss1, parts = grounding_loss({**one, "aux": []}, mask, targets, cfg)
    assert parts["l1"] == pytest.approx(0.0, abs=1e-6) and parts["giou"] == pytest.approx(0.0, abs=1e-6)
    assert parts["class"] < 1e-3
    loss3, _ = grounding_loss({**one, "aux": [one, one]}, mask, targets, cfg)
    assert float(loss3) == pytest.approx(3 * float(loss1), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Self-training parts


def test_ema_one_step_by_hand():
    student = torch.nn.Linear(1, 1)
    with torch.no_grad():
        student.weight.fill_(1.0)
        student.bias.fill_(-2.0)
    teacher = make_teacher(student)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        student.weight.fill_(3.0)
        student.bias.fill_(2.0)
    ema_update(teacher, student, momentum=0.9)
    assert teacher.weight.item() == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)
    assert teacher.bias.item() == pytest.approx(0.9 * -2.0 + 0.1 * 2.0)


def test_pseudo_labels_keep_prompted_categories_scoring_at_least_beta():
    probs = torch.tensor([[[0.30, 0.05, 0.95],   # prompted cat 0 below beta; slot 2 is a negative
                           [0.50, 0.05, 0.10],   # cat 0 at 0.5: kept
                           [0.05, 0.41, 0.10]]])  # cat 1 at 0.41: kept
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.3, 0.2, 0.2]]])
    out = {"logits": inverse_sigmoid(probs), "boxes": boxes}
    labels, kept = pseudo_labels(out, torch.ones(1, 3, dtype=torch.bool), prompted=[2], beta=0.4)
    assert labels == [[0, 1]]
    np.testing.assert_allclose(kept[0], [[0.4, 0.4, 0.6, 0.6], [0.7, 0.2, 0.9, 0.4]], atol=1e-6)
    labels, _ = pseudo_labels(out, torch.ones(1, 3, dtype=torch.bool), prompted=[2], beta=0.45)
    assert labels == [[0]]


def test_pseudo_labels_keep_at_most_per_category_boxes_of_each_prompted_category():
    probs = torch.tensor([[[0.90, 0.05], [0.60, 0.05], [0.70, 0.05], [0.05, 0.50]]])
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1], [0.5, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]]])
    out = {"logits": inverse_sigmoid(probs), "boxes": boxes}
    mask = torch.ones(1, 2, dtype=torch.bool)
    # Three separate boxes of category 0 survive NMS; with a cap of 1 only the best (0.9) stays.
    assert pseudo_labels(out, mask, prompted=[2], beta=0.4)[0] == [[0, 0, 0, 1]]
    labels, kept = pseudo_labels(out, mask, prompted=[2], beta=0.4, per_category=1)
    assert labels == [[0, 1]]
    np.testing.assert_allclose(kept[0][0], [0.15, 0.15, 0.25, 0.25], atol=1e-6)
    assert pseudo_labels(out, mask, prompted=[2], beta=0.4, per_category=2)[0] == [[0, 0, 1]]


def test_a_prompted_category_the_labeller_missed_is_not_scored_as_background():
    # Image 0 prompted 2 categories, boxed only the second; image 1 prompted 1, boxed none. The
    # slots after the prompted ones are negatives and stay scored; slot 3 of image 1 is padding.
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    scored = without_missed(mask, labels=[[1], []], prompted=[2, 1])
    assert scored.tolist() == [[False, True, True, True], [False, True, True, False]]
    # The loss then ignores what the head says of a missed slot, and still counts the others.
    logits = torch.zeros(2, 5, 4)
    out = {"logits": logits, "boxes": torch.full((2, 5, 4), 0.5), "aux": []}
    targets = targets_from_boxes([[1], []], [np.array([[0.2, 0.2, 0.6, 0.6]]), np.zeros((0, 4))])
    loss = grounding_loss(out, scored, targets, LossConfig())[0]
    missed = grounding_loss({**out, "logits": logits.index_fill(2, torch.tensor([0]), 5.0)}, scored, targets,
                            LossConfig())[0]
    negative = grounding_loss({**out, "logits": logits.index_fill(2, torch.tensor([2]), 5.0)}, scored, targets,
                              LossConfig())[0]
    assert missed == pytest.approx(float(loss)) and negative > loss


def test_sample_to_row_keeps_teacher_boxes_of_allowed_categories_over_alpha():
    sample = {"__key__": "000007", "latent": np.zeros((4, 2, 2), np.float32), "json": {
        "width": 100, "height": 50, "prompt": "a photograph of cat and dog", "categories": ["cat", "dog"],
        "boxes": [[10, 5, 50, 25], [0, 0, 10, 10], [0, 0, 20, 20], [5, 5, 6, 6]],
        "labels": ["cat", "dog", "dog", "bus"], "scores": [0.9, 0.7, 0.95, 0.99],
        "labellers": ["detector", "detector", "grounding_head", "detector"]}}
    row = sample_to_row(sample, {"cat", "dog"}, alpha=0.8)
    assert row["key"] == "000007"  # names the sample for the feature cache
    assert json.loads(row["labels"]) == ["cat"]
    assert json.loads(row["boxes"]) == [[0.1, 0.1, 0.5, 0.5]]


def test_feature_cache_returns_the_unet_pass_and_skips_it_for_seen_keys(pipe):
    rows = toy_rows(pipe, 3, seed=8)
    latents = torch.as_tensor(np.stack([r["latent"] for r in rows]))
    prompts = [r["prompt"] for r in rows]
    fresh = Featurizer(pipe, 10).unet_features(latents, prompts)
    cached = Featurizer(pipe, 10, cache_mb=16)
    first = cached.unet_features(latents[:2], prompts[:2], ["a", "b"])
    for f, g in zip(first, fresh):  # CPU convolutions round differently by batch size
        torch.testing.assert_close(f, g[:2], atol=1e-4, rtol=1e-4)
    # Seen keys come from the cache (their latents here are noise and would give other features);
    # the unseen key "c" is computed, in the caller's order.
    mixed = cached.unet_features(torch.randn_like(latents[[2, 0, 1]]).index_copy(0, torch.tensor([0]), latents[2:]),
                                 [prompts[2], prompts[0], prompts[1]], ["c", "a", "b"])
    for f, g in zip(mixed, fresh):
        torch.testing.assert_close(f, g[[2, 0, 1]], atol=1e-4, rtol=1e-4)
    uncached = Featurizer(pipe, 10, cache_mb=0)
    uncached.unet_features(latents[:1], prompts[:1], ["a"])
    noise = uncached.unet_features(torch.randn_like(latents[:1]), prompts[:1], ["a"])
    assert not torch.allclose(noise[0], fresh[0][:1])  # no room: nothing kept


# ------------------------------------------------------------------------------------------------
# Training and the labeller


def train_config(**kw) -> GroundingTrainConfig:
    base = dict(base_shards="-", base=CATS, synthesis_steps=10, epochs=100, transfer_epoch=100, lr=1e-3,
                lr_drop_epoch=10**6, batch_size=4, negatives=2, seed=0,
                head=tiny_head_config(enhancer_layers=1, decoder_layers=1, num_queries=12))
    return GroundingTrainConfig(**{**base, **kw})


def test_training_on_a_fixed_set_lowers_the_loss(pipe):
    torch.manual_seed(0)
    rows = toy_rows(pipe, 8, seed=0)
    cfg = train_config()
    head = build_head(cfg.head, pipe)
    losses = train_local(cfg, Featurizer(pipe, 10), head, rows, max_steps=40)
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_self_training_runs_with_teacher_pseudo_labels(pipe):
    torch.manual_seed(0)
    rows = toy_rows(pipe, 8, seed=1)
    novel = toy_rows(pipe, 4, seed=2)
    for r in novel:  # novel prompts: the category is named, no boxes are given
        r["boxes"], r["labels"] = "[]", "[]"
    cfg = train_config(novel=["purple square"], epochs=2, transfer_epoch=1, beta=0.0)
    head = build_head(cfg.head, pipe)
    losses = train_local(cfg, Featurizer(pipe, 10), head, rows, novel_rows=novel)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert head.layer_dropout.p == cfg.head.layer_dropout  # the student drops out while self-training


@pytest.fixture(scope="module")
def head_folder(pipe, tmp_path_factory):
    cfg = train_config(base=CATS[:2], novel=CATS[2:])
    torch.manual_seed(0)
    head = build_head(cfg.head, pipe).eval()
    folder = str(tmp_path_factory.mktemp("heads") / "head")
    save_grounding_head(folder, head, ModelConfig(source="tiny"), cfg)
    return folder, head


def test_save_and_load_give_the_same_head(head_folder):
    folder, head = head_folder
    loaded, meta = load_grounding_head(folder)
    assert meta["base"] == CATS[:2] and meta["synthesis_steps"] == 10
    for k, v in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    with pytest.raises(ValueError, match="not a grounding-head folder"):
        load_grounding_head(os.path.dirname(folder))


def test_head_labeller_boxes_only_prompted_categories_tagged_as_the_head(pipe, head_folder):
    folder, _ = head_folder
    rows = toy_rows(pipe, 3, seed=3)
    labeller = build_labeller(AnnotationConfig(labeller="grounding_head", model=folder, beta=0.0), CATS)
    assert isinstance(labeller, GroundingHeadLabeller) and "teacher+head" in LABELLERS
    images = [np.zeros((32, 32, 3), np.uint8)] * 3
    wanted = [["green square"], ["red square", "yellow square"], []]
    found = labeller.label(images, wanted, latents=[r["latent"] for r in rows], prompts=[r["prompt"] for r in rows])
    assert len(found) == 3 and found[0] and found[1] and found[2] == []
    for boxes, cats in zip(found, wanted):
        for b in boxes:
            assert b["labeller"] == "grounding_head" and b["category"] in cats and 0 <= b["score"] <= 1
            x0, y0, x1, y1 = b["bbox"]
            assert 0 <= x0 <= x1 <= 32 and 0 <= y0 <= y1 <= 32
    # One box per prompted category: each category's best box of the uncapped labeller.
    one = build_labeller(AnnotationConfig(labeller="grounding_head", model=folder, beta=0.0, max_per_category=1), CATS)
    capped = one.label(images, wanted, latents=[r["latent"] for r in rows], prompts=[r["prompt"] for r in rows])
    for boxes, all_boxes, cats in zip(capped, found, wanted):
        assert sorted(b["category"] for b in boxes) == sorted({b["category"] for b in all_boxes})
        for b in boxes:
            assert b == max((a for a in all_boxes if a["category"] == b["category"]), key=lambda a: a["score"])
    with pytest.raises(ValueError, match="needs each image's latent"):
        labeller.label(images, wanted)
    with pytest.raises(ValueError, match="/no/such/head"):
        build_labeller(AnnotationConfig(labeller="grounding_head", model="/no/such/head"), CATS)
    with pytest.raises(ValueError, match="max_per_category must be >= 0"):
        build_labeller(AnnotationConfig(labeller="grounding_head", model=folder, max_per_category=-1), CATS)


def test_teacher_plus_head_sends_base_to_detector_and_novel_to_head(pipe, head_folder):
    folder, _ = head_folder
    cfg = AnnotationConfig(labeller="teacher+head", model="tiny", head=folder, alpha=0.0, beta=0.0)
    labeller = build_labeller(cfg, CATS)
    assert isinstance(labeller, TeacherPlusHeadLabeller)
    rows = toy_rows(pipe, 2, seed=4)
    images = [np.full((32, 32, 3), 128, np.uint8)] * 2
    wanted = [["red square", "green square"], ["blue square", "yellow square"]]  # base first, novel second
    found = labeller.label(images, wanted, latents=[r["latent"] for r in rows], prompts=[r["prompt"] for r in rows])
    # alpha = beta = 0: both parts box something, and each box names the part that made it.
    assert any(b["labeller"] == "detector" for boxes in found for b in boxes)
    for boxes in found:
        assert any(b["labeller"] == "grounding_head" for b in boxes)
        for b in boxes:
            expected = "detector" if b["category"] in CATS[:2] else "grounding_head"
            assert b["labeller"] == expected


# ------------------------------------------------------------------------------------------------
# Ray Train + DeepSpeed, reading real shards, with resume


def write_shards(pipe, url: str, rows: list[dict], novel: bool) -> None:
    from engine.data.shards import ShardStore
    from engine.generation.synthesis import encode_jpeg, encode_npy
    store = ShardStore(url)
    claim = store.prepare({"fingerprint": "test"})
    samples = []
    for i, r in enumerate(rows):
        boxes = [[v * 32 for v in b] for b in json.loads(r["boxes"])]
        labels = json.loads(r["labels"])
        samples.append({"__key__": f"{i:06d}", "jpg": encode_jpeg(np.zeros((32, 32, 3), np.uint8), 90),
                        "latent.npy": encode_npy(r["latent"]), "json": json.dumps({
                            "prompt": r["prompt"], "categories": json.loads(r["categories"]), "width": 32,
                            "height": 32, "boxes": [] if novel else boxes, "labels": [] if novel else labels,
                            "scores": [] if novel else [0.9] * len(labels),
                            "labellers": [] if novel else ["detector"] * len(labels)})})
    store.write_shard(0, samples, [], claim)


def test_ray_train_deepspeed_writes_head_and_resumes(pipe, local_ray, tmp_path):
    from engine.training.grounding import train_grounding
    from engine.config import TrainRunConfig
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.abspath(".torch_extensions"))
    rows = toy_rows(pipe, 8, seed=5)
    write_shards(pipe, str(tmp_path / "base"), rows, novel=False)
    write_shards(pipe, str(tmp_path / "novel"), toy_rows(pipe, 4, seed=6), novel=True)
    cfg = train_config(base_shards=str(tmp_path / "base"), novel_shards=str(tmp_path / "novel"),
                       novel=["purple square"], epochs=1, transfer_epoch=1, beta=0.0, output=str(tmp_path / "head"),
                       run=TrainRunConfig(storage_path=str(tmp_path / "runs"), name="g", num_workers=1,
                                            cpus_per_worker=1.0, checkpoint_every=100))
    result = train_grounding(cfg, ModelConfig(source="tiny"))
    assert result.steps == 2  # 8 rows / batch 4, supervised only
    first, _ = load_grounding_head(str(tmp_path / "head"))
    # The same run extended by a self-training epoch resumes after the finished epoch: it starts
    # from the saved weights at step 2 (not 0) and makes the transfer to the teacher there.
    cfg.epochs = 2
    result = train_grounding(cfg, ModelConfig(source="tiny"))
    # beta 0: the teacher's every box is a pseudo-label, so self-training had targets.
    assert result.steps == 4 and result.metrics["pseudo_boxes"] > 0
    second, meta = load_grounding_head(str(tmp_path / "head"))
    assert meta["novel"] == ["purple square"]
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    # Self-training from that head (init_head): only the epoch after the transfer runs.
    warm = dataclasses.replace(cfg, init_head=str(tmp_path / "head"), output=str(tmp_path / "warm"),
                               run=dataclasses.replace(cfg.run, name="warm"))
    result = train_grounding(warm, ModelConfig(source="tiny"))
    assert result.steps == 2 and result.metrics["epoch"] == 1 and "pseudo_boxes" in result.metrics


def test_init_head_must_match_the_model_and_head_sizes(head_folder, tmp_path):
    from engine.config import GroundingTrainError
    from engine.training.grounding import check_inputs
    from engine.data.shards import ShardStore
    folder, _ = head_folder
    for name in ("base", "novel"):
        store = ShardStore(str(tmp_path / name))
        claim = store.prepare({"fingerprint": "test"})
        store.write_shard(0, [], [], claim)
    cfg = train_config(base_shards=str(tmp_path / "base"), novel_shards=str(tmp_path / "novel"), novel=["x"],
                       init_head=folder)
    check_inputs(cfg, ModelConfig(source="tiny"))  # the head was saved with these sizes and model
    with pytest.raises(GroundingTrainError, match="other head sizes or another model"):
        check_inputs(dataclasses.replace(cfg, head=tiny_head_config(d_model=64)), ModelConfig(source="tiny"))
    other = tmp_path / "other"  # the same head, trained on another pipeline's features
    shutil.copytree(folder, other)
    meta = json.loads((other / "grounding.json").read_text())
    meta["model"]["source"] = "/models/another-sd"
    (other / "grounding.json").write_text(json.dumps(meta))
    with pytest.raises(GroundingTrainError, match="other head sizes or another model"):
        check_inputs(dataclasses.replace(cfg, init_head=str(other)), ModelConfig(source="tiny"))
    # A pipeline fine-tuned from that other model (engine.training.finetune names its start) may start from
    # its head; a pipeline fine-tuned from yet another may not.
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    (tuned / "model_index.json").write_text("{}")
    (tuned / FINETUNED_FROM).write_text(json.dumps({"source": "/models/another-sd"}))
    check_inputs(dataclasses.replace(cfg, init_head=str(other)), ModelConfig(source=str(tuned)))
    (tuned / FINETUNED_FROM).write_text(json.dumps({"source": "/models/a-third-sd"}))
    with pytest.raises(GroundingTrainError, match="other head sizes or another model"):
        check_inputs(dataclasses.replace(cfg, init_head=str(other)), ModelConfig(source=str(tuned)))
    with pytest.raises(GroundingTrainError, match="novel_shards is empty"):
        dataclasses.replace(cfg, novel_shards="").validate()


def test_annotation_stage_with_the_head_writes_boxes_tagged_as_the_head(pipe, head_folder):
    from engine.generation.annotation import Annotator
    from engine.generation.synthesis import encode_jpeg, encode_npy
    folder, _ = head_folder
    rows = toy_rows(pipe, 2, seed=7)
    annotator = Annotator(AnnotationConfig(labeller="grounding_head", model=folder, beta=0.0), CATS)
    row = {"shard": 0, "id": [0, 1], "status": ["ok", "ok"], "seed": [0, 1], "seed_used": [0, 1], "model_id": "tiny",
           "text": [r["prompt"] for r in rows], "categories": [r["categories"] for r in rows],
           "jpg": [encode_jpeg(np.zeros((32, 32, 3), np.uint8), 95)] * 2,
           "latent": [encode_npy(r["latent"]) for r in rows]}
    records = [json.loads(r) for r in annotator(row)["json"]]
    assert all(rec["boxes"] for rec in records)
    assert all(who == "grounding_head" for rec in records for who in rec["labellers"])


def test_job_exits_2_with_one_message_for_missing_shards(capsys):
    import runpy
    main = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "jobs", "train_grounding.py"))["main"]
    assert main(["grounding.base_shards=/no/such/run", "grounding.base=[cat]"]) == 2
    assert "grounding.base_shards '/no/such/run' holds no output of `instagen generate`" in capsys.readouterr().err
