"""Categories read from a dataset's annotation file: names for prompts, a base/novel split, and
how many images each category gets.

    cats = plan_categories(cfg.prompts)      # load_categories -> split_categories -> assign_budgets
    print(json.dumps(plan_summary(cats)))    # what --dry-run prints and run.json records

A COCO, LVIS or Objects365 instances JSON gives each category's id and name; LVIS adds synonyms,
a definition, a frequency group (r / c / f) and image and instance counts. Where a file has no
image counts (COCO, Objects365) they are counted from its annotations. The dataset's name stays a
category's identity; prompts use `prompt_name`: underscores read as spaces, and LVIS's
parenthesised sense ("bat_(animal)") kept apart in `sense`, so a template can say which bat.

Every problem a user can fix (a missing or malformed file, an unknown rule, a list naming a
category the file does not have, a budget that cannot add up) is a ConfigError of one line.

Cross-dataset (paper table 3: trained on COCO-base, evaluated on Objects365 and LVIS): the
categories come from the target files (prompts.categories_from: a list), and split=base_list names
the base ones in a text file, each as its target file spells it, with the real training set's name
where that differs ("television_set = tv"). An explicit list rather than name matching: COCO,
Objects365 and LVIS spell the same thing differently ("tv", "Monitor/TV", "television_set") and
one spelling several things ("mouse"), so a matcher would guess; a list is read, checked against
the files and printed back by --dry-run. Names two files share exactly are one category; names
that differ only in case or spelling ("Person", "person") stay two, because each dataset's
evaluation scores its own spelling.
"""
from __future__ import annotations

import difflib
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

from engine.config import BUDGET_RULES, FREQUENCY_GROUPS, SPLIT_RULES, ConfigError, PromptConfig, category_files
from engine.runtime.storage import file_version, read_bytes, read_json

# OVR-CNN's open-vocabulary COCO split (Zareian et al., CVPR 2021), used by the InstaGen paper: 65
# of COCO's 80 categories; the other 15 are in neither split.
OVR_CNN_COCO_BASE = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse", "sheep", "bear",
    "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite", "surfboard", "bottle", "fork",
    "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "pizza", "donut", "chair", "bed",
    "toilet", "tv", "laptop", "mouse", "remote", "microwave", "oven", "toaster", "refrigerator", "book", "clock",
    "vase", "toothbrush")
OVR_CNN_COCO_NOVEL = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard", "cup", "knife",
    "cake", "couch", "keyboard", "sink", "scissors")

GROUP_NAMES = {"r": "rare", "c": "common", "f": "frequent"}
MAX_NAME_CHARS = 200  # as for typed names (engine.config.sections.check_names)

# LVIS writes a word's sense in parentheses at the end: "bat_(animal)", "pan_(for_cooking)".
_SENSE = re.compile(r"^(?P<word>.*?)[_\s]*\((?P<sense>[^()]+)\)$")


@dataclass(frozen=True)
class Category:
    id: int  # the dataset's category id
    name: str  # as the dataset spells it: the category's identity (labels, exports, list files)
    prompt_name: str  # what a prompt says: "bat" for "bat_(animal)"
    sense: str = ""  # "animal" for "bat_(animal)"; "" where the name has none
    synonyms: tuple[str, ...] = ()  # LVIS synonyms, normalised as prompt names, the prompt name left out
    definition: str = ""  # LVIS `def`
    frequency: str = ""  # LVIS group: "r" | "c" | "f"; "" where the file has none
    image_count: Optional[int] = None  # images showing the category (the file's, or counted from annotations)
    instance_count: Optional[int] = None
    split: str = ""  # "base" | "novel" | "" (in neither: OVR-CNN leaves 15 COCO categories out)
    real_name: str = ""  # split=base_list: the real training set's name for it, where that differs
    images: int = 0  # images to generate for it (assign_budgets); 0 for categories in neither split


def normalise_name(name: str) -> tuple[str, str]:
    """(prompt name, sense) of a dataset name: "bat_(sports_equipment)" -> ("bat", "sports equipment"),
    "aerosol_can" -> ("aerosol can", ""). Case is kept ("Band_Aid" -> "Band Aid")."""
    m = _SENSE.match(name.strip())
    word, sense = (m["word"], m["sense"]) if m and m["word"].strip(" _") else (name, "")
    return _words(word), _words(sense)


