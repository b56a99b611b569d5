"""Categories read from a dataset's annotation file: names for prompts, base/novel splits,
per-category budgets, the plan summary, and one clear line for each bad input."""
import json

import pytest
from fixtures_coco import COCO_IDS, COCO_NAMES

from engine.config import ConfigError, PromptConfig, load_config
from engine.data.categories import (
    OVR_CNN_COCO_BASE,
    OVR_CNN_COCO_NOVEL,
    assign_budgets,
    inverse_frequency_counts,
    load_categories,
    load_category_files,
    normalise_name,
    plan_categories,
    plan_summary,
    split_categories,
)


# An LVIS-shaped vocabulary: (name, frequency, image_count), with parenthesised senses and the
# two bats that a prompt must tell apart.
LVIS = ([(n, "r", k) for k, n in enumerate(
            ["bat_(animal)", "aardvark", "armoire", "bolo_tie", "poncho", "sawhorse", "tux_(tuxedo)", "Bible",
             "gargoyle", "cougar"], start=1)]
        + [(n, "c", 10 + 8 * k) for k, n in enumerate(
            ["bat_(sports_equipment)", "pan_(for_cooking)", "Band_Aid", "aerosol_can", "alarm_clock", "anklet",
             "apron", "armband", "avocado", "baguet", "birdbath", "bow_(weapon)"], start=1)]
        + [(n, "f", 200 * k) for k, n in enumerate(
            ["apple", "banana", "bowl", "person", "car_(automobile)", "chair", "cup", "dog", "bottle", "book",
             "bench", "boat", "bow_(decorative_ribbons)", "cat"], start=1)])
SYNONYMS = {"car_(automobile)": ["car_(automobile)", "auto_(automobile)", "automobile"],
            "aerosol_can": ["aerosol_can", "spray_can"], "bat_(animal)": ["bat_(animal)"]}


def write(tmp_path, name, obj) -> str:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def lvis_categories() -> list[dict]:
    cats = [{"id": i, "name": n, "frequency": f, "image_count": k, "instance_count": 3 * k,
             "synonyms": SYNONYMS.get(n, [n]), "def": f"a  definition of\n{n}", "synset": f"{n}.n.01"}
            for i, (n, f, k) in enumerate(LVIS, start=1)]
    return cats[::-1]  # out of id order: the reader sorts by id


@pytest.fixture
def lvis_file(tmp_path) -> str:
    return write(tmp_path, "lvis_v1_train.json", {"images": [], "annotations": [], "categories": lvis_categories()})


@pytest.fixture
def coco_file(tmp_path) -> str:
    """COCO's 80 categories; category index k has k + 1 images (one box each, two on image 0)."""
    boxes = [(img, cid) for k, cid in enumerate(COCO_IDS) for img in range(k + 1)] + [(0, 1)]
    anns = [{"id": i, "image_id": img, "category_id": cid, "bbox": [0, 0, 1, 1]} for i, (img, cid) in enumerate(boxes)]
    anns.append("not an annotation")  # counted by no category (datasets.py reports such entries)
    return write(tmp_path, "instances_train2017.json", {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 8, "height": 8} for i in range(80)],
        "annotations": anns, "categories": [{"id": i, "name": n, "supercategory": "thing"}
                                            for i, n in zip(COCO_IDS, COCO_NAMES)]})


def by_name(cats):
    return {c.name: c for c in cats}


# Names for prompts ------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, prompt_name, sense", [
    ("bat_(animal)", "bat", "animal"),
    ("bat_(sports_equipment)", "bat", "sports equipment"),
    ("pan_(for_cooking)", "pan", "for cooking"),
    ("aerosol_can", "aerosol can", ""),
    ("Band_Aid", "Band Aid", ""),  # case is the dataset's
    ("hot dog", "hot dog", ""),
    ("Cabinet/shelf", "Cabinet/shelf", ""),  # Objects365
    ("(animal)", "(animal)", ""),  # no word before the parentheses: nothing to split off
])
def test_names_are_normalised_for_prompts(raw, prompt_name, sense):
    assert normalise_name(raw) == (prompt_name, sense)


