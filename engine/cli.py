"""The `instagen` command: one sub-command per step of the data flow.

    instagen generate --config configs/tiny.yaml [section.key=value ...]
    instagen export --output outputs/tiny
    instagen finetune --config ...          (jobs/finetune_sd.py)
    instagen train-grounding --config ...   (jobs/train_grounding.py)
    instagen train-detector --config ...    (jobs/train_detector.py)
    instagen evaluate --gt ... --detections ...  (jobs/evaluate.py)
    instagen toy-world --config configs/toy_world.yaml  (jobs/toy_world.py)
"""
from __future__ import annotations

import argparse
import os
import sys

USER_ERRORS: tuple = ()


def _user_errors() -> tuple:
    """Errors a user causes and can fix: printed as one line, never as a traceback."""
    from engine.annotation import AnnotationError
    from engine.cluster import ResourceError
    from engine.config import ConfigError
    from engine.models import ModelLoadError
    from engine.shards import ShardError
    return (ConfigError, ModelLoadError, ShardError, ResourceError, AnnotationError, FileNotFoundError)


def cmd_generate(args) -> None:
    from engine.config import load_config
    from engine.export import export
    from engine.generate import generate
    from engine.models import check_source

    cfg = load_config(args.config, args.overrides)
    check_source(cfg.model)
    if args.dry_run:
        from engine.prompts import make_prompts
        rows = make_prompts(cfg.prompts)
        print(f"config {args.config} is valid: {len(rows)} prompts in "
              f"{(len(rows) + cfg.output.shard_size - 1) // cfg.output.shard_size} shards -> {cfg.output.path}")
        return
    summary = generate(cfg)
    print(f"[generate] done: {summary.line()}", file=sys.stderr)
    if not args.no_export:
        result = export(cfg.output.path, preview_images=cfg.output.preview_images)
        print(f"[export] {result['images']} images, {result['annotations']} boxes\n"
              f"  dataset (WebDataset shards): {cfg.output.path}/shards/\n"
              f"  COCO json:                   {result['coco']}\n"
              f"  LVIS json:                   {result['lvis']}\n"
              f"  preview picture:             {result['preview']}")


def cmd_export(args) -> None:
    from engine.export import export
    result = export(args.output, dest=args.dest, write_images=not args.no_images)
    print(f"[export] {result['images']} images, {result['annotations']} boxes -> {result['coco']}, "
          f"{result['lvis']}, preview {result['preview']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instagen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a labelled synthetic detection dataset into WebDataset shards")
    g.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default: configs/tiny.yaml)")
    g.add_argument("--dry-run", action="store_true", help="validate the config and plan, generate nothing")
    g.add_argument("--no-export", action="store_true", help="skip the COCO/LVIS export and preview")
    g.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. output.path=/data/run1")
    g.set_defaults(func=cmd_generate)
    e = sub.add_parser("export", help="write COCO / LVIS JSON, images and a preview sheet from shards")
    e.add_argument("--output", required=True, help="the generate job's output.path")
    e.add_argument("--dest", default=None, help="where to write (default: the output path itself)")
    e.add_argument("--no-images", action="store_true", help="write JSON and preview only")
    e.set_defaults(func=cmd_export)
    for name, module in JOB_COMMANDS.items():
        sub.add_parser(name, help=f"see `instagen {name} --help` ({module.replace('.', '/')}.py)", add_help=False)
    return parser


# Training and evaluation steps keep their argument parsing in their job file; the CLI hands over.
JOB_COMMANDS = {"finetune": "jobs.finetune_sd", "train-grounding": "jobs.train_grounding",
                "train-detector": "jobs.train_detector", "evaluate": "jobs.evaluate",
                "toy-world": "jobs.toy_world"}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in JOB_COMMANDS:
        import importlib
        return importlib.import_module(JOB_COMMANDS[argv[0]]).main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