def _words(text: str) -> str:
    return " ".join(text.replace("_", " ").split())


# load_categories' results by (path, file_version): a recipe plans its categories once per stage
# (and the dry run four times); Categories are small and frozen, so keeping them is safe, and a
# file that changed has another version and is read again.
_loaded: dict[tuple, tuple[Category, ...]] = {}


def load_categories(path: str) -> list[Category]:
    """The categories of a COCO / LVIS / Objects365 annotation JSON (local path or fsspec URL),
    in id order."""
    version = file_version(path)
    if version is not None and (path, version) in _loaded:
        return list(_loaded[(path, version)])
    cats = _load_categories(path)
    if version is not None:
        _loaded[(path, version)] = tuple(cats)
    return cats


def load_category_files(paths: Sequence[str]) -> list[Category]:
    """The categories of each file, file by file; a name an earlier file has is left out (one name,
    one category: the first file's entry, with its frequency group and counts)."""
    seen: set[str] = set()
    out = []
    for path in paths:
        for c in load_categories(path):
            if c.name not in seen:
                seen.add(c.name)
                out.append(c)
    return out


def _load_categories(path: str) -> list[Category]:
    hint = "set prompts.categories_from to a COCO, LVIS or Objects365 annotation JSON"
    try:
        data = read_json(path, "category file", ConfigError, hint)
    except OSError as e:  # a folder, no permission, an unreachable bucket
        raise ConfigError(f"category file {path!r} cannot be read ({e.strerror or e}); {hint}") from None
    raw = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"category file {path!r} has no 'categories' list; {hint} (an instances file, not a "
                          f"captions or results file)")
    cats = [_category(c, i, path) for i, c in enumerate(raw)]
    for key in ("id", "name"):
        dup = [v for v, n in Counter(getattr(c, key) for c in cats).items() if n > 1]
        if dup:
            raise ConfigError(f"category file {path!r} lists category {key} {dup[0]!r} twice; each category needs "
                              f"its own id and name")
    if any(c.image_count is None for c in cats) and isinstance(data.get("annotations"), list):
        cats = _count_from_annotations(cats, data["annotations"])
    return sorted(cats, key=lambda c: c.id)


def _category(c: Any, index: int, path: str) -> Category:
    where = f"category file {path!r}: category {index}"
    if not isinstance(c, dict):
        raise ConfigError(f"{where} is {type(c).__name__}, not an object with 'id' and 'name'; fix the file")
    cid, name = c.get("id"), c.get("name")
    if not isinstance(cid, int) or isinstance(cid, bool):
        raise ConfigError(f"{where} has no integer 'id' (got {cid!r}); fix the file")
    if not isinstance(name, str) or not name.strip() or not name.isprintable() or len(name) > MAX_NAME_CHARS:
        raise ConfigError(f"{where} (id {cid}) has no usable 'name' (got {str(name)[:60]!r}); a name is one line of "
                          f"up to {MAX_NAME_CHARS} printable characters")
    prompt_name, sense = normalise_name(name)
    synonyms = c.get("synonyms") or []
    definition = c.get("def") or ""
    frequency = c.get("frequency") or ""
    if not isinstance(synonyms, list) or not all(isinstance(s, str) and s.isprintable() for s in synonyms):
        raise ConfigError(f"{where} ({name!r}): 'synonyms' must be a list of names; fix the file")
    if not isinstance(definition, str):
        raise ConfigError(f"{where} ({name!r}): 'def' must be text; fix the file")
    if frequency and frequency not in FREQUENCY_GROUPS:
        raise ConfigError(f"{where} ({name!r}) has frequency {frequency!r}; LVIS's groups are r, c and f")
    counts = [c.get(k) for k in ("image_count", "instance_count")]
    for key, n in zip(("image_count", "instance_count"), counts):
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise ConfigError(f"{where} ({name!r}): {key} must be a count >= 0, got {n!r}; fix the file")
    syn = tuple(dict.fromkeys(s for s in (normalise_name(s)[0] for s in synonyms) if s and s != prompt_name))
    return Category(id=cid, name=name, prompt_name=prompt_name, sense=sense, synonyms=syn,
                    definition=" ".join(definition.split()), frequency=frequency, image_count=counts[0],
                    instance_count=counts[1])


