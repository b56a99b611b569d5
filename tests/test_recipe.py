"""`instagen recipe`: every config's --dry-run against fixtures of the real file formats, the
errors a user can cause (one line, exit 2, nothing written), and the recipe end to end at CI size
on an LVIS-shaped dataset, interrupted in a middle stage and finished by a rerun that redoes
none of the finished stages."""
import json
import os

import pytest
import yaml

from engine.cli import main
from engine.config import load_config
from engine.recipe import STAGES, Recipe
from engine.runtime.faults import InjectedStageFailure
from tests.fixtures_coco import COCO_NAMES, make_coco_dataset
from tests.fixtures_lvis import make_lvis_dataset
from tests.fixtures_o365 import LVIS_COCO_BASE, make_o365_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """COCO 2017's 80 categories on two small images (one object each)."""
    return make_coco_dataset(tmp_path_factory.mktemp("coco"), n_images=2, categories=COCO_NAMES, size=324)


@pytest.fixture(scope="module")
def lvis_1203(tmp_path_factory):
    """LVIS v1's shape: 1,203 categories, 337 rare, with the image counts LVIS declares."""
    return make_lvis_dataset(tmp_path_factory.mktemp("lvis1203"), n_categories=1203, train_images=6,
                             val_images=6, declared_counts=True)


def dry_run(capsys, config: str, overrides: list[str]) -> str:
    assert main(["recipe", "--config", os.path.join(ROOT, "configs", config), "--dry-run", *overrides]) == 0, \
        capsys.readouterr().err
    return capsys.readouterr().out


def coco_paths(coco, work) -> list[str]:
    ann, root = coco
    return [f"recipe.workdir={work}", "model.source=tiny", f"recipe.real.annotations={ann}",
            f"recipe.real.image_root={root}", f"detector.eval_annotations={ann}", f"detector.eval_image_root={root}"]


def test_coco_ovd_dry_run(coco, tmp_path, capsys):
    out = dry_run(capsys, "coco_ovd.yaml", coco_paths(coco, tmp_path / "work"))
    assert "48 base and 17 novel categories" in out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert list(lines)[:len(STAGES)] == list(STAGES)
    # 1,000 images per category: 48,000 base, 17,000 novel, then all 65,000 again, labelled.
    assert "48000 images of 48 categories (base 48000); 14.8 GPU-hours" in lines["base"]
    assert "17000 images of 17 categories (novel 17000)" in lines["novel_raw"]
    assert "65000 images of 65 categories (base 48000, novel 17000); 20.1 GPU-hours" in lines["final"]
    assert "generation: 40.1 GPU-hours to run at 1.0 images/s" in out
    assert not (tmp_path / "work").exists()  # a dry run writes nothing


def test_generation_stages_take_the_filter_and_the_final_set_the_masks(coco, tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "coco_ovd.yaml"),
                      coco_paths(coco, tmp_path / "work") + ["filter.enabled=true", "filter.model=tiny",
                                                             "masks.enabled=true", "masks.model=tiny"])
    recipe = Recipe(cfg, log=lambda m: None)
    stages = {s: recipe.generation_config(s, "") for s in ("base", "novel_raw", "final")}
    assert all(g.filter.enabled and g.filter.model == "tiny" for g in stages.values())
    assert [s for s, g in stages.items() if g.masks.enabled] == ["final"]


def test_dry_run_names_what_each_generation_stage_does_besides_drawing(coco, tmp_path, capsys):
    out = dry_run(capsys, "coco_ovd.yaml", coco_paths(coco, tmp_path / "work") + [
        "prompts.expand.enabled=true", "prompts.expand.model=smollm2", "filter.enabled=true", "filter.model=tiny",
        "masks.enabled=true", "masks.model=tiny", "recipe.synthetic_only=true"])
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert lines["base"].endswith("GPU-hours; prompts expanded by smollm2; CLIP filter tiny")
    assert lines["final"].endswith("; prompts expanded by smollm2; CLIP filter tiny; masks by tiny")
    assert lines["synthetic_only"].strip() == "synthetic_only runs"
    assert "synthetic_only skipped: recipe.synthetic_only is off" in dry_run(capsys, "coco_ovd.yaml",
                                                                             coco_paths(coco, tmp_path / "work"))