def test_lvis_file_gives_every_field(lvis_file):
    cats = load_categories(lvis_file)
    assert [c.id for c in cats] == list(range(1, len(LVIS) + 1))
    cats = by_name(cats)
    assert set(cats) == {n for n, _, _ in LVIS}  # raw names are the identity
    bat, sports_bat, car = cats["bat_(animal)"], cats["bat_(sports_equipment)"], cats["car_(automobile)"]
    assert (bat.prompt_name, bat.sense, sports_bat.prompt_name, sports_bat.sense) == \
        ("bat", "animal", "bat", "sports equipment")
    assert car.synonyms == ("auto", "automobile")  # normalised, the prompt name itself left out
    assert bat.synonyms == ()
    assert cats["aerosol_can"].synonyms == ("spray can",)
    assert car.definition == "a definition of car_(automobile)"  # whitespace collapsed to one line
    assert (bat.frequency, bat.image_count, bat.instance_count) == ("r", 1, 3)
    assert (car.frequency, car.image_count) == ("f", 1000)
    assert all(c.split == "" and c.images == 0 for c in cats.values())


def test_coco_file_counts_images_from_annotations(coco_file):
    cats = load_categories(coco_file)
    assert len(cats) == 80 and [c.id for c in cats] == COCO_IDS
    person, toothbrush = cats[0], cats[-1]
    assert (person.image_count, person.instance_count) == (1, 2)  # two boxes on one image
    assert (toothbrush.image_count, toothbrush.instance_count) == (80, 80)
    assert all(c.frequency == "" and c.synonyms == () and c.definition == "" for c in cats)


# Splits -----------------------------------------------------------------------------------------

def test_lvis_frequency_split(lvis_file):
    cats = split_categories(load_categories(lvis_file), "lvis_frequency")
    novel = {c.name for c in cats if c.split == "novel"}
    base = {c.name for c in cats if c.split == "base"}
    assert novel == {n for n, f, _ in LVIS if f == "r"}
    assert base == {n for n, f, _ in LVIS if f in "cf"} and len(base) == 26


def test_ovr_cnn_coco_split_is_48_17_and_matches_the_paper_config(coco_file):
    assert (len(OVR_CNN_COCO_BASE), len(OVR_CNN_COCO_NOVEL)) == (48, 17)
    assert not set(OVR_CNN_COCO_BASE) & set(OVR_CNN_COCO_NOVEL)
    paper = load_config("configs/coco_ovd.yaml").prompts
    assert (list(OVR_CNN_COCO_BASE), list(OVR_CNN_COCO_NOVEL)) == (paper.base, paper.novel)
    cats = split_categories(load_categories(coco_file), "ovr_cnn_coco")
    splits = {s: {c.name for c in cats if c.split == s} for s in ("base", "novel", "")}
    assert splits["base"] == set(OVR_CNN_COCO_BASE) and splits["novel"] == set(OVR_CNN_COCO_NOVEL)
    assert splits[""] == {"traffic light", "fire hydrant", "stop sign", "parking meter", "sports ball",
                          "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "potted plant",
                          "dining table", "cell phone", "teddy bear", "hair drier"}


def test_list_split_reads_novel_names(lvis_file, tmp_path):
    novel = write(tmp_path, "novel.txt", "# LVIS names, as the file spells them\nbat_(animal)\n\n  cat  \nBand_Aid\n")
    cats = by_name(split_categories(load_categories(lvis_file), "list", novel))
    assert {n for n, c in cats.items() if c.split == "novel"} == {"bat_(animal)", "cat", "Band_Aid"}
    assert sum(c.split == "base" for c in cats.values()) == len(LVIS) - 3


def test_all_base(coco_file):
    assert {c.split for c in split_categories(load_categories(coco_file), "all_base")} == {"base"}


# Budgets ----------------------------------------------------------------------------------------

def test_uniform_budget_gives_split_categories_n_each(coco_file):
    cats = assign_budgets(split_categories(load_categories(coco_file), "ovr_cnn_coco"), "uniform", per_category=7)
    assert {c.images for c in cats if c.split} == {7} and {c.images for c in cats if not c.split} == {0}
    assert sum(c.images for c in cats) == 65 * 7


def test_per_group_budget(lvis_file):
    cats = split_categories(load_categories(lvis_file), "lvis_frequency")
    cats = assign_budgets(cats, "per_group", per_group={"r": 100, "c": 20, "f": 5})
    assert {(c.frequency, c.images) for c in cats} == {("r", 100), ("c", 20), ("f", 5)}
    assert sum(c.images for c in cats) == 10 * 100 + 12 * 20 + 14 * 5