def _count_from_annotations(cats: list[Category], annotations: list) -> list[Category]:
    """Image and instance counts from the boxes, for files that do not state them (COCO, Objects365)."""
    images: dict[int, set] = defaultdict(set)
    instances: Counter = Counter()
    for a in annotations:
        # A malformed entry is datasets.py's to report (it skips and counts those); here it counts nothing.
        if isinstance(a, dict) and isinstance(a.get("category_id"), int) and isinstance(a.get("image_id"), int):
            images[a["category_id"]].add(a["image_id"])
            instances[a["category_id"]] += 1
    return [c if c.image_count is not None else
            replace(c, image_count=len(images[c.id]),
                    instance_count=c.instance_count if c.instance_count is not None else instances[c.id])
            for c in cats]


def split_categories(categories: Sequence[Category], rule: str, novel_list: str = "",
                     base_list: str = "") -> list[Category]:
    """Mark each category base or novel by `rule` (one of SPLIT_RULES):
    lvis_frequency: base = frequent + common, novel = rare;
    list: novel = the names in the text file `novel_list` (one a line, as the dataset spells them;
          blank lines and lines starting with # are skipped), base = the others;
    ovr_cnn_coco: OVR-CNN's 48 base / 17 novel; COCO's other 15 categories are in neither ("");
    all_base: every category is base;
    base_list: base = the names in the text file `base_list` (as novel_list; a line "name = real
          name" also sets the category's real_name), novel = the others."""
    if rule == "lvis_frequency":
        missing = [c.name for c in categories if not c.frequency]
        if missing:
            raise ConfigError(f"prompts.split=lvis_frequency needs LVIS frequency groups, but category {missing[0]!r} "
                              f"has none; use an LVIS file, or prompts.split=list")
        return [replace(c, split="novel" if c.frequency == "r" else "base") for c in categories]
    if rule == "list":
        novel = set(_read_names(novel_list, categories))
        return [replace(c, split="novel" if c.name in novel else "base") for c in categories]
    if rule == "ovr_cnn_coco":
        _require_names(OVR_CNN_COCO_BASE + OVR_CNN_COCO_NOVEL, categories,
                       "prompts.split=ovr_cnn_coco needs COCO's category names", "use COCO's instances file")
        base, novel = set(OVR_CNN_COCO_BASE), set(OVR_CNN_COCO_NOVEL)
        return [replace(c, split="base" if c.name in base else "novel" if c.name in novel else "")
                for c in categories]
    if rule == "all_base":
        return [replace(c, split="base") for c in categories]
    if rule == "base_list":
        base = dict(_read_base_list(base_list, categories))
        return [replace(c, split="base", real_name=base[c.name]) if c.name in base else replace(c, split="novel")
                for c in categories]
    raise ConfigError(f"prompts.split must be one of {', '.join(SPLIT_RULES)}, got {rule!r}")


def _read_names(path: str, categories: Sequence[Category]) -> list[str]:
    names = _read_lines(path, "novel")
    _require_names(names, categories, f"novel list {path!r}", "write names as the annotation file spells them")
    return names


def _read_base_list(path: str, categories: Sequence[Category]) -> list[tuple[str, str]]:
    """(name, real name) per line of a base list: "name", or "name = real name" where the real
    training set spells it otherwise (real name "" = the same)."""
    pairs = []
    for line in _read_lines(path, "base"):
        parts = [p.strip() for p in line.split("=")]
        if len(parts) > 2 or not all(parts):
            raise ConfigError(f"base list {path!r}: line {line!r} is neither a name nor 'name = real name'; write "
                              f"the category as the annotation file spells it, then = and the real training set's "
                              f"name if that differs")
        pairs.append((parts[0], parts[1] if len(parts) == 2 and parts[1] != parts[0] else ""))
    dup = [n for n, k in Counter(n for n, _ in pairs).items() if k > 1]
    if dup:
        raise ConfigError(f"base list {path!r} names {dup[0]!r} twice; list each category once")
    _require_names([n for n, _ in pairs], categories, f"base list {path!r}",
                   "write names as the annotation file(s) in prompts.categories_from spell them")
    return pairs