def test_coco_sparse_dry_run(coco, tmp_path, capsys):
    ann, _ = coco
    out = dry_run(capsys, "coco_sparse.yaml", coco_paths(coco, tmp_path / "work") + [f"prompts.categories_from={ann}"])
    assert "80 base and 0 novel categories" in out
    assert "head_st    skipped: no novel categories" in out
    assert "80000 images of 80 categories (base 80000)" in out
    assert not (tmp_path / "work").exists()


def test_lvis_ovd_dry_run(lvis_1203, tmp_path, capsys):
    train, val, root = lvis_1203
    out = dry_run(capsys, "lvis_ovd.yaml", [
        f"recipe.workdir={tmp_path / 'work'}", "model.source=tiny", f"prompts.categories_from={train}",
        f"recipe.real.annotations={train}", f"recipe.real.image_root={root}", f"detector.eval_annotations={val}",
        f"detector.eval_image_root={root}"])
    assert "866 base and 337 novel categories" in out  # LVIS v1: 405 frequent + 461 common, 337 rare
    final = next(line for line in out.splitlines() if line.split()[0] == "final")
    assert "1000000 images of 1203 categories (base/c " in final and "novel/r " in final
    assert "308.6 GPU-hours" in final  # 1M / (1 image/s x 0.9) / 3600
    assert not (tmp_path / "work").exists()


@pytest.fixture(scope="module")
def cross(tmp_path_factory):
    """The cross-dataset files: Objects365-shaped (365 categories) and LVIS-shaped (1,203), each
    with the real names of the 48 COCO base categories."""
    o365, o365_root = make_o365_dataset(tmp_path_factory.mktemp("o365"))
    lvis_train, lvis_val, lvis_root = make_lvis_dataset(tmp_path_factory.mktemp("lvis_cross"), n_categories=1203,
                                                        train_images=4, val_images=4, names=LVIS_COCO_BASE)
    return o365, o365_root, lvis_train, lvis_val, lvis_root


def cross_overrides(coco, cross, work) -> list[str]:
    ann, root = coco
    o365, o365_root, lvis_train, lvis_val, lvis_root = cross
    evaluate = (f"[{{name: objects365, annotations: {o365}, image_root: {o365_root}, format: coco}}, "
                f"{{name: lvis, annotations: {lvis_val}, image_root: {lvis_root}, format: lvis}}]")
    return [f"recipe.workdir={work}", "model.source=tiny", f"recipe.real.annotations={ann}",
            f"recipe.real.image_root={root}", f"prompts.categories_from=[{o365}, {lvis_train}]",
            f"prompts.base_list={os.path.join(ROOT, 'configs', 'coco_base_in_o365_lvis.txt')}",
            f"recipe.evaluate={evaluate}"]


def test_coco_to_o365_lvis_dry_run(coco, cross, tmp_path, capsys):
    out = dry_run(capsys, "coco_to_o365_lvis.yaml", cross_overrides(coco, cross, tmp_path / "work"))
    # 365 + 1,203 categories (no name in both files); base: the 48 COCO base categories in each
    # target's spelling.
    assert "96 base and 1472 novel categories" in out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "48000 images of 96 categories (base 24000, base/f 24000); 14.8 GPU-hours" in lines["base"]  # 500 each
    assert "784000 images of 1568 categories" in lines["final"]
    assert not (tmp_path / "work").exists()


def test_cross_dataset_real_set_is_written_in_the_targets_names(coco, cross, tmp_path):
    """The real COCO boxes of a base category go under each target name that category has: a
    "tv" box becomes a "Monitor/TV" box and a "television_set" box."""
    cfg = load_config(os.path.join(ROOT, "configs", "coco_to_o365_lvis.yaml"),
                      cross_overrides(coco, cross, tmp_path / "work"))
    recipe = Recipe(cfg, log=lambda m: None)
    assert recipe.real_name["Monitor/TV"] == "tv" and recipe.real_name["television_set"] == "tv"
    assert recipe.real_name["Person"] == "person" and recipe.real_name["person"] == "person"
    result = recipe.write_real()
    real = json.load(open(result["file"]))
    name = {c["id"]: c["name"] for c in real["categories"]}
    source = json.load(open(coco[0]))
    coco_name = {c["id"]: c["name"] for c in source["categories"]}
    per_image = {}
    for a in source["annotations"]:
        per_image.setdefault(a["image_id"], []).append(coco_name[a["category_id"]])
    written = {}
    for a in real["annotations"]:
        written.setdefault(a["image_id"], []).append(name[a["category_id"]])
    for image, names in per_image.items():
        expected = sorted(b for b in recipe.base for n in names if recipe.real_name[b] == n)
        assert sorted(written[image]) == expected
    assert "tv" not in {name[a["category_id"]] for a in real["annotations"]}  # not a target name
    assert len({a["id"] for a in real["annotations"]}) == len(real["annotations"])
    assert result["boxes"] == 2 * result["real_boxes_kept"]  # each of the 48 has one name per target