def test_inverse_frequency_sums_to_total_within_floor_and_ceiling(lvis_file):
    cats = split_categories(load_categories(lvis_file), "lvis_frequency")
    planned = assign_budgets(cats, "inverse_frequency", total=5000, floor=20, ceiling=800)
    images = [c.images for c in planned]
    assert sum(images) == 5000 and min(images) >= 20 and max(images) <= 800
    assert all(isinstance(n, int) for n in images)
    # Rarer categories never get fewer images, and the rarest reach the ceiling, the commonest the floor.
    ranked = sorted(planned, key=lambda c: (c.image_count, -c.images))
    assert all(a.images >= b.images for a, b in zip(ranked, ranked[1:]))
    assert ranked[0].images == 800 and ranked[-1].images == 20
    # Between the bounds counts follow 1 / image_count (to within rounding).
    free = [c for c in planned if 20 < c.images < 800]
    assert len(free) >= 3
    scale = free[0].images * free[0].image_count
    assert all(abs(c.images - scale / c.image_count) <= 1 + 0.01 * c.images for c in free)
    # The same input always gives the same plan.
    again = assign_budgets(cats, "inverse_frequency", total=5000, floor=20, ceiling=800)
    assert [c.images for c in again] == images


def test_inverse_frequency_counts_exactly():
    assert inverse_frequency_counts([1, 2, 4], 7) == [4, 2, 1]
    assert inverse_frequency_counts([1, 2, 4], 70, floor=20) == [30, 20, 20]
    assert inverse_frequency_counts([1, 1, 1], 10) == [4, 3, 3]  # ties: the earlier one first
    assert inverse_frequency_counts([0, 1], 4, ceiling=2) == [2, 2]  # 0 images reads as 1; ceiling binds
    assert inverse_frequency_counts([5, 5], 6, floor=3, ceiling=3) == [3, 3]
    # LVIS-sized, both bounds binding: the rarest at the ceiling, the commonest at the floor.
    counts = inverse_frequency_counts(list(range(1, 1204)), 300_000, floor=100, ceiling=5000)
    assert sum(counts) == 300_000 and min(counts) == 100 and max(counts) == 5000
    assert counts == sorted(counts, reverse=True)


def test_inverse_frequency_on_coco_uses_counted_images(coco_file):
    cats = split_categories(load_categories(coco_file), "all_base")
    planned = assign_budgets(cats, "inverse_frequency", total=800, floor=1)
    assert sum(c.images for c in planned) == 800
    assert planned[0].images > planned[1].images > planned[-1].images >= 1  # 1, 2 ... 80 images


# The plan through the config ---------------------------------------------------------------------

def test_plan_from_config_and_summary(lvis_file):
    cfg = load_config(None, [f"prompts.categories_from={lvis_file}", "prompts.split=lvis_frequency",
                             "prompts.budget=per_group", "prompts.budget_per_group={r: 50, c: 10, f: 2}"])
    summary = plan_summary(plan_categories(cfg.prompts))
    assert json.loads(json.dumps(summary)) == summary == {
        "categories": 36, "images": 10 * 50 + 12 * 10 + 14 * 2,
        "by_split": {"base": {"categories": 26, "images": 12 * 10 + 14 * 2},
                     "novel": {"categories": 10, "images": 500}},
        "by_frequency": {"c": {"categories": 12, "images": 120}, "f": {"categories": 14, "images": 28},
                         "r": {"categories": 10, "images": 500}}}


def test_prompt_rows_follow_the_dataset_plan(lvis_file, capsys):
    """Generation's rows from a dataset's categories: each category as many rows as its budget,
    the prompt in plain words with the definition that tells the two bats apart, the label the
    dataset's own name; and `generate --dry-run` prints the plan."""
    from engine.cli import main
    from engine.generation.prompts import PromptPlan
    overrides = ["prompts.base=[]", "prompts.novel=[]", f"prompts.categories_from={lvis_file}",
                 "prompts.split=lvis_frequency", "prompts.generate=all",
                 "prompts.budget=per_group", "prompts.budget_per_group={r: 6, c: 2, f: 1}", "prompts.max_categories=1",
                 "prompts.template_single=a photograph of a {c1}, {d1}"]
    plan = PromptPlan(load_config("configs/tiny.yaml", overrides).prompts)
    assert len(plan) == 10 * 6 + 12 * 2 + 14 * 1 and len(plan.novel) == 10 and "bat_(animal)" in plan.novel
    rows = list(plan.rows())
    bats = [r for r in rows if r.categories == ("bat_(animal)",)]
    assert len(bats) == 6 and bats[0].text == "a photograph of a bat, a definition of bat_(animal)"
    assert [r.seed for r in rows[10:20]] == [r.seed for r in plan.rows(10, 20)], "any range, same rows"
    assert main(["generate", "--dry-run", "--config", "configs/tiny.yaml", *overrides]) == 0
    out = capsys.readouterr().out
    assert "98 prompts of 36 categories" in out and "novel 10 categories / 60 images" in out


