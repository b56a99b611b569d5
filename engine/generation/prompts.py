"""Prompts: deterministic PromptSpec rows from category lists.

For each category we make `images_per_category` prompts; with `max_categories == 2` every
second prompt pairs the category with another one drawn from the same set (the paper's
"a photograph of [category1] and [category2]"). A row is a pure function of the config and its
id (its seed and partner are hashed from `prompts.seed` and the id), so any worker can make any
range of rows without the ones before it: a million-image build never lists its prompts in one
process, and the same config always yields the same rows, ids and seeds, which is what makes
resume possible.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Iterator

from engine.config import ConfigError, PromptConfig

# Part of every run's fingerprint: bump it when the rows a config yields change, so that an
# output written with the old rows is never resumed with the new ones.
ROWS_VERSION = 2


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


class PromptPlan:
    """The rows of one config, made on demand: `len(plan)` rows, `plan.rows(start, stop)` any range."""

    def __init__(self, cfg: PromptConfig):
        self.cfg = cfg
        self.categories = target_categories(cfg)
        self._check_lengths()

    def __len__(self) -> int:
        return len(self.categories) * self.cfg.images_per_category

    def row(self, i: int) -> PromptSpec:
        cfg, cats = self.cfg, self.categories
        ci, j = divmod(i, cfg.images_per_category)
        digest = hashlib.blake2b(f"{cfg.seed}:{i}".encode(), digest_size=16).digest()
        seed = int.from_bytes(digest[:8], "little") % 2**31
        if cfg.max_categories == 2 and len(cats) > 1 and j % 2 == 1:
            other = cats[(ci + 1 + int.from_bytes(digest[8:], "little") % (len(cats) - 1)) % len(cats)]
            return PromptSpec(i, seed, (cats[ci], other), cfg.template.format(c1=cats[ci], c2=other))
        return PromptSpec(i, seed, (cats[ci],), cfg.template_single.format(c1=cats[ci]))

    def rows(self, start: int = 0, stop: int | None = None) -> Iterator[PromptSpec]:
        return (self.row(i) for i in range(start, min(len(self), len(self) if stop is None else stop)))

    def _check_lengths(self) -> None:
        """The longest prompt either template can make, checked once rather than per row."""
        longest = max(self.categories, key=len)
        for text in (self.cfg.template_single.format(c1=longest),
                     self.cfg.template.format(c1=longest, c2=longest)):
            if len(text) > MAX_PROMPT_CHARS:
                raise ConfigError(f"prompt for {longest[:40]!r} is {len(text)} characters; the text "
                                  f"encoder reads 77 tokens, shorten prompts.template")


def make_prompts(cfg: PromptConfig) -> list[PromptSpec]:
    """Every row as a list: for small runs, tests and tools; generation uses PromptPlan ranges."""
    return list(PromptPlan(cfg).rows())