def test_cross_dataset_base_list_errors_are_one_line(coco, cross, tmp_path, capsys):
    bad = tmp_path / "base.txt"
    for text, message in [("Person = person\nTelevision = tv\n", "'Television' is not a category of the dataset"),
                          ("Person = person = human\n", "neither a name nor 'name = real name'"),
                          ("Person = person\nPerson\n", "names 'Person' twice"),
                          ("Person = human\n", "base category 'Person' \\(as 'human', prompts.base_list\\) is not in "
                                                "recipe.real.annotations")]:
        bad.write_text(text)
        args = ["recipe", "--config", os.path.join(ROOT, "configs", "coco_to_o365_lvis.yaml"), "--dry-run",
                *cross_overrides(coco, cross, tmp_path / "work"), f"prompts.base_list={bad}"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        import re
        assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "work").exists()


def test_dry_run_parses_each_annotation_file_once(lvis_1203, tmp_path, capsys, monkeypatch):
    """LVIS train is ~1 GB of JSON: the category plans, the real set's check and the dataset checks
    of one dry run read it once, not once each."""
    import collections

    from engine.data import categories
    from engine.runtime import storage
    reads = collections.Counter()
    real_read = storage.read_bytes

    def counting(path):
        reads[os.fspath(path)] += 1
        return real_read(path)
    monkeypatch.setattr(storage, "read_bytes", counting)
    monkeypatch.setattr(categories, "_loaded", {})  # no categories remembered from other tests
    train, val, root = lvis_1203
    dry_run(capsys, "lvis_ovd.yaml", [
        f"recipe.workdir={tmp_path / 'work'}", "model.source=tiny", f"prompts.categories_from={train}",
        f"recipe.real.annotations={train}", f"recipe.real.image_root={root}", f"detector.eval_annotations={val}",
        f"detector.eval_image_root={root}"])
    assert reads[train] == 1 and reads[val] == 1, reads
    # Outside the recipe's checks nothing is kept: a later read parses the file again.
    assert storage._parsed is None


def test_a_changed_file_is_parsed_again(tmp_path):
    from engine.config import ConfigError
    from engine.data.categories import load_categories
    from engine.runtime.storage import parse_once, read_json
    path = tmp_path / "cats.json"
    path.write_text(json.dumps({"categories": [{"id": 1, "name": "cat"}]}))
    with parse_once():
        assert read_json(str(path), "file", ConfigError)["categories"][0]["name"] == "cat"
        assert [c.name for c in load_categories(str(path))] == ["cat"]
        path.write_text(json.dumps({"categories": [{"id": 1, "name": "dogs"}]}))  # another size
        assert read_json(str(path), "file", ConfigError)["categories"][0]["name"] == "dogs"
        assert [c.name for c in load_categories(str(path))] == ["dogs"]
        tmp = tmp_path / "new.json"  # the same size, renamed into place: another inode
        tmp.write_text(json.dumps({"categories": [{"id": 1, "name": "cows"}]}))
        os.replace(tmp, path)
        assert [c.name for c in load_categories(str(path))] == ["cows"]


# --------------------------------------------------------------------------------------------
# The recipe at CI size


