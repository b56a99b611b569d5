"""Prompts: deterministic PromptSpec rows from category lists.

For each category we make `images_per_category` prompts; with `max_categories == 2` every
second prompt pairs the category with another one drawn from the same set (the paper's
"a photograph of [category1] and [category2]"). Rows depend only on the config, so the same
config always yields the same rows, ids and seeds: that is what makes resume possible.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass

from engine.config import ConfigError, PromptConfig


@dataclass(frozen=True)
class PromptSpec:
    id: int
    seed: int
    categories: tuple[str, ...]
    text: str

    @property
    def key(self) -> str:
        return f"{self.id:09d}"

    def to_row(self) -> dict:
        # Categories travel as a JSON string: Arrow cannot hold ragged lists of names without
        # falling back to pickled objects.
        row = asdict(self)
        row["categories"] = json.dumps(list(self.categories))
        return row

    @staticmethod
    def from_row(row: dict) -> "PromptSpec":
        return PromptSpec(int(row["id"]), int(row["seed"]), tuple(json.loads(row["categories"])), str(row["text"]))


MAX_PROMPT_CHARS = 2000  # CLIP reads 77 tokens; a longer prompt is a mistake, not a wish


def target_categories(cfg: PromptConfig) -> list[str]:
    """The categories this run generates, checked against the known base/novel sets."""
    known = list(cfg.base) + [c for c in cfg.novel if c not in cfg.base]
    if cfg.generate == "base":
        cats = list(cfg.base)
    elif cfg.generate == "novel":
        cats = list(cfg.novel)
    elif cfg.generate == "all":
        cats = known
    else:  # "list"
        cats = list(cfg.categories)
        unknown = [c for c in cats if c not in known]
        if known and unknown:
            raise ConfigError(f"unknown category {unknown[0]!r} in prompts.categories; "
                              f"known categories are prompts.base + prompts.novel: {', '.join(known)}")
    if not cats:
        raise ConfigError(f"no categories to generate (prompts.generate={cfg.generate!r} selects an "
                          f"empty list); fill prompts.base / prompts.novel or prompts.categories")
    return cats  # each name was checked when the config loaded (engine.config.sections.check_names)


def make_prompts(cfg: PromptConfig) -> list[PromptSpec]:
    cats = target_categories(cfg)
    rng = random.Random(cfg.seed)
    rows: list[PromptSpec] = []
    for ci, cat in enumerate(cats):
        for j in range(cfg.images_per_category):
            pair = cfg.max_categories == 2 and len(cats) > 1 and j % 2 == 1
            if pair:
                other = cats[(ci + 1 + rng.randrange(len(cats) - 1)) % len(cats)]
                chosen = (cat, other)
                text = cfg.template.format(c1=cat, c2=other)
            else:
                chosen = (cat,)
                text = cfg.template_single.format(c1=cat)
            if len(text) > MAX_PROMPT_CHARS:
                raise ConfigError(f"prompt for {cat[:40]!r} is {len(text)} characters; the text "
                                  f"encoder reads 77 tokens, shorten prompts.template")
            rows.append(PromptSpec(id=len(rows), seed=rng.randrange(2**31), categories=chosen, text=text))
    return rows
