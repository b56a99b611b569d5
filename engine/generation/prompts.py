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
from bisect import bisect_right
from dataclasses import asdict, dataclass
from itertools import accumulate
from typing import Iterator

from engine.config import ConfigError, PromptConfig
from engine.data.categories import plan_categories, plan_summary, read_extra

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


class PromptPlan:
    """The rows of one config, made on demand: `len(plan)` rows, `plan.rows(start, stop)` any range.

    Categories come from prompts.base / prompts.novel, or from a dataset's annotation file
    (prompts.categories_from: split and budgeted by engine.data.categories), in which case each
    category's prompt name (LVIS "bat_(animal)" -> "bat") and definition ({d1}) go into the text
    while its rows and labels keep the dataset's name. Rows are laid out category by category,
    each taking as many ids as its budget.
    """

    def __init__(self, cfg: PromptConfig):
        self.cfg = cfg
        if cfg.categories_from:
            planned = plan_categories(cfg)
            self.base = [c.name for c in planned if c.split == "base"]
            self.novel = [c.name for c in planned if c.split == "novel"]
            budget = {c.name: c.images for c in planned}
            self.words = {c.name: (c.prompt_name, c.definition) for c in planned}
            self.summary = plan_summary(planned)
        else:
            self.base, self.novel = list(cfg.base), [c for c in cfg.novel if c not in cfg.base]
            budget = {}
            self.words = {}
            self.summary = None
        # prompts.extra (category diversity): name -> the base / novel category it stands for, or "".
        self.extra = read_extra(cfg.extra, self.base + self.novel) if cfg.extra else {}
        self.categories = self._targets()
        self.counts = [budget.get(c, cfg.images_per_category) for c in self.categories]
        self.starts = list(accumulate(self.counts, initial=0))
        self._check_lengths()

    def _targets(self) -> list[str]:
        """The categories this run generates, checked against the known base/novel sets."""
        cfg, known = self.cfg, self.base + self.novel + list(self.extra)
        cats = {"base": self.base, "novel": self.novel, "all": known, "extra": list(self.extra)}.get(
            cfg.generate, list(cfg.categories))
        unknown = [c for c in cats if c not in known]
        if cfg.generate == "list" and known and unknown:
            raise ConfigError(f"unknown category {unknown[0]!r} in prompts.categories; known categories are "
                              f"{'the dataset' if cfg.categories_from else 'prompts.base + prompts.novel'}'s: "
                              f"{', '.join(known[:20])}{', ...' if len(known) > 20 else ''}")
        if not cats:
            raise ConfigError(f"no categories to generate (prompts.generate={cfg.generate!r} selects an "
                              f"empty list); fill prompts.base / prompts.novel or prompts.categories")
        return list(cats)

    def __len__(self) -> int:
        return self.starts[-1]

    @property
    def all_categories(self) -> list[str]:
        """Every category the run knows, base then novel then any others it generates."""
        return list(dict.fromkeys(self.base + self.novel + self.categories))

    def row(self, i: int) -> PromptSpec:
        cfg, cats = self.cfg, self.categories
        ci = bisect_right(self.starts, i) - 1
        j = i - self.starts[ci]
        digest = hashlib.blake2b(f"{cfg.seed}:{i}".encode(), digest_size=16).digest()
        seed = int.from_bytes(digest[:8], "little") % 2**31
        if cfg.max_categories == 2 and len(cats) > 1 and j % 2 == 1:
            other = cats[(ci + 1 + int.from_bytes(digest[8:], "little") % (len(cats) - 1)) % len(cats)]
            return PromptSpec(i, seed, (cats[ci], other), self._text(cfg.template, cats[ci], other))
        return PromptSpec(i, seed, (cats[ci],), self._text(cfg.template_single, cats[ci]))

    def _text(self, template: str, c1: str, c2: str = "") -> str:
        (n1, d1), (n2, d2) = self.words.get(c1, (c1, "")), self.words.get(c2, (c2, ""))
        return template.format(c1=n1, c2=n2, d1=d1, d2=d2)

    def rows(self, start: int = 0, stop: int | None = None) -> Iterator[PromptSpec]:
        return (self.row(i) for i in range(start, min(len(self), len(self) if stop is None else stop)))

    def _check_lengths(self) -> None:
        """The longest prompt either template can make, checked once rather than per row."""
        longest = max(self.categories, key=lambda c: len(self._text("{c1}{d1}", c)))
        for text in (self._text(self.cfg.template_single, longest), self._text(self.cfg.template, longest, longest)):
            if len(text) > MAX_PROMPT_CHARS:
                raise ConfigError(f"prompt for {longest[:40]!r} is {len(text)} characters; the text "
                                  f"encoder reads 77 tokens, shorten prompts.template")


def make_prompts(cfg: PromptConfig) -> list[PromptSpec]:
    """Every row as a list: for small runs, tests and tools; generation uses PromptPlan ranges."""
    return list(PromptPlan(cfg).rows())