def read_extra(path: str, known: Sequence[str]) -> dict[str, str]:
    """prompts.extra: extra category -> the base / novel category it stands for ("" = none), in
    the file's order."""
    out: dict[str, str] = {}
    for line in _read_lines(path, "extra"):
        parts = [p.strip() for p in line.split("=")]
        if len(parts) > 2 or not all(parts):
            raise ConfigError(f"extra list {path!r}: line {line!r} is neither a name nor 'name = target'; write the "
                              f"extra category, then = and the base or novel category it stands for, if any")
        name, target = parts[0], parts[1] if len(parts) == 2 else ""
        if name in out:
            raise ConfigError(f"extra list {path!r} names {name!r} twice; list each category once")
        if name in known:
            raise ConfigError(f"extra list {path!r} names {name!r}, which is already a base or novel category; "
                              f"list only categories beyond them")
        if target and target not in known:
            close = difflib.get_close_matches(target, list(known), n=1)
            raise ConfigError(f"extra list {path!r}: target {target!r} of {name!r} is not a base or novel category"
                              f"{f' (did you mean {close[0]!r}?)' if close else ''}; map each extra category to "
                              f"one of them, or to nothing")
        out[name] = target
    return out


def _read_lines(path: str, kind: str) -> list[str]:
    """The names of a novel, base or extra list: one a line; blank lines and # comments skipped."""
    key = "prompts.extra" if kind == "extra" else f"prompts.{kind}_list"
    if not path:
        raise ConfigError(f"prompts.split={'list' if kind == 'novel' else 'base_list'} needs {key}: a text file "
                          f"of {kind} category names, one a line")
    try:
        text = read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{kind} list {path!r} does not exist; set {key} to a text file of {kind} category "
                          f"names, one a line") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{kind} list {path!r} is not UTF-8 text; write one category name a line") from None
    except OSError as e:
        raise ConfigError(f"{kind} list {path!r} cannot be read ({e.strerror or e}); check {key}") from None
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if kind == "novel":
        dup = [n for n, k in Counter(names).items() if k > 1]
        if dup:
            raise ConfigError(f"novel list {path!r} names {dup[0]!r} twice; list each category once")
    if not names:
        raise ConfigError(f"{kind} list {path!r} names no category; write one {kind} category name a line")
    return names