def ci_config(tmp_path, train: str, val: str, root: str) -> dict:
    """Tiny models, 6 to 15 images per generation stage (12 categories: 4 frequent, 5 common and 3
    rare, two images each), every trainer a couple of steps."""
    run = {"num_workers": 1, "cpus_per_worker": 1, "zero_stage": 0, "checkpoint_every": 100}
    return {
        "name": "ci",
        "model": {"source": "tiny"},
        "prompts": {"categories_from": train, "split": "lvis_frequency", "budget": "per_group",
                    "budget_per_group": {"r": 2, "c": 1, "f": 1}, "template_single": "a photograph of {c1}, {d1}"},
        "synthesis": {"height": 32, "width": 32, "steps": 3, "batch_size": 4},
        "annotation": {"alpha": 0.1, "beta": 0.0, "batch_size": 4},
        "output": {"shard_size": 4},
        "finetune": {"crop_size": 32, "max_steps": 2, "warmup_steps": 1, "batch_size": 2, "ema": False,
                     "grad_checkpointing": False, "run": run},
        "grounding": {"epochs": 2, "transfer_epoch": 1, "batch_size": 4, "negatives": 2,
                      "head": {"d_model": 32, "enhancer_layers": 1, "decoder_layers": 2, "num_queries": 16,
                               "n_levels": 2, "n_heads": 4, "n_points": 2, "ffn_dim": 64},
                      "run": run},
        "detector": {"image_size": 64, "max_steps": 2, "batch_size": 2, "mix_ratio": 0.5,
                     "eval_annotations": val, "eval_image_root": root, "eval_format": "lvis", "run": run},
        "ray": {"num_cpus": 2},
        "recipe": {"workdir": str(tmp_path / "work"),
                   "real": {"annotations": train, "image_root": root, "format": "lvis", "fraction": 0.75, "seed": 3},
                   "have": {"teacher": "tiny"}, "synthetic_only": True},
    }


@pytest.fixture(scope="module")
def lvis_small(tmp_path_factory):
    return make_lvis_dataset(tmp_path_factory.mktemp("lvis"), n_categories=12, train_images=12, val_images=12)