def test_coco_summary_counts_categories_in_neither_split(coco_file):
    cfg = PromptConfig(categories_from=coco_file, split="ovr_cnn_coco", images_per_category=3)
    summary = plan_summary(plan_categories(cfg))
    assert summary["by_split"] == {"base": {"categories": 48, "images": 144},
                                   "neither": {"categories": 15, "images": 0},
                                   "novel": {"categories": 17, "images": 51}}
    assert summary["by_frequency"] == {"none": {"categories": 80, "images": 195}}


def test_defaults_leave_typed_categories_as_they_were():
    cfg = load_config("configs/tiny.yaml")
    assert cfg.prompts.categories_from == "" and cfg.prompts.budget == "uniform"
    assert cfg.prompts.base == ["person", "bicycle", "car", "dog"]


# Bad input: one line naming the problem and the fix ------------------------------------------------

def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


@pytest.mark.parametrize("overrides, expected", [
    (["prompts.split=lvis_frequency"], "prompts.split applies to categories read from a dataset"),
    (["prompts.budget=inverse_frequency"], "prompts.budget applies to categories read from a dataset"),
    (["prompts.categories_from=x.json"], "prompts.split must be one of lvis_frequency, list"),
    (["prompts.categories_from=x.json", "prompts.split=by_size"], "got 'by_size'"),
    (["prompts.categories_from=x.json", "prompts.split=list"], "prompts.novel_list"),
    (["prompts.categories_from=x.json", "prompts.split=all_base", "prompts.novel_list=n.txt"],
     "prompts.novel_list"),
    (["prompts.categories_from=x.json", "prompts.split=base_list"], "prompts.base_list: set both, or neither"),
    (["prompts.categories_from=x.json", "prompts.split=list", "prompts.novel_list=n.txt",
      "prompts.base_list=b.txt"], "prompts.split=base_list reads the base categories from prompts.base_list"),
    (["prompts.base_list=b.txt"], "prompts.base_list applies to categories read from a dataset"),
    (["prompts.categories_from=[x.json, x.json]", "prompts.split=all_base"], "lists a file twice"),
    (["prompts.categories_from=[x.json, '']", "prompts.split=all_base"], "lists an empty file name"),
    (["prompts.categories_from=x.json", "prompts.split=all_base", "prompts.base=[cat]"],
     "prompts.base / prompts.novel are typed lists"),
    (["prompts.categories_from=x.json", "prompts.split=all_base", "prompts.budget=log"],
     "prompts.budget must be one of uniform, per_group, inverse_frequency"),
    (["prompts.categories_from=x.json", "prompts.split=all_base", "prompts.budget=per_group"],
     "prompts.budget_per_group"),
    (["prompts.categories_from=x.json", "prompts.split=all_base", "prompts.budget=per_group",
      "prompts.budget_per_group={rare: 10}"], "group 'rare'"),
    (["prompts.categories_from=x.json", "prompts.split=all_base", "prompts.budget=per_group",
      "prompts.budget_per_group={r: 0}"], "at least one group a positive count"),
    (["prompts.categories_from=x.json", "prompts.split=all_base", "prompts.budget_total=100"],
     "prompts.budget_total applies to prompts.budget=inverse_frequency"),
    (["prompts.categories_from=x.json", "prompts.split=all_base", "prompts.budget=inverse_frequency"],
     "prompts.budget_total"),
    (["prompts.categories_from=x.json", "prompts.split=all_base", "prompts.budget=inverse_frequency",
      "prompts.budget_total=100", "prompts.budget_floor=10", "prompts.budget_ceiling=5"],
     r"budget_floor \(10\) is above prompts.budget_ceiling \(5\)"),
])
def test_bad_config_values_are_one_line(overrides, expected):
    with pytest.raises(ConfigError, match=expected) as e:
        load_config(None, overrides)
    one_line(e)


