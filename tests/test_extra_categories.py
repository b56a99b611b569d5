"""Category diversity (DiverGen): prompts.extra adds categories beyond base + novel, generated and
kept in the shards under their own names; the export keeps them, leaves them out, or relabels
each to the category it stands for. Bad extra lists end in one clear line."""
import io
import json
import os

import pytest
from PIL import Image

from engine.cli import main
from engine.config import ConfigError, PromptConfig
from engine.data.shards import ShardError, ShardStore
from engine.generation.export import export
from engine.generation.prompts import PromptPlan

BASE, NOVEL = ["dog", "cat"], ["zebra"]


def plan(tmp_path, lines: str, **kw) -> PromptPlan:
    path = tmp_path / "extra.txt"
    path.write_text(lines)
    return PromptPlan(PromptConfig(base=BASE, novel=NOVEL, extra=str(path), images_per_category=2, **kw))


def test_extra_categories_join_generate_all_and_extra_selects_them(tmp_path):
    p = plan(tmp_path, "# ImageNet classes\nbeagle = dog\n\ntabby\n", generate="all")
    assert p.categories == ["dog", "cat", "zebra", "beagle", "tabby"] and len(p) == 10
    assert p.extra == {"beagle": "dog", "tabby": ""}
    assert [r.categories[0] for r in p.rows(6, 10)] == ["beagle", "beagle", "tabby", "tabby"]
    only = plan(tmp_path, "beagle = dog\ntabby\n", generate="extra")
    assert only.categories == ["beagle", "tabby"] and only.base == BASE
    assert plan(tmp_path, "beagle = dog\n", generate="base").categories == BASE


@pytest.mark.parametrize("lines, message", [
    ("beagle\nbeagle\n", "names 'beagle' twice"),
    ("cat\n", "names 'cat', which is already a base or novel category"),
    ("beagle = dgo\n", "target 'dgo' of 'beagle' is not a base or novel category \\(did you mean 'dog'\\?\\)"),
    ("beagle = dog = cat\n", "is neither a name nor 'name = target'"),
    ("# nothing\n", "names no category"),
])
def test_bad_extra_lists_are_one_line(tmp_path, lines, message):
    with pytest.raises(ConfigError, match=message) as e:
        plan(tmp_path, lines, generate="all")
    assert "\n" not in str(e.value)


def test_a_missing_extra_list_and_generate_extra_without_one_are_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    for override, message in ((f"prompts.extra={tmp_path / 'nope.txt'}", "extra list .* does not exist; set prompts.extra"),
                              ("prompts.generate=extra", "prompts.generate=extra draws the categories of prompts.extra")):
        assert main(["generate", "--dry-run", override, f"output.path={out}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and __import__("re").search(message, err), err
    assert not out.exists()


def write_output(tmp_path) -> str:
    """One shard as a generate run with prompts.extra writes it: a base, an extra mapped to a base
    category, and an extra that stands for none."""
    out = str(tmp_path / "out")
    store = ShardStore(out)
    claim = store.prepare({"fingerprint": "x", "categories": BASE + NOVEL + ["beagle", "tabby"], "base": BASE,
                           "novel": NOVEL, "extra": {"beagle": "dog", "tabby": ""}})
    jpg = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 30)).save(jpg, format="JPEG")
    samples = []
    for k, (prompted, labels) in enumerate([(["dog"], ["dog"]), (["beagle", "cat"], ["beagle", "beagle", "cat"]),
                                            (["tabby"], ["tabby"]), (["tabby", "zebra"], [])]):
        meta = {"id": k, "width": 16, "height": 16, "prompt": " and ".join(prompted), "seed_used": k,
                "categories": prompted, "boxes": [[1, 1, 5 + i, 6] for i in range(len(labels))], "labels": labels,
                "scores": [0.9] * len(labels), "labellers": ["grounding_head"] * len(labels)}
        samples.append({"__key__": f"{k:09d}", "jpg": jpg.getvalue(), "json": json.dumps(meta)})
    store.write_shard(0, samples, [], claim)
    return out


def exported(out: str, dest: str, extra: str) -> tuple[dict, list]:
    export(out, dest=dest, write_images=False, preview_images=2, extra=extra)
    return (json.load(open(os.path.join(dest, "lvis.json"))),
            [json.loads(line)["categories"] for line in open(os.path.join(dest, "image_labels.jsonl"))])


def test_export_keeps_drops_or_maps_the_extra_categories(local_ray, tmp_path):
    out = write_output(tmp_path)
    kept, labels = exported(out, str(tmp_path / "keep"), "keep")
    assert [(c["name"], c["split"]) for c in kept["categories"]] == [
        ("dog", "base"), ("cat", "base"), ("zebra", "novel"), ("beagle", "extra"), ("tabby", "extra")]
    assert [a["category_id"] for a in kept["annotations"]] == [1, 4, 4, 2, 5]
    assert labels == [["dog"], ["beagle", "cat"], ["tabby"], ["tabby", "zebra"]]

    dropped, labels = exported(out, str(tmp_path / "drop"), "drop")
    assert [c["name"] for c in dropped["categories"]] == BASE + NOVEL
    assert [a["category_id"] for a in dropped["annotations"]] == [1, 2]
    assert len({a["id"] for a in dropped["annotations"]}) == 2
    assert labels == [["dog"], ["cat"], [], ["zebra"]] and len(dropped["images"]) == 4

    mapped, labels = exported(out, str(tmp_path / "map"), "map")
    assert [c["name"] for c in mapped["categories"]] == BASE + NOVEL
    assert [a["category_id"] for a in mapped["annotations"]] == [1, 1, 1, 2]  # beagle boxes are dogs now
    assert [c["image_count"] for c in mapped["categories"]] == [2, 1, 0]
    assert labels == [["dog"], ["cat", "dog"], [], ["zebra"]]
    assert [im["not_exhaustive_category_ids"] for im in mapped["images"]] == [[], [], [], [3]]


def test_an_unknown_extra_rule_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = write_output(tmp_path)
    dest = tmp_path / "dest"
    assert main(["export", "--output", out, "--dest", str(dest), "--extra", "merge"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "export --extra 'merge': choose keep, drop or map" in err, err
    assert not dest.exists()


def test_generate_draws_the_extra_categories_and_records_their_targets(local_ray, tmp_path):
    from engine.config import load_config
    from engine.data.shards import iter_samples, shard_urls
    from engine.generation.pipeline import generate
    extra, out = tmp_path / "extra.txt", str(tmp_path / "gen")
    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")
    overrides = [f"prompts.extra={extra}", "prompts.generate=extra", "prompts.images_per_category=2",
                 "synthesis.steps=2", "output.shard_size=2", f"output.path={out}"]
    extra.write_text("beagle = dog\n")
    assert generate(load_config(tiny, overrides)).images == 2
    run = ShardStore(out).run_info()
    assert run["extra"] == {"beagle": "dog"} and run["categories"][-1] == "beagle"
    assert [s["json"]["categories"] for s in iter_samples(shard_urls(out))] == [["beagle"], ["beagle"]]
    # Another target is another dataset: the rerun refuses the folder rather than mixing them.
    extra.write_text("beagle = person\n")
    with pytest.raises(ShardError, match="holds a different run"):
        generate(load_config(tiny, overrides))
