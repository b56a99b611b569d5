"""Prompt expansion: a local causal language model writes, for each prompt row, a description of a
scene that holds the row's categories (ImaginaryNet and DiverGen expand prompts with a language
model for more varied images than one template gives).

Per row, in the synthesis actor, before the row is drawn:
- the model samples from the row's seed (try k from a sub-seed of it), inside a forked RNG, so the
  same row gives the same text in any actor and leaves the actor's other random streams alone;
- the text is kept only if it names every category of the row (its prompt name, any case, as a
  whole word) and fits the generator's text encoder (its tokenizer's window, 77 tokens for CLIP);
  otherwise the next try, and after `prompts.expand.tries` the row's template prompt;
- the shard's texts are written (atomically) before the shard is drawn to `<key>.json` in the
  cache folder, `<output>/expansions` or a folder builds share (`prompts.expand.cache`), the key a
  digest of the rows and the settings: a rerun, a retried shard, or another build drawing the same
  rows reads them and never calls the model again (the model is not even loaded when every shard
  it needs is cached).
Each sample's JSON records the text drawn (`prompt`), the template's (`template_prompt`) and how it
came about (`expansion`: status and tries); the shard's manifest entry counts them.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, replace
import fsspec
import torch

from engine.config import ExpandConfig, fingerprint
from engine.generation.prompts import MAX_PROMPT_CHARS, PromptSpec
from engine.models.language import load_language_model
from engine.runtime.storage import write_atomic

EXPANDED, FELL_BACK = "expanded", "fell_back"


def cache_dir(cfg: ExpandConfig, output: str) -> str:
    return cfg.cache or f"{output.rstrip('/')}/expansions"


def settings(cfg: ExpandConfig) -> dict:
    """What decides the texts: every setting but where they are cached."""
    return {k: v for k, v in asdict(cfg).items() if k != "cache"}


def shard_key(cfg: ExpandConfig, specs: list[PromptSpec]) -> str:
    """What decides a shard's texts: its rows and the settings."""
    return fingerprint({"expand": settings(cfg), "rows": [[s.id, s.seed, s.text] for s in specs]})


def cache_path(folder: str, key: str) -> str:
    return f"{folder.rstrip('/')}/{key}.json"


def sub_seed(seed: int, attempt: int) -> int:
    return (int(seed) + 7_368_787 * attempt) % 2**31


def names_all(text: str, names: list[str]) -> bool:
    return all(re.search(rf"\b{re.escape(n.lower())}\b", text.lower()) for n in names)


def clean(text: str) -> str:
    """Printable, blanks collapsed, surrounding quotes dropped: what a text encoder should read."""
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return text.strip("\"'").strip()[:MAX_PROMPT_CHARS]


class Expander:
    """Expands the rows of a shard. `words`: a category's (prompt name, definition), as
    PromptPlan.words holds them for categories read from a dataset; `text_tokenizer`: the
    generator's (its model_max_length is the window), or None for a bound of one token a word."""

    def __init__(self, cfg: ExpandConfig, words: dict, text_tokenizer=None, device: str = "cpu"):
        self.cfg, self.words, self.text_tokenizer, self.device = cfg, words, text_tokenizer, device
        self.window = getattr(text_tokenizer, "model_max_length", 77)
        self.model = self.tokenizer = None  # loaded on the first row no cache holds
        self.generated = 0  # calls of the model: what the cache saves

    def names(self, spec: PromptSpec) -> list[str]:
        return [self.words.get(c, (c, ""))[0] for c in spec.categories]

    def fits(self, text: str) -> bool:
        if self.text_tokenizer is None:
            return len(text.split()) + 2 <= self.window  # each word is a token at least, plus BOS/EOS
        return len(self.text_tokenizer(text, truncation=False, verbose=False)["input_ids"]) <= self.window

    def expand_shard(self, folder: str, specs: list[PromptSpec]) -> tuple[list[PromptSpec], list[dict]]:
        """The rows with their expanded texts, and per row {"status", "tries", "template"}; from the
        cache `folder` when it holds these rows under this config, else from the model (and then
        written to it)."""
        key = shard_key(self.cfg, specs)
        fs, path = fsspec.core.url_to_fs(cache_path(folder, key))
        records = None
        if fs.exists(path):
            with fs.open(path, "rb") as f:
                cached = json.loads(f.read())
            records = cached["rows"] if cached.get("key") == key else None
        if records is None:
            records = [self.expand(s) for s in specs]
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            write_atomic(fs, path, json.dumps({"key": key, "rows": records}).encode())
        return [replace(s, text=r["text"]) for s, r in zip(specs, records)], records

    def expand(self, spec: PromptSpec) -> dict:
        names = self.names(spec)
        for attempt in range(self.cfg.tries):
            text = self.sample(names, spec.text, sub_seed(spec.seed, attempt))
            if text and names_all(text, names) and self.fits(text):
                return {"text": text, "status": EXPANDED, "tries": attempt + 1, "template": spec.text}
        return {"text": spec.text, "status": FELL_BACK, "tries": self.cfg.tries, "template": spec.text}

    @torch.no_grad()
    def sample(self, names: list[str], template: str, seed: int) -> str:
        if self.model is None:
            self.model, self.tokenizer = load_language_model(self.cfg.model, self.device)
        self.generated += 1
        tok, cfg = self.tokenizer, self.cfg
        instruction = cfg.instruction.format(names=" and ".join(names), prompt=template)
        if tok.chat_template:  # instruction-tuned models (SmolLM2-Instruct) answer in their chat format
            inputs = tok.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True,
                                             return_dict=True, return_tensors="pt")
        else:
            inputs = tok(instruction, return_tensors="pt")
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        sampling = ({"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p}
                    if cfg.temperature > 0 else {"do_sample": False})
        devices = [self.model.device.index or 0] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id,
                                      **sampling)
        return clean(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))


def uncached(cfg: ExpandConfig, output: str, plan, shard_size: int, indices: list[int]) -> list[int]:
    """The shards among `indices` whose texts are not cached yet (the ones that need the model)."""
    fs, folder = fsspec.core.url_to_fs(cache_dir(cfg, output))
    return [i for i in indices
            if not fs.exists(cache_path(folder, shard_key(cfg, list(plan.rows(i * shard_size, (i + 1) * shard_size)))))]
