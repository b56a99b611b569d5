"""Layout rows (engine/generation/layouts.py) and GLIGEN synthesis: selection, class balance,
determinism, recorded jitter, the user's errors, and a generate run on a real local Ray whose
labels are the layouts' boxes."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from engine.config import ConfigError, LayoutConfig, ModelConfig, SynthesisConfig, load_config
from engine.data.shards import ShardError, shard_urls
from engine.generation.layouts import LayoutError, LayoutPlan, select_images
from engine.models.checkpoints import ModelLoadError
from fixtures_coco import draw_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATS = ["red square", "blue disc", "green square", "yellow disc"]
# Image id -> its objects (category index, xyxy box) on a 64x64 canvas.
IMAGES = {
    1: [(0, [4, 4, 24, 24])],
    2: [(0, [4, 4, 24, 24]), (0, [30, 30, 50, 50])],
    3: [(0, [10, 10, 40, 40])],
    4: [(1, [8, 8, 28, 28])],
    5: [(1, [8, 8, 28, 28]), (0, [36, 36, 56, 56])],  # two categories
    6: [(2, [20, 20, 44, 44])],
    7: [(0, [0, 0, 8, 8]), (0, [10, 0, 18, 8]), (0, [20, 0, 28, 8]), (0, [30, 0, 38, 8])],  # 4 objects
    8: [(1, [2, 2, 5, 5])],  # a 3 px box
    9: [(0, [2, 40, 22, 60])],
}
# Instances in the dataset: red square 11, blue disc 3, green square 1, yellow disc 0.


def make_layout_dataset(tmp_path, images=IMAGES, bad_box=False) -> tuple[str, str]:
    root = Path(tmp_path) / "images"
    root.mkdir(parents=True, exist_ok=True)
    imgs, anns = [], []
    for img_id, objects in images.items():
        name = f"{img_id:06d}.jpg"
        draw_image(str(root / name), 64, objects)
        imgs.append({"id": img_id, "file_name": name, "width": 64, "height": 64})
        for c, (x0, y0, x1, y1) in objects:
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": 10 + 3 * c,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    if bad_box:
        anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 10, "bbox": [70, 70, 10, 10],
                     "area": 100, "iscrowd": 0})
    data = {"images": imgs, "annotations": anns,
            "categories": [{"id": 10 + 3 * i, "name": n} for i, n in enumerate(CATS)]}
    ann = Path(tmp_path) / "layouts.json"
    ann.write_text(json.dumps(data))
    return str(ann), str(root)


@pytest.fixture(scope="module")
def layout_data(tmp_path_factory):
    return make_layout_dataset(tmp_path_factory.mktemp("layouts"))


def plan_of(layout_data, **kw):
    ann, root = layout_data
    cfg = LayoutConfig(annotations=ann, image_root=root, **kw)
    cfg.validate()
    return LayoutPlan(cfg)


def test_selection_follows_the_seeds_criteria(layout_data):
    plan = plan_of(layout_data, max_objects=3, one_category=True, min_box_side=4)
    ids = {c: [x.id for x in pool] for c, pool in plan.pools.items()}
    assert ids == {"red square": [1, 2, 3, 9], "blue disc": [4], "green square": [6], "yellow disc": []}
    assert plan.refused == {"more than 3 objects": 1, "more than one category": 1, "a box under 4 px": 1}
    assert plan.categories == ["red square", "blue disc", "green square"]  # yellow disc has no image
    assert plan.summary["layouts"]["no_qualifying_image"] == ["yellow disc"]
    # Looser criteria take the mixed image into both pools, and the small box.
    loose = plan_of(layout_data, max_objects=4, one_category=False)
    assert [x.id for x in loose.pools["blue disc"]] == [4, 5, 8]
    assert [x.id for x in loose.pools["red square"]] == [1, 2, 3, 5, 7, 9]
    from engine.data.datasets import load_detection_dataset
    kept, refused = select_images(load_detection_dataset(*layout_data, check_images=False), LayoutConfig(max_objects=1))
    assert [x.id for x in kept] == [1, 3, 4, 6, 8, 9] and refused == {"more than 1 objects": 3}


def test_balance_gives_rare_categories_the_most_rows(layout_data):
    plan = plan_of(layout_data, balance="to_target", target_instances=5, max_objects=3)
    # red square has 11 >= 5: none; blue disc 3 -> 2 more from its one image; green square 1 -> 4.
    assert dict(zip(plan.categories, plan.counts)) == {"blue disc": 2, "green square": 4}
    for c in plan.categories:
        made = sum(r.layout.labels.count(c) for r in plan.rows() if r.categories[0] == c)
        assert plan.instances[c] + made >= 5
    # The count is exact, not rounded from a mean: red square's images hold 1, 2, 1, 1 boxes.
    red = plan_of(layout_data, balance="to_target", target_instances=14, max_objects=3, categories=["red square"])
    rows = list(red.rows())
    boxes = [r.layout.labels.count("red square") for r in rows]
    assert 11 + sum(boxes) >= 14 and 11 + sum(boxes[:-1]) < 14
    # Every image of a pool is used once before any is used twice.
    ids = [r.layout.source["image_id"] for r in plan_of(layout_data, rows_per_category=8, max_objects=3,
                                                        categories=["red square"]).rows()]
    assert sorted(ids[:4]) == [1, 2, 3, 9] and sorted(ids[4:]) == [1, 2, 3, 9]


def test_rows_are_a_pure_function_of_seed_and_id(layout_data):
    kw = dict(max_objects=3, rows_per_category=5, jitter=0.2, scale_min=0.7, scale_max=1.3, seed=3)
    a, b = plan_of(layout_data, **kw), plan_of(layout_data, **kw)
    rows = list(a.rows())
    assert rows == list(b.rows()) and rows[7:11] == list(b.rows(7, 11)) and rows[9] == b.row(9)
    assert [r.id for r in rows] == list(range(len(a))) == list(range(15))
    other = list(plan_of(layout_data, **{**kw, "seed": 4}).rows())
    assert [r.seed for r in other] != [r.seed for r in rows]
    for r in rows:
        src = r.layout.source
        assert r.layout.labels == tuple(CATS[c] for c, _ in IMAGES[src["image_id"]])
        assert src["boxes"] == [list(map(float, b)) for _, b in IMAGES[src["image_id"]]]
        for box, orig, (dx, dy, s) in zip(r.layout.boxes, src["boxes"], src["moves"]):
            assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
            assert abs(dx) <= 0.2 and abs(dy) <= 0.2 and 0.7 <= s <= 1.3
            w = (orig[2] - orig[0]) / 64  # the recorded scale is the scale of the box drawn
            assert abs((box[2] - box[0]) - min(w * s, 1.0)) < 1e-5
        assert r.text == "a photograph of " + " and ".join(r.categories)
    # No jitter, no rescale: the layout is the real image's boxes, normalised.
    plain = plan_of(layout_data, max_objects=3).row(0)
    assert [[v * 64 for v in b] for b in plain.layout.boxes] == plain.layout.source["boxes"]


def test_categories_without_boxes_borrow_relabelled_layouts(layout_data):
    plan = plan_of(layout_data, max_objects=3, rows_per_category=1, borrow_for=["purple star"], borrow_rows=5)
    assert plan.novel == ["purple star"] and plan.all_categories[-1] == "purple star"
    rows = [r for r in plan.rows() if r.categories[0] == "purple star" or "purple star" in r.categories]
    assert len(rows) == 5 and len(plan) == 3 + 5
    for r in rows:
        donor, to = r.layout.source["relabelled"]
        original = [CATS[c] for c, _ in IMAGES[r.layout.source["image_id"]]]
        assert to == "purple star" and donor in original
        assert list(r.layout.labels) == [to if c == donor else c for c in original]
        assert "purple star" in r.text
    with pytest.raises(LayoutError, match="layout.borrow_for names 'blue disc'"):
        plan_of(layout_data, borrow_for=["blue disc"])
    # A category the file lists without a box of it (an open-vocabulary split's novel one) borrows
    # too, once, and is not counted among the base categories.
    listed = plan_of(layout_data, max_objects=3, rows_per_category=1, borrow_for=["yellow disc"], borrow_rows=2)
    assert listed.categories.count("yellow disc") == 1 and listed.novel == ["yellow disc"]
    assert "yellow disc" not in listed.base and len(listed) == 3 + 2


def test_bad_input_is_one_clear_line(layout_data, tmp_path):
    ann, _ = layout_data
    with pytest.raises(LayoutError, match="layout.categories names 'purple disc'") as e:
        plan_of(layout_data, categories=["purple disc"])
    assert "\n" not in str(e.value)
    with pytest.raises(LayoutError, match="no image .* qualifies as a layout of 'yellow disc'"):
        plan_of(layout_data, categories=["yellow disc"])
    bad_ann, bad_root = make_layout_dataset(tmp_path / "bad", bad_box=True)
    with pytest.raises(LayoutError, match=r"1 box\(es\) outside their image .*fix or remove them") as e:
        LayoutPlan(LayoutConfig(annotations=bad_ann, image_root=bad_root))
    assert "\n" not in str(e.value)
    with pytest.raises(LayoutError, match="layout source image.* missing .*fix layout.image_root"):
        LayoutPlan(LayoutConfig(annotations=ann, image_root=str(tmp_path), captioner="tiny"))
    for override, message in [("layout.max_objects=31", "layout.max_objects must lie in"),
                              ("layout.balance=to_target", "needs layout.target_instances"),
                              ("layout.scale_min=2.0", "scale_min <= scale_max"),
                              ("layout.template='a {c2}'", "layout.template")]:
        with pytest.raises(ConfigError, match=message):
            load_config(os.path.join(ROOT, "configs/tiny.yaml"), [f"layout.annotations={ann}", override])
    with pytest.raises(ConfigError, match="annotation.labeller=layout .* set layout.annotations"):
        load_config(os.path.join(ROOT, "configs/tiny.yaml"), ["annotation.labeller=layout"])


def test_dry_run_prints_the_layout_plan(layout_data, tmp_path, capsys):
    from engine.cli import main
    ann, root = layout_data
    base = ["generate", "--dry-run", "--config", os.path.join(ROOT, "configs/tiny.yaml"), f"output.path={tmp_path / 'o'}",
            f"layout.annotations={ann}", "layout.balance=to_target", "layout.target_instances=5", "layout.max_objects=3"]
    assert main(base) == 0
    printed = capsys.readouterr().out
    assert "6 prompts of 2 categories" in printed and "rows per category: blue disc 2, green square 4" in printed
    assert main(base + ["layout.categories=[purple disc]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "layout.categories names 'purple disc'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_gligen_loading_refuses_a_plain_sd_folder(tmp_path):
    from engine.models.diffusion import build_tiny_pipeline, is_gligen_folder, load_pipeline
    model = ModelConfig()
    build_tiny_pipeline(model.tiny).save_pretrained(tmp_path / "sd")
    build_tiny_pipeline(model.tiny, layout=True).save_pretrained(tmp_path / "gligen")
    assert not is_gligen_folder(str(tmp_path / "sd")) and is_gligen_folder(str(tmp_path / "gligen"))
    with pytest.raises(ModelLoadError, match="plain Stable Diffusion folder .* need a GLIGEN") as e:
        load_pipeline(ModelConfig(source=str(tmp_path / "sd")), "cpu", layout=True)
    assert "\n" not in str(e.value)
    pipe = load_pipeline(ModelConfig(source=str(tmp_path / "gligen")), "cpu", layout=True)
    assert type(pipe).__name__ == "StableDiffusionGLIGENPipeline"
    assert pipe.unet.config.attention_type == "gated"


def assert_same_sample(a, i, b, j):
    """Equal up to float reassociation in batched matmuls (about 1e-5; which kernels a CPU picks
    for batch 1 and 2 differ between machines), never a different image."""
    assert np.abs(a.images[i].astype(int) - b.images[j].astype(int)).max() <= 1
    np.testing.assert_allclose(a.latents[i], b.latents[j], rtol=1e-4, atol=1e-4)


def test_gligen_draws_the_boxes_it_is_given(layout_data):
    """The boxes reach the UNet (other boxes, another image), and a sample does not depend on the
    batch it was drawn in."""
    from engine.generation.synthesis import draw
    from engine.models.diffusion import load_pipeline
    plan = plan_of(layout_data, max_objects=3, rows_per_category=1)
    pipe = load_pipeline(ModelConfig(), "cpu", layout=True)
    cfg = SynthesisConfig(steps=3)
    rows = list(plan.rows())
    both = draw(pipe, [r.text for r in rows], [r.seed for r in rows], cfg, [r.layout for r in rows], 1.0)
    alone = draw(pipe, [rows[1].text], [rows[1].seed], cfg, [rows[1].layout], 1.0)
    assert_same_sample(alone, 0, both, 1)
    assert both.finite.all()
    moved = draw(pipe, [rows[1].text], [rows[1].seed], cfg, [rows[0].layout], 1.0)
    assert not np.allclose(moved.latents[0], alone.latents[0], atol=1e-3)
    # Scheduled sampling: with beta 0 the gated layers never act, so the boxes change nothing.
    off = [draw(pipe, [rows[1].text], [rows[1].seed], cfg, [lay], 0.0).latents[0] for lay in (rows[0].layout, rows[1].layout)]
    assert np.allclose(off[0], off[1], atol=1e-6)


def test_a_plain_unet_gains_closed_gates_and_keeps_its_weights():
    """GLIGEN training starts from a pretrained UNet: the gated UNet draws exactly as the plain one
    until its gates open, and only the parameters GLIGEN adds are new."""
    import torch
    from engine.models.diffusion import build_tiny_pipeline, gated_unet, grounding_tokens, is_gligen_param
    pipe = build_tiny_pipeline(ModelConfig().tiny)
    gated = gated_unet(pipe.unet)
    new = [n for n, _ in gated.named_parameters() if n not in dict(pipe.unet.named_parameters())]
    assert new and all(is_gligen_param(n) for n in new)
    assert not any(is_gligen_param(n) for n, _ in pipe.unet.named_parameters())
    tokens = grounding_tokens(pipe.tokenizer, pipe.text_encoder, [([[0.1, 0.1, 0.5, 0.6]], ["cat"]), ([], [])],
                              pipe.unet.config.cross_attention_dim)
    assert tokens["masks"][:, :2].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    text = torch.randn(2, 4, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        plain = pipe.unet(x, t, encoder_hidden_states=text).sample
        closed = gated(x, t, encoder_hidden_states=text, cross_attention_kwargs={"gligen": tokens}).sample
        for name, param in gated.named_parameters():
            if name.endswith("fuser.alpha_attn"):
                param.fill_(1.0)
        opened = gated(x, t, encoder_hidden_states=text, cross_attention_kwargs={"gligen": tokens}).sample
    assert torch.equal(plain, closed) and not torch.allclose(plain, opened)


def test_an_inpainting_unet_starts_as_the_plain_one_and_reads_the_kept_image_once_trained():
    """GLIGEN inpainting from a pretrained UNet: the first layer's new inputs (the kept latents and
    their mask) start at zero, so it draws as the plain one whatever they hold until trained; the
    saved folder is refused for generation and taken for inpainting."""
    import torch
    from engine.models.diffusion import build_tiny_pipeline, gated_unet
    pipe = build_tiny_pipeline(ModelConfig().tiny)
    unet = gated_unet(pipe.unet, inpaint=True)
    assert unet.config.in_channels == 9 and unet.conv_in.weight.shape[1] == 9
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    text = torch.randn(2, 4, pipe.unet.config.cross_attention_dim)
    kept = torch.randn(2, 5, 8, 8)
    with torch.no_grad():
        plain = pipe.unet(x, t, encoder_hidden_states=text).sample
        assert torch.equal(unet(torch.cat([x, kept], 1), t, encoder_hidden_states=text).sample, plain)
        unet.conv_in.weight[:, 4:].normal_()  # as training moves them
        assert not torch.allclose(unet(torch.cat([x, kept], 1), t, encoder_hidden_states=text).sample, plain)


def test_the_phrase_norm_folds_into_the_box_encoder_exactly():
    """GLIGEN trains its box encoder on phrase embeddings centred on the dataset's categories and
    saves it folded, taking raw embeddings as every GLIGEN pipeline gives them: the folded encoder
    on raw embeddings must give what the trained one gave on centred ones, absent boxes included."""
    import torch
    from engine.models.diffusion import build_tiny_pipeline, fold_phrase_norm, gated_unet, grounding_tokens, phrase_norm
    pipe = build_tiny_pipeline(ModelConfig().tiny)
    names = ["red square", "blue disc", "green square"]
    mean, scale = phrase_norm(pipe.tokenizer, pipe.text_encoder, names)
    dim = pipe.unet.config.cross_attention_dim
    layouts = [([[0.1, 0.1, 0.5, 0.6], [0.2, 0.3, 0.9, 0.8]], names[:2]), ([[0.0, 0.5, 0.4, 1.0]], ["a word never seen"])]
    centred = grounding_tokens(pipe.tokenizer, pipe.text_encoder, layouts, dim, (mean, scale))
    raw = grounding_tokens(pipe.tokenizer, pipe.text_encoder, layouts, dim)
    every = grounding_tokens(pipe.tokenizer, pipe.text_encoder, [([[0, 0, 1, 1]] * 3, names)], dim, (mean, scale))
    e = every["positive_embeddings"][0, :3]  # the categories' own, centred: mean 0, RMS 1
    assert torch.allclose(e.mean(0), torch.zeros(dim), atol=1e-5) and e.pow(2).mean().sqrt().item() == pytest.approx(1)
    gated = gated_unet(pipe.unet, gate=0.1)
    assert all(p.item() == pytest.approx(0.1) for n, p in gated.named_parameters() if n.endswith("fuser.alpha_attn"))
    net = gated.position_net
    with torch.no_grad():
        for p in net.parameters():  # a trained encoder, not the zero-initialised null features
            p.add_(torch.randn_like(p) * 0.1)
        trained = net(**centred)
        fold_phrase_norm(gated, mean, scale)
        folded = net(**raw)
    assert centred["masks"].sum() == 3 and torch.allclose(trained, folded, atol=1e-5)


def test_postprocess_keeps_category_names_and_limits_length():
    from engine.generation.captions import postprocess
    assert postprocess("  a dog\tlying on   grass ", ["dog"], 10, "x") == "a dog lying on grass"
    assert postprocess("a cat on a sofa next to a lamp", ["dog", "cat"], 4, "x") == "a cat on a, with dog"
    assert postprocess("hotdogs for sale", ["dog"], 10, "x") == "hotdogs for sale, with dog"  # whole words
    assert postprocess(" \x00 ", ["dog"], 10, "a photograph of dog") == "a photograph of dog"


def test_captioner_captions_each_image_once(layout_data, tmp_path):
    """A tiny BLIP-2 saved as a folder loads as a real one would; rows that reuse an image reuse
    its caption, and every caption names its layout's categories."""
    from engine.generation.captions import Captioner
    from engine.models.captioner import build_tiny_captioner
    model, processor = build_tiny_captioner()
    model.save_pretrained(tmp_path / "blip2")
    processor.save_pretrained(tmp_path / "blip2")
    plan = plan_of(layout_data, max_objects=3, rows_per_category=3, categories=["blue disc", "green square"],
                   captioner=str(tmp_path / "blip2"))
    actor = Captioner(plan.cfg, plan, shard_size=6)
    out = actor({"shard": 0})
    captions = json.loads(out["captions"])
    rows = list(plan.rows())
    assert out["shard"] == 0 and len(captions) == len(rows) == 6
    used = [r.layout.source["image_id"] for r in rows]
    assert actor.captioned == len(set(used)) == 3 < len(used)  # blue disc: images 4 and 8; green square: 6
    for r, c in zip(rows, captions):
        assert all(n in c for n in r.categories) and len(c.split()) <= 30 + 3
        assert c == captions[used.index(r.layout.source["image_id"])]
    assert json.loads(Captioner(plan.cfg, plan, shard_size=6)({"shard": 0})["captions"]) == captions
    with pytest.raises(ModelLoadError, match="not a transformers model folder"):
        Captioner(LayoutConfig(captioner=str(tmp_path)), plan, 6)