def write_config(tmp_path, data: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("override, message", [
    ("prompts.categories_from={bad}", "is not valid JSON|not .*JSON|categories"),
    ("prompts.split=by_magic", "prompts.split must be one of"),
    ("recipe.real.image_root={missing}", "recipe.real.image_root .* does not exist"),
])
def test_bad_inputs_are_one_line_and_write_nothing(lvis_small, tmp_path, capsys, override, message):
    import re
    bad = tmp_path / "bad.json"
    bad.write_text("{this is not json")
    config = write_config(tmp_path, ci_config(tmp_path, *lvis_small))
    override = override.format(bad=bad, missing=tmp_path / "no_such_folder")
    assert main(["recipe", "--config", config, override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "work").exists()


def test_unknown_stage_is_refused(lvis_small, tmp_path, capsys):
    config = write_config(tmp_path, ci_config(tmp_path, *lvis_small))
    assert main(["recipe", "--config", config, "--only", "teacher"]) == 2  # have.teacher skips it
    assert "recipe.have.teacher" in capsys.readouterr().err
    assert main(["recipe", "--config", config, "--from", "nothing"]) == 2
    assert "no such stage" in capsys.readouterr().err
    assert main(["recipe", "--config", config, "--draw-only"]) == 2
    assert "--draw-only draws a toy world" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_recipe_end_to_end_resumes_after_a_failed_stage(lvis_small, local_ray, tmp_path, monkeypatch, capsys):
    train, val, root = lvis_small
    cfg = load_config(write_config(tmp_path, ci_config(tmp_path, train, val, root)))
    ws = cfg.recipe.workdir
    # The driver dies after novel_raw wrote all its shards, before the stage was recorded.
    monkeypatch.setenv("INSTAGEN_FAULT_STAGE", "novel_raw")
    monkeypatch.setenv("INSTAGEN_FAULT_DIR", str(tmp_path))
    with pytest.raises(InjectedStageFailure):
        Recipe(cfg, log=lambda m: None).run()
    stages = json.load(open(os.path.join(ws, "stages.json")))
    assert [n for n, r in stages.items() if "result" in r] == ["real", "finetune", "base"]
    assert "result" not in stages["novel_raw"]

    messages = []
    results = Recipe(cfg, log=messages.append).run()
    status = dict(m.split(": ", 1) for m in messages if m.endswith("running") or "skipped" in m)
    assert [n for n, s in status.items() if "skipped" in s] == ["real", "finetune", "base"]
    assert [n for n, s in status.items() if s == "running"] == [
        "novel_raw", "head_sup", "head_st", "final", "detector", "synthetic_only", "evaluate"]
    record = json.load(open(os.path.join(ws, "stages.json")))
    # The interrupted stage resumed through its own shards: all of them were already written.
    assert record["novel_raw"]["result"]["shards_written"] == 0 and record["novel_raw"]["result"]["images"] == 6

    # The real subset is seeded and recorded; only base (frequent + common) boxes are kept.
    real = json.load(open(os.path.join(ws, "real", "instances.json")))
    assert len(real["images"]) == 9 and real["instagen_subset"]["seed"] == 3
    base_ids = {c["id"] for c in real["categories"] if c["frequency"] in "fc"}
    assert real["annotations"] and all(a["category_id"] in base_ids for a in real["annotations"])
    # The final set: every category, base boxes by the teacher, novel by the head.
    from engine.data.shards import iter_samples, shard_urls
    final = [s["json"] for s in iter_samples(shard_urls(os.path.join(ws, "synthetic", "final")))]
    assert len(final) == 15 and {lab for r in final for lab in r["labellers"]} <= {"detector", "grounding_head"}
    novel_raw = [s["json"] for s in iter_samples(shard_urls(os.path.join(ws, "synthetic", "novel_raw")))]
    assert novel_raw and all(r["boxes"] == [] for r in novel_raw)
    # results.json: LVIS metrics of the detector on the val split.
    saved = json.load(open(os.path.join(ws, "results.json")))
    assert saved["results"]["detector"]["format"] == "lvis"
    assert set(saved["results"]["detector"]) >= {"AP", "AP50", "APr", "APc", "APf"}
    assert saved == json.loads(json.dumps(results))
    assert os.path.exists(os.path.join(ws, "eval", "detector", "report.md"))
    # ImaginaryNet's setting: a detector of every category trained on the synthetic set alone.
    assert set(saved["results"]) == {"detector", "synthetic_only/detector"}
    assert saved["results"]["synthetic_only/detector"]["report"] == os.path.join(ws, "eval", "synthetic_only", "report.md")
    assert os.path.exists(saved["results"]["synthetic_only/detector"]["report"])
    trained = json.load(open(os.path.join(ws, "models", "synthetic_only", "config.json")))
    assert len(trained["id2label"]) == 12
    assert "| synthetic only | detector |" in saved["table"] and "| real + synthetic | detector |" in saved["table"]

    # --from evaluate: that stage runs again, nothing before it.
    messages.clear()
    Recipe(cfg, log=messages.append).run(rerun_from="evaluate")
    assert [m.split(":")[0] for m in messages if m.endswith("running")] == ["evaluate"]

    # --dry-run on the finished work folder: every stage done earlier, no GPU-hours left to run.
    capsys.readouterr()
    assert main(["recipe", "--config", str(tmp_path / "recipe.yaml"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + len(STAGES) and lines[-1].startswith("  generation: 0.0 GPU-hours to run")
    assert [line.split()[0] for line in lines[1:-1] if not line.endswith("done earlier")] == ["teacher"], lines
    assert "teacher    skipped: recipe.have.teacher tiny" in lines[3]


def test_only_runs_one_stage_after_finished_ones(tmp_path):
    from engine.config import ConfigError
    from engine.runtime.stages import Stages
    calls = []

    def stage(s, name, n, after):
        return s.run(name, {"n": n}, lambda: calls.append(name) or {"n": n}, [], after)
    s = Stages(str(tmp_path), print)
    stage(s, "a", 1, []), stage(s, "b", 1, ["a"])
    calls.clear()
    s = Stages(str(tmp_path), print, only="b", rerun=["b"])
    assert stage(s, "a", 1, []) == {"n": 1} and stage(s, "b", 1, ["a"]) == {"n": 1} and calls == ["b"]
    # A stage before the one asked for that has not finished with these settings is an error, not a run.
    with pytest.raises(ConfigError, match="--only b: stage a, which comes before it, has not finished"):
        stage(Stages(str(tmp_path), print, only="b"), "a", 2, [])
    assert calls == ["b"]


def test_a_moved_work_folder_keeps_its_finished_stages(tmp_path):
    from engine.config import fingerprint
    from engine.runtime.stages import Stage, run_plan
    calls = []

    def plan(ws: str) -> list:
        def stage(name, after=()):
            folder = os.path.join(ws, name)
            return Stage(name, {"path": folder, "other": "/elsewhere/data.json"},
                         lambda: calls.append(name) or {"path": folder, "files": [os.path.join(folder, "a.json")]},
                         [folder], list(after))
        return [stage("a"), stage("b", ["a"]), stage("c", ["a", "b"])]
    first, moved = str(tmp_path / "first"), str(tmp_path / "moved")
    run_plan(plan(first), first, print)
    os.rename(first, moved)
    calls.clear()
    results = run_plan(plan(moved), moved, print)
    assert calls == [] and results["c"] == {"path": os.path.join(moved, "c"), "files": [os.path.join(moved, "c", "a.json")]}
    assert "first" not in open(os.path.join(moved, "stages.json")).read()

    # A work folder recorded before paths were relative keeps its stages too, over two runs where
    # the first one ends (is killed) having recorded only some of them under their new keys.
    old = str(tmp_path / "old")
    os.makedirs(old)
    record, stages = {}, plan(old)
    for s in stages:
        key = fingerprint(json.loads(json.dumps({"inputs": s.inputs, "after": [record[a]["key"] for a in s.after]})))
        record[s.name] = {"key": key, "reruns": 0, "result": s.fn(), "seconds": 1.0}
    with open(os.path.join(old, "stages.json"), "w") as f:
        json.dump(record, f)
    calls.clear()
    assert set(run_plan(stages[:2], old, print, dry=True).values()) == {"done earlier"}
    from engine.runtime.stages import Stages
    partial = Stages(old, print)
    partial.run("a", stages[0].inputs, stages[0].fn, [], [])
    partial._save()  # as a later stage running would, before the process ends
    assert set(run_plan(plan(old), old, print, dry=True).values()) == {"done earlier"}
    assert run_plan(plan(old), old, print)["c"]["path"] == os.path.join(old, "c") and calls == []
    # A changed input still reruns its stage and those after it.
    changed = plan(old)
    changed[1].inputs["other"] = "/elsewhere/new.json"
    run_plan(changed, old, print)
    assert calls == ["b", "c"]


def test_run_plan_runs_declared_stages_and_a_dry_run_says_what_it_would_do(tmp_path):
    from engine.config import ConfigError
    from engine.runtime.stages import Stage, run_plan
    calls = []

    def plan(b_input: int = 1) -> list:
        def stage(name, inputs, after=()):
            return Stage(name, {"n": inputs}, lambda: calls.append(name) or {"n": inputs}, [], list(after))
        return [stage("a", 1), stage("b", b_input, ["a"]), Stage("c", skipped="the user has it"),
                stage("d", 1, ["b", "c"]), stage("e", 1, ["a"])]
    ws = str(tmp_path / "ws")
    assert run_plan(plan(), ws, print, dry=True) == {"a": "runs", "b": "runs", "c": "skipped: the user has it", "d": "runs",
                                       "e": "runs"}
    assert not os.path.exists(ws)  # the dry run writes nothing
    assert run_plan(plan(), ws, print)["d"] == {"n": 1} and calls == ["a", "b", "d", "e"]
    assert set(run_plan(plan(), ws, print, dry=True).values()) == {"done earlier", "skipped: the user has it"}
    # A changed input: that stage and those reading it run, the others are done.
    status = run_plan(plan(b_input=2), ws, print, dry=True)
    assert [n for n, s in status.items() if s == "runs"] == ["b", "d"]
    calls.clear()
    run_plan(plan(b_input=2), ws, print)
    assert calls == ["b", "d"]
    # --from: that stage and every finished stage after it; --only: one stage, nothing after it.
    calls.clear()
    run_plan(plan(b_input=2), ws, print, rerun_from="d")
    assert calls == ["d", "e"]
    # A dry run with the same flags says so first.
    assert run_plan(plan(b_input=2), ws, print, dry=True, only="b", rerun=["b"]) == {
        "a": "done earlier", "b": "runs", "c": "skipped: the user has it", "d": "not run (--only b)",
        "e": "not run (--only b)"}
    calls.clear()
    assert set(run_plan(plan(b_input=2), ws, print, only="b", rerun=["b"])) == {"a", "b"} and calls == ["b"]
    assert run_plan(plan(b_input=2), ws, print, dry=True)["d"] == "runs"  # b ran again: d reads it
    for flags, message in (({"rerun_from": "c"}, "--from c: the config skips it .the user has it."),
                           ({"only": "x"}, "--only x: no such stage; the stages are a, b, c, d, e"),
                           ({"only": "a", "rerun_from": "b"}, "choose one")):
        with pytest.raises(ConfigError, match=message):
            run_plan(plan(), ws, print, **flags)