def _require_names(names: Sequence[str], categories: Sequence[Category], what: str, fix: str) -> None:
    known = [c.name for c in categories]
    missing = [n for n in names if n not in set(known)]
    if missing:
        close = difflib.get_close_matches(missing[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{what}: {missing[0]!r} is not a category of the dataset{hint}"
                          f"{f' ({len(missing)} names missing)' if len(missing) > 1 else ''}; {fix}")


def assign_budgets(categories: Sequence[Category], rule: str, *, per_category: int = 0,
                   per_group: Optional[dict[str, int]] = None, total: int = 0, floor: int = 0,
                   ceiling: int = 0) -> list[Category]:
    """Set `images` on every category in a split (base or novel); those in neither get 0. Rules:
    uniform: `per_category` each (sum = per_category x categories);
    per_group: `per_group[frequency]` each (sum = the sum of those);
    inverse_frequency: proportional to 1 / image_count, each within [floor, ceiling] (ceiling 0 = none),
        summing to exactly `total` (see inverse_frequency_counts)."""
    chosen = [i for i, c in enumerate(categories) if c.split]
    if not chosen:
        raise ConfigError("no category is in the base or novel split; check prompts.split against the dataset")
    if rule == "uniform":
        if per_category < 1:
            raise ConfigError(f"prompts.images_per_category must be >= 1, got {per_category}")
        counts = [per_category] * len(chosen)
    elif rule == "per_group":
        counts = _per_group([categories[i] for i in chosen], per_group or {})
    elif rule == "inverse_frequency":
        missing = [categories[i].name for i in chosen if categories[i].image_count is None]
        if missing:
            raise ConfigError(f"prompts.budget=inverse_frequency needs each category's image count, but "
                              f"{missing[0]!r} has none (the file has neither image_count nor annotations); use "
                              f"an LVIS file or an instances file with annotations, or prompts.budget=uniform")
        counts = inverse_frequency_counts([categories[i].image_count or 0 for i in chosen], total, floor, ceiling)
    else:
        raise ConfigError(f"prompts.budget must be one of {', '.join(BUDGET_RULES)}, got {rule!r}")
    images = dict(zip(chosen, counts))
    return [replace(c, images=images.get(i, 0)) for i, c in enumerate(categories)]


def _per_group(categories: list[Category], per_group: dict[str, int]) -> list[int]:
    groups = Counter(c.frequency for c in categories)
    if groups[""]:
        name = next(c.name for c in categories if not c.frequency)
        raise ConfigError(f"prompts.budget=per_group needs LVIS frequency groups, but category {name!r} has none; "
                          f"use prompts.budget=uniform or inverse_frequency")
    for g, n in sorted(groups.items()):
        if g not in per_group:
            raise ConfigError(f"prompts.budget_per_group has no count for group {g!r} ({GROUP_NAMES[g]}, {n} "
                              f"categories); add {g}: <images per category>")
        if per_group[g] < 0:
            raise ConfigError(f"prompts.budget_per_group.{g} must be >= 0, got {per_group[g]}")
    counts = [per_group[c.frequency] for c in categories]
    if not sum(counts):
        raise ConfigError("prompts.budget_per_group gives these categories no images; give a group a positive count")
    return counts


def inverse_frequency_counts(image_counts: Sequence[int], total: int, floor: int = 0, ceiling: int = 0) -> list[int]:
    """Integers proportional to 1 / image_count (a count of 0 reads as 1), each within [floor,
    ceiling] (ceiling 0 = none), summing to exactly `total`. The scale is found by bisection,
    where the clipped sum meets `total`; the remainder after rounding down goes one image each to
    the largest fractional parts, ties to the earlier category: the same input always gives the
    same counts."""
    n = len(image_counts)
    if total < 1:
        raise ConfigError(f"prompts.budget_total must be a positive number of images, got {total}")
    if floor < 0 or ceiling < 0:
        raise ConfigError("prompts.budget_floor and prompts.budget_ceiling must be >= 0 (ceiling 0 = none)")
    if ceiling and floor > ceiling:
        raise ConfigError(f"prompts.budget_floor ({floor}) is above prompts.budget_ceiling ({ceiling}); lower the "
                          f"floor or raise the ceiling")
    if n * floor > total:
        raise ConfigError(f"prompts.budget_floor={floor} for {n} categories needs {n * floor} images, more than "
                          f"prompts.budget_total={total}; raise the total or lower the floor")
    if ceiling and n * ceiling < total:
        raise ConfigError(f"prompts.budget_ceiling={ceiling} for {n} categories allows {n * ceiling} images, fewer "
                          f"than prompts.budget_total={total}; lower the total or raise the ceiling")
    weights = [1.0 / max(1, k) for k in image_counts]
    top = ceiling or total

    def clipped(scale: float) -> list[float]:
        return [min(top, max(float(floor), scale * w)) for w in weights]

    # sum(clipped(s)) rises with s from n*floor at s=0 to n*top at hi; keep lo on the low side, so
    # rounding down never overshoots the total.
    lo, hi = 0.0, top / min(weights)
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if sum(clipped(mid)) <= total else (lo, mid)
    exact = clipped(lo)
    counts = [math.floor(x) for x in exact]
    order = sorted((i for i in range(n) if counts[i] < top), key=lambda i: (counts[i] - exact[i], i))
    missing = total - sum(counts)
    assert 0 <= missing <= len(order), (missing, len(order))  # lo keeps the sum at or below total
    for i in order[:missing]:
        counts[i] += 1
    return counts


def plan_categories(cfg: PromptConfig) -> list[Category]:
    """The categories of cfg.categories_from (one file or several), split and budgeted as the config says."""
    if not cfg.categories_from:
        raise ConfigError("prompts.categories_from is empty; set it to the annotation JSON to read categories from")
    cats = split_categories(load_category_files(category_files(cfg)), cfg.split, cfg.novel_list, cfg.base_list)
    return assign_budgets(cats, cfg.budget, per_category=cfg.images_per_category, per_group=cfg.budget_per_group,
                          total=cfg.budget_total, floor=cfg.budget_floor, ceiling=cfg.budget_ceiling)


def plan_summary(categories: Sequence[Category]) -> dict:
    """Categories and images per split ("neither" for those in no split) and per frequency group
    ("none" where the file has no groups): plain JSON for --dry-run and run.json."""
    def tally(group_of) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for c in categories:
            row = out.setdefault(group_of(c), {"categories": 0, "images": 0})
            row["categories"] += 1
            row["images"] += c.images
        return dict(sorted(out.items()))

    return {"categories": len(categories), "images": sum(c.images for c in categories),
            "by_split": tally(lambda c: c.split or "neither"),
            "by_frequency": tally(lambda c: c.frequency or "none")}