def test_inpainting_keeps_the_source_outside_the_boxes(layout_data, tmp_path):
    """GLIGEN inpainting: the mask is 0 on the boxes' latent cells only, the source image reaches
    the drawing, a sample does not depend on its batch, and a model of the other mode is refused."""
    import torch

    from engine.generation.synthesis import Synthesizer, draw, inpaint_inputs, read_source
    from engine.models.diffusion import build_tiny_pipeline, load_pipeline
    plan = plan_of(layout_data, max_objects=3, rows_per_category=1, mode="inpainting")
    pipe = load_pipeline(ModelConfig(), "cpu", layout=True, inpaint=True)
    assert pipe.unet.config.in_channels == 9
    rows = list(plan.rows())
    sources = torch.stack([read_source(r.layout.source["file"], 64, 64) for r in rows])
    _, mask = inpaint_inputs(pipe, sources, [r.layout for r in rows], (4, 32, 32))
    lay = rows[0].layout  # image 1 or 2 (red square): boxes of 20 px -> 10 latent cells
    expect = torch.ones(32, 32)
    for x0, y0, x1, y1 in lay.boxes:
        expect[round(y0 * 32):round(y1 * 32), round(x0 * 32):round(x1 * 32)] = 0
    assert torch.equal(mask[0, 0], expect)
    cfg = SynthesisConfig(steps=3)
    both = draw(pipe, [r.text for r in rows], [r.seed for r in rows], cfg, [r.layout for r in rows], 1.0, sources)
    alone = draw(pipe, [rows[1].text], [rows[1].seed], cfg, [rows[1].layout], 1.0, sources[1:2])
    assert_same_sample(alone, 0, both, 1)
    assert both.finite.all()
    # Outside the boxes the sample is the source, pixel for pixel; inside, it is redrawn.
    keep = torch.nn.functional.interpolate(mask, size=(64, 64), mode="nearest")[:, 0].bool().numpy()
    source_pixels = ((sources.permute(0, 2, 3, 1) / 2 + 0.5) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(both.images[keep], source_pixels[keep])
    assert not np.array_equal(both.images[~keep], source_pixels[~keep])
    other = draw(pipe, [rows[1].text], [rows[1].seed], cfg, [rows[1].layout], 1.0, -sources[1:2])
    assert not np.allclose(other.latents[0], alone.latents[0], atol=1e-3)
    # The Synthesizer reads each row's source image itself.
    synth = Synthesizer(ModelConfig(), cfg, plan, shard_size=2)
    shard = synth({"shard": 0})
    assert shard["status"] == ["ok", "ok"] and len(shard["layout"]) == 2
    build_tiny_pipeline(ModelConfig().tiny, layout=True).save_pretrained(tmp_path / "gligen")
    with pytest.raises(ModelLoadError, match="GLIGEN generation model .* layout.mode=inpainting"):
        load_pipeline(ModelConfig(source=str(tmp_path / "gligen")), "cpu", layout=True, inpaint=True)
    with pytest.raises(ConfigError, match="layout.mode=inpainting .* set layout.jitter=0"):
        LayoutConfig(annotations="x.json", mode="inpainting", jitter=0.1).validate()


def layout_config(out, layout_data, *extra):
    ann, root = layout_data
    return load_config(os.path.join(ROOT, "configs/tiny.yaml"), [
        f"output.path={out}", f"layout.annotations={ann}", f"layout.image_root={root}", "layout.max_objects=3",
        "layout.balance=to_target", "layout.target_instances=4", "layout.jitter=0.1", "annotation.labeller=layout",
        "synthesis.steps=3", "synthesis.batch_size=2", "output.shard_size=2", "layout.captioner=tiny", *extra])


def test_generate_labels_images_with_their_layouts(local_ray, layout_data, tmp_path):
    from engine.generation.export import export
    from engine.generation.pipeline import generate
    out = str(tmp_path / "run")
    cfg = layout_config(out, layout_data)
    plan = LayoutPlan(cfg.layout)
    assert dict(zip(plan.categories, plan.counts)) == {"blue disc": 1, "green square": 3}
    summary = generate(cfg)
    assert (summary.images, summary.shards, summary.dropped) == (4, 2, 0)
    # The prompts are the caption stage's: the tiny BLIP-2's captions, post-processed.
    from engine.generation.captions import Captioner
    captions = json.loads(Captioner(cfg.layout, plan, 4)({"shard": 0})["captions"])
    assert summary.boxes == sum(len(r.layout.boxes) for r in plan.rows())
    raw = list(wds.WebDataset(shard_urls(out), shardshuffle=False))
    assert sorted(s["__key__"] for s in raw) == [f"{i:09d}" for i in range(4)]
    for s in raw:
        meta, row = json.loads(s["json"]), plan.row(int(s["__key__"]))
        assert meta["labels"] == list(row.layout.labels) and set(meta["labellers"]) == {"layout"}
        assert meta["boxes"] == [[round(v * 64, 2) for v in b] for b in row.layout.boxes]
        assert meta["layout"] == row.layout.source and meta["prompt"] == captions[row.id] != row.text
    # A shard lost (as after a kill) is redrawn the same, captions and GLIGEN draws included, by
    # fresh actors: its tar's bytes match; a rerun with every shard whole writes nothing.
    entry = json.loads(Path(out, "manifest", "shard-000001.json").read_text())
    os.remove(os.path.join(out, "manifest", "shard-000001.json"))
    os.remove(os.path.join(out, "shards", "shard-000001.tar"))
    assert generate(cfg).shards_written == 1
    assert json.loads(Path(out, "manifest", "shard-000001.json").read_text())["sha256"] == entry["sha256"]
    assert generate(cfg).shards_written == 0
    # Export reads the layout labels as any others.
    result = export(out, preview_images=2)
    coco = json.loads(Path(result["coco"]).read_text())
    assert len(coco["images"]) == 4 and len(coco["annotations"]) == summary.boxes
    # The same output with other layouts is another dataset: refused, nothing written.
    with pytest.raises(ShardError, match="holds a different run"):
        generate(layout_config(out, layout_data, "layout.seed=1"))


def test_generate_refuses_bad_layout_input_before_writing(local_ray, layout_data, tmp_path):
    from engine.generation.pipeline import generate
    out = tmp_path / "run"
    with pytest.raises(LayoutError, match="'purple disc'"):
        generate(layout_config(out, layout_data, "layout.categories=[purple disc]"))
    from engine.models.diffusion import build_tiny_pipeline
    build_tiny_pipeline(ModelConfig().tiny).save_pretrained(tmp_path / "sd")
    with pytest.raises(ModelLoadError, match="plain Stable Diffusion folder"):
        generate(layout_config(out, layout_data, f"model.source={tmp_path / 'sd'}"))
    assert not out.exists()


def test_verification_keeps_boxes_the_teacher_agrees_with():
    """Gen2Det's rule: a layout box stays where a detection of its category overlaps it enough;
    otherwise it is refused with the reason. The teacher here is pinned to given detections, so
    that each case is known."""
    from engine.config import AnnotationConfig
    from engine.generation.annotation import MISPLACED, NOT_DETECTED, VerifiedLayoutLabeller
    from engine.generation.layouts import Layout
    labeller = VerifiedLayoutLabeller(AnnotationConfig(labeller="layout+detector", verify_iou=0.5), CATS)

    class Pinned:  # the teacher's answer for the one image below
        def label(self, images, categories):
            return [[{"bbox": [0, 0, 32, 32], "category": "red square", "score": 0.9},
                     {"bbox": [40, 40, 64, 64], "category": "blue disc", "score": 0.9}]]

    labeller.detector = Pinned()
    layout = Layout(((0.0, 0.0, 0.5, 0.5), (0.0, 0.5, 0.5, 1.0), (0.0, 0.0, 0.25, 0.25)),
                    ("red square", "blue disc", "green square"), {})
    [boxes] = labeller.label([np.zeros((64, 64, 3), np.uint8)], [["red square", "blue disc", "green square"]], [layout])
    assert [(b["category"], b.get("refused")) for b in boxes] == [
        ("red square", None), ("blue disc", MISPLACED), ("green square", NOT_DETECTED)]
    assert boxes[0]["bbox"] == [0.0, 0.0, 32.0, 32.0] and boxes[1]["iou"] == 0.0


def test_preview_draws_refused_boxes_in_their_own_colour():
    import io
    from PIL import Image
    from engine.data.sheet import BASE_COLOUR, REFUSED_COLOUR, contact_sheet
    from engine.generation.export import preview_tile
    meta = {"prompt": "a photograph of red square", "boxes": [[4, 4, 30, 30]], "labels": ["red square"],
            "scores": [1.0], "refused": [{"bbox": [34, 34, 60, 60], "category": "red square",
                                          "reason": "no detection of its category", "iou": 0.0}]}
    tile = preview_tile(Image.new("RGB", (64, 64), (128, 128, 128)), meta, set())
    assert [c for _, _, c in tile.boxes] == [BASE_COLOUR, REFUSED_COLOUR] and tile.caption[1] == "1 boxes, 1 refused"
    sheet = np.asarray(Image.open(io.BytesIO(contact_sheet([tile]))).convert("RGB")).reshape(-1, 3)
    colours = {tuple(c) for c in np.unique(sheet, axis=0)}
    assert BASE_COLOUR in colours and REFUSED_COLOUR in colours


def test_generate_counts_refused_boxes_in_the_manifest(local_ray, layout_data, tmp_path):
    from engine.generation.pipeline import generate
    out = tmp_path / "run"
    cfg = layout_config(out, layout_data, "annotation.labeller=layout+detector", "annotation.alpha=0.0",
                        "annotation.verify_iou=0.9", "layout.captioner=", "layout.balance=uniform",
                        "layout.rows_per_category=1", "layout.categories=[blue disc, green square]", "synthesis.steps=2")
    summary = generate(cfg)
    plan = LayoutPlan(cfg.layout)
    manifest = [json.loads(p.read_text()) for p in sorted((out / "manifest").glob("*.json"))]
    refused = sum(sum(m.get("refused", {}).values()) for m in manifest)
    # Every layout box is either a label or refused with its reason, and the manifest counts them.
    assert summary.boxes + refused == sum(len(r.layout.boxes) for r in plan.rows()) == 2
    assert refused > 0  # a random teacher rarely overlaps a box by IoU 0.9
    records = [json.loads(s["json"]) for s in wds.WebDataset(shard_urls(str(out)), shardshuffle=False)]
    reasons = [r["reason"] for rec in records for r in rec.get("refused", [])]
    assert sorted(reasons) == sorted(k for m in manifest for k, n in m.get("refused", {}).items() for _ in range(n))


def test_the_box_check_tells_a_gligen_that_reads_its_boxes_from_one_that_does_not(layout_data):
    """bench/gligen_grounding.py, the check to run before a layout row: with the gates open other
    boxes move the prediction; shut (as a new GLIGEN starts), they change nothing."""
    import importlib.util
    from engine.models.diffusion import load_pipeline
    spec = importlib.util.spec_from_file_location("gligen_grounding", os.path.join(ROOT, "bench/gligen_grounding.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ann, root = layout_data
    x, layouts = bench.load_images(ann, 8, root)
    assert x.shape[0] == len(layouts) > 1 and all(0 <= v <= 1 for boxes, _ in layouts for b in boxes for v in b)
    pipe = load_pipeline(ModelConfig(), "cpu", layout=True)
    reads = bench.box_losses(pipe, x, layouts)
    assert min(reads["moved"]) > 1e-5  # random weights: about 3e-4, far above float rounding (1e-7)
    for name, param in pipe.unet.named_parameters():
        if name.endswith(("fuser.alpha_attn", "fuser.alpha_dense")):
            param.data.zero_()
    shut = bench.box_losses(pipe, x, layouts)
    assert shut["own"] == shut["other"] == shut["shut"] and shut["moved"] == [0.0] * len(bench.BANDS)