@pytest.mark.parametrize("content, expected", [
    (None, "does not exist"),
    ("{not json", "is not valid JSON"),
    ([1, 2], "has no 'categories' list"),
    ({"images": []}, "has no 'categories' list"),
    ({"categories": []}, "has no 'categories' list"),
    ({"categories": [{"id": 1}]}, "category 0 \\(id 1\\) has no usable 'name'"),
    ({"categories": [{"id": 1, "name": "  "}]}, "has no usable 'name'"),
    ({"categories": [{"id": 1, "name": "cat\u001b[31m"}]}, "has no usable 'name'"),
    ({"categories": [{"name": "cat"}]}, "has no integer 'id'"),
    ({"categories": ["cat"]}, "not an object with 'id' and 'name'"),
    ({"categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "cat"}]}, "category name 'cat' twice"),
    ({"categories": [{"id": 1, "name": "cat"}, {"id": 1, "name": "dog"}]}, "category id 1 twice"),
    ({"categories": [{"id": 1, "name": "cat", "frequency": "x"}]}, "frequency 'x'"),
    ({"categories": [{"id": 1, "name": "cat", "synonyms": "kitty"}]}, "'synonyms' must be a list"),
    ({"categories": [{"id": 1, "name": "cat", "image_count": -1}]}, "image_count must be a count"),
])
def test_bad_category_files_are_one_line(tmp_path, content, expected):
    path = str(tmp_path / "missing.json") if content is None else write(tmp_path, "bad.json", content)
    with pytest.raises(ConfigError, match=expected) as e:
        load_categories(path)
    assert path in one_line(e)


def test_a_folder_is_not_a_category_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read") as e:
        load_categories(str(tmp_path))
    one_line(e)


def test_bad_novel_lists_are_one_line(lvis_file, tmp_path):
    cats = load_categories(lvis_file)
    cases = [(str(tmp_path / "none.txt"), "does not exist"),
             (write(tmp_path, "typo.txt", "bat_(animal)\nbat_(animl)\n"),
              r"'bat_\(animl\)' is not a category of the dataset \(did you mean 'bat_\(animal\)'\?\)"),
             (write(tmp_path, "prompt_names.txt", "bat\naerosol can\n"), r"\(2 names missing\)"),
             (write(tmp_path, "twice.txt", "cat\ncat\n"), "names 'cat' twice"),
             (write(tmp_path, "empty.txt", "# nothing\n\n"), "names no category")]
    for path, expected in cases:
        with pytest.raises(ConfigError, match=expected) as e:
            split_categories(cats, "list", path)
        one_line(e)


def test_rules_that_need_what_the_file_lacks_are_one_line(coco_file, lvis_file, tmp_path):
    coco = load_categories(coco_file)
    lvis = split_categories(load_categories(lvis_file), "lvis_frequency")
    no_counts = load_categories(write(tmp_path, "no_counts.json", {"categories": [{"id": 1, "name": "cat"}]}))
    cases = [
        (lambda: split_categories(coco, "lvis_frequency"), "needs LVIS frequency groups, but category 'person'"),
        (lambda: split_categories(lvis, "ovr_cnn_coco"), "needs COCO's category names"),
        (lambda: split_categories(coco, "by_size"), "prompts.split must be one of"),
        (lambda: assign_budgets(lvis, "log"), "prompts.budget must be one of"),
        (lambda: assign_budgets(coco, "uniform", per_category=1), "no category is in the base or novel split"),
        (lambda: assign_budgets(split_categories(coco, "all_base"), "per_group", per_group={"f": 1}),
         "needs LVIS frequency groups"),
        (lambda: assign_budgets(lvis, "per_group", per_group={"r": 5, "f": 1}), "no count for group 'c'"),
        (lambda: assign_budgets(split_categories(no_counts, "all_base"), "inverse_frequency", total=10),
         "needs each category's image count"),
        (lambda: assign_budgets(lvis, "inverse_frequency", total=0), "budget_total must be a positive"),
        (lambda: assign_budgets(lvis, "inverse_frequency", total=100, floor=5, ceiling=4),
         "budget_floor \\(5\\) is above"),
        (lambda: assign_budgets(lvis, "inverse_frequency", total=100, floor=3),
         "needs 108 images, more than prompts.budget_total=100"),
        (lambda: assign_budgets(lvis, "inverse_frequency", total=100, ceiling=2),
         "allows 72 images, fewer than prompts.budget_total=100"),
        (lambda: plan_categories(PromptConfig()), "prompts.categories_from is empty"),
    ]
    for call, expected in cases:
        with pytest.raises(ConfigError, match=expected) as e:
            call()
        one_line(e)


# --------------------------------------------------------------------------------------------
# Cross-dataset: categories from several files, base named by a list (split=base_list)


@pytest.fixture
def two_targets(tmp_path):
    """An Objects365-like and an LVIS-like file: capitalised names, one slash name, one LVIS sense,
    and one name ("earphone") that both spell alike."""
    o365 = write(tmp_path, "o365.json", {"categories": [{"id": 1, "name": "Person"}, {"id": 2, "name": "Monitor/TV"},
                                                        {"id": 3, "name": "earphone"}, {"id": 4, "name": "Lion"}],
                                         "images": [], "annotations": []})
    lvis = write(tmp_path, "lvis.json", {"categories": [
        {"id": 1, "name": "person", "frequency": "f", "image_count": 100},
        {"id": 2, "name": "television_set", "frequency": "f", "image_count": 50},
        {"id": 3, "name": "earphone", "frequency": "c", "image_count": 20},
        {"id": 4, "name": "bat_(animal)", "frequency": "r", "image_count": 2}]})
    return o365, lvis


def test_categories_from_several_files_keep_each_spelling_and_merge_exact_names(two_targets):
    cats = load_category_files(list(two_targets))
    # "Person" and "person" stay two (each dataset scores its own name); "earphone" is one, the first
    # file's entry (no LVIS group).
    assert [c.name for c in cats] == ["Person", "Monitor/TV", "earphone", "Lion", "person", "television_set",
                                      "bat_(animal)"]
    assert next(c for c in cats if c.name == "earphone").frequency == ""


def test_base_list_names_base_categories_and_their_real_names(two_targets, tmp_path):
    base = write(tmp_path, "base.txt", "# COCO-base in the targets' names\nPerson = person\nperson\n"
                                       "Monitor/TV = tv\n\ntelevision_set=tv\n")
    cats = split_categories(load_category_files(list(two_targets)), "base_list", base_list=base)
    split = {c.name: (c.split, c.real_name) for c in cats}
    assert split == {"Person": ("base", "person"), "person": ("base", ""), "Monitor/TV": ("base", "tv"),
                     "television_set": ("base", "tv"), "earphone": ("novel", ""), "Lion": ("novel", ""),
                     "bat_(animal)": ("novel", "")}
    cfg = PromptConfig(categories_from=list(two_targets), split="base_list", base_list=base, images_per_category=2)
    assert plan_summary(plan_categories(cfg))["by_split"] == {"base": {"categories": 4, "images": 8},
                                                              "novel": {"categories": 3, "images": 6}}


def test_bad_base_lists_are_one_line(two_targets, tmp_path):
    cats = load_category_files(list(two_targets))
    cases = [(str(tmp_path / "none.txt"), "base list .* does not exist; set prompts.base_list"),
             (write(tmp_path, "typo.txt", "Monitor/Tv = tv\n"),
              r"'Monitor/Tv' is not a category of the dataset \(did you mean 'Monitor/TV'\?\)"),
             (write(tmp_path, "coco.txt", "tv\n"), "'tv' is not a category of the dataset"),
             (write(tmp_path, "twice.txt", "Person = person\nPerson\n"), "names 'Person' twice"),
             (write(tmp_path, "two_eq.txt", "Person = person = human\n"), "neither a name nor 'name = real name'"),
             (write(tmp_path, "no_real.txt", "Person =\n"), "neither a name nor 'name = real name'"),
             (write(tmp_path, "empty.txt", "# nothing\n"), "base list .* names no category")]
    for path, expected in cases:
        with pytest.raises(ConfigError, match=expected) as e:
            split_categories(cats, "base_list", base_list=path)
        one_line(e)
    with pytest.raises(ConfigError, match="needs prompts.base_list") as e:
        split_categories(cats, "base_list")
    one_line(e)
