"""The `instagen` command: one sub-command per step of the data flow.

    instagen generate --config configs/tiny.yaml [section.key=value ...]
    instagen export --output outputs/tiny
    instagen pool --from outputs/tiny --output outputs/tiny_pool [pool.min_area=64 ...]
    instagen finetune --config ...
    instagen train-grounding --config ...
    instagen train-detector --config ...
    instagen evaluate --gt ... --detections ... --out ...
    instagen recipe --config configs/coco_ovd.yaml [--dry-run] [--from STAGE] [--only STAGE]
    instagen toy-world (= instagen recipe --config configs/toy_world.yaml) [the same flags]

Each `jobs/<step>.py` is the same sub-command as a script for `ray job submit`. Every error a
user can cause (engine.errors.UserError) ends as one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from engine.config import ConfigError, load_config
from engine.config.loader import load_yaml
from engine.config.sections import check_output_path
from engine.errors import UserError
from engine.evaluation.detector import check_evaluation_inputs, evaluate_detector
from engine.evaluation.metrics import (
    EvaluationError,
    evaluate_coco,
    evaluate_lvis,
    format_table,
    write_report,
)
from engine.generation.export import export
from engine.generation.pool import build_pool
from engine.generation.generators import check_generators, planned_images, shard_owners, single_model
from engine.generation.pipeline import generate
from engine.generation.layouts import make_plan
from engine.models.clip import check_clip_folder
from engine.models.open_vocab import KINDS as OPEN_VOCAB, check_open_vocab_folder
from engine.recipe import STAGES, Recipe
from engine.runtime.stages import run_plan
from engine.toyworld.loop import load_ablation_config, plan_loop, run_loop
from engine.toyworld.world import draw_world
from engine.training.detection import train_detector
from engine.training.finetune import finetune, prepare, summary_lines
from engine.training.grounding import train_grounding


def cmd_generate(args) -> None:
    cfg = load_config(args.config, args.overrides)
    check_generators(cfg, layout=bool(cfg.layout.annotations),
                     inpaint=bool(cfg.layout.annotations) and cfg.layout.mode == "inpainting")
    if cfg.filter.enabled:
        check_clip_folder(cfg.filter.model)
    if cfg.annotation.labeller in OPEN_VOCAB:  # the zero-shot detector's folder, as the CLIP's
        check_open_vocab_folder(cfg.annotation.labeller, cfg.annotation.open_vocab)
    if args.dry_run:
        plan = make_plan(cfg)
        n_shards = (len(plan) + cfg.output.shard_size - 1) // cfg.output.shard_size
        print(f"config {args.config} is valid: {len(plan)} prompts of {len(plan.categories)} categories in "
              f"{n_shards} shards -> {cfg.output.path}")
        owners = shard_owners(cfg, n_shards)
        if owners is not None:  # several generators: the shards and images each draws
            images = planned_images(owners, len(plan), cfg.output.shard_size, len(cfg.models))
            print("  generators: " + ", ".join(f"[{g}] {m.source} (share {m.share:g}) {owners.count(g)} shards / "
                                               f"{images[g]} images" for g, m in enumerate(cfg.models)))
        if getattr(plan, "layouts", False):  # layout rows: what qualified, and the rows per category
            info = plan.summary["layouts"]
            print(f"  layouts: {info['images_qualifying']} images qualify (refused: {info['images_refused'] or 'none'}); "
                  f"rows per category: " + ", ".join(f"{c} {n}" for c, n in info["rows"].items()))
        for group, kinds in ({} if getattr(plan, "layouts", False) else plan.summary or {}).items():
            if isinstance(kinds, dict):
                print(f"  {group}: " + ", ".join(f"{k} {v['categories']} categories / {v['images']} images"
                                                  for k, v in kinds.items()))
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
    check_output_path("export --output", args.output)
    if args.dest:
        check_output_path("export --dest", args.dest)
    result = export(args.output, dest=args.dest, write_images=not args.no_images, extra=args.extra)
    print(f"[export] {result['images']} images, {result['annotations']} boxes -> {result['coco']}, "
          f"{result['lvis']}, preview {result['preview']}")


def cmd_pool(args) -> None:
    cfg = load_config(args.config, args.overrides)
    check_output_path("pool --from", args.source)
    check_output_path("pool --output", args.output)
    summary = build_pool(args.source, args.output, cfg.pool, cfg.ray)
    print(f"[pool] {summary.line()}")


def cmd_finetune(args) -> None:
    cfg = load_config(args.config, args.overrides)
    single_model(cfg, "instagen finetune")
    if args.dry_run:
        fc, rows, skipped, n_images = prepare(cfg)
        print(f"[finetune] config valid: {n_images} base-category images, {len(rows)} crops planned; "
              f"{skipped.summary()}")
        return
    for line in summary_lines(finetune(cfg)):
        print(line, file=sys.stderr)


def cmd_train_grounding(args) -> None:
    cfg = load_config(args.config, args.overrides)
    model = single_model(cfg, "instagen train-grounding (whose head reads one generator's UNet)")
    print(f"[train-grounding] {train_grounding(cfg.grounding, model, cfg.ray).line()}")


def cmd_train_detector(args) -> None:
    cfg = load_config(args.config, args.overrides)
    det = cfg.detector
    evaluate = not args.skip_eval and det.eval_annotations
    if not args.skip_train:
        if evaluate:
            check_evaluation_inputs(det)  # not only after training
        print(f"[train-detector] {train_detector(det, cfg.ray).line()}")
    if evaluate:
        metrics = evaluate_detector(det)
        print(format_table(metrics), end="")
        print(f"[train-detector] report in {det.eval_dir or os.path.join(det.output_dir, 'eval')}")


def cmd_evaluate(args) -> None:
    check_output_path("evaluate --out", args.out)
    if args.format == "lvis":
        if args.base is not None or args.novel is not None:
            raise EvaluationError("--base/--novel apply to --format coco only; for LVIS the "
                                  "open-vocabulary metric is APr (rare categories)")
        metrics = evaluate_lvis(args.gt, args.detections)
    else:
        metrics = evaluate_coco(args.gt, args.detections, base=args.base, novel=args.novel)
    json_path, md_path = write_report(metrics, args.out, args.name)
    print(format_table(metrics), end="")
    print(f"\nwrote {json_path} and {md_path}")


def cmd_toy_world(args) -> None:
    cfg = load_ablation_config(args.config, args.overrides)
    if args.draw_only:
        summary = draw_world(os.path.join(cfg.workdir, "world"), cfg.world)
        print(f"[toy-world] world drawn: {summary['splits']} -> {summary['path']}")
        return
    if args.dry_run:  # load_ablation_config has validated it
        loop = plan_loop(cfg, print)
        print(f"config {args.config} is valid: {len(cfg.world.base)} base and {len(cfg.world.novel)} novel "
              f"categories, rows {', '.join(cfg.rows)}, {len(cfg.detector_seeds)} detector seed(s), "
              f"work folder {loop.ws}")
        status = run_plan(loop.plan, loop.ws, print, dry=True, **run_flags(args))
        print("\n".join(f"  {name:<32} {what}" for name, what in status.items()))
        return
    results = run_loop(cfg, **run_flags(args))
    if "ran" in results:
        print(f"[toy-world] stage {results['ran']} done")
        return
    print(results["table"])
    print(f"[toy-world] {results['wall_s'] / 60:.1f} min ({results['stages_total_s'] / 60:.1f} min of stages, "
          f"earlier runs included); results {os.path.join(cfg.workdir, 'results.json')}"
          + (f", samples {results['samples_png']}" if results.get("samples_png") else ""))


def run_flags(args) -> dict:
    """The runner's flags (engine.runtime.stages.run_plan) as given on the command line."""
    return {"rerun_from": args.rerun_from, "only": args.only, "rerun": args.rerun, "keep": args.keep}


def declares_world(path: Optional[str]) -> bool:
    """Whether config `path` is a toy world's (it has a `world:` section). A file that cannot be
    read is not: loading it as a recipe config then names the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = load_yaml(f.read(), path)
    except (OSError, UnicodeDecodeError, UserError, TypeError):
        return False
    return isinstance(raw, dict) and "world" in raw


def cmd_recipe(args) -> None:
    if declares_world(args.config):  # the toy world is one config of the recipe runner
        return cmd_toy_world(args)
    if args.draw_only:
        raise ConfigError(f"--draw-only draws a toy world; {args.config} is a recipe config (it has no world: section)")
    recipe = Recipe(load_config(args.config, args.overrides))  # checks every input and path; writes nothing
    if args.dry_run:
        print(f"config {args.config} is valid: {len(recipe.base)} base and {len(recipe.novel)} novel categories, "
              f"work folder {recipe.ws}")
        print("\n".join(recipe.plan_lines(**run_flags(args))))
        return
    results = recipe.run(**run_flags(args))
    if "table" in results:
        print(results["table"])
        print(f"[recipe] {results['wall_s'] / 60:.1f} min; results {os.path.join(recipe.ws, 'results.json')}")
    else:
        print(f"[recipe] stage {results['ran']} done")


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instagen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str, config: Optional[str] = "configs/tiny.yaml"):
        p = sub.add_parser(name, help=help, description=help)
        if config is not None:
            p.add_argument("--config", default=config or None, help=f"YAML config (default: {config or 'none'})")
        p.set_defaults(func=func)
        return p

    def overrides(p) -> None:
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. output.path=/data/run1")

    g = command("generate", cmd_generate, "generate a labelled synthetic detection dataset into WebDataset shards")
    g.add_argument("--dry-run", action="store_true", help="validate the config and plan, generate nothing")
    g.add_argument("--no-export", action="store_true", help="skip the COCO/LVIS export and preview")
    overrides(g)

    e = command("export", cmd_export, "write COCO / LVIS JSON, images and a preview sheet from shards", config=None)
    e.add_argument("--output", required=True, help="the generate job's output.path")
    e.add_argument("--dest", default=None, help="where to write (default: the output path itself)")
    e.add_argument("--no-images", action="store_true", help="write JSON and preview only")
    e.add_argument("--extra", default="keep", help="prompts.extra's categories: keep (as their own), drop "
                                                   "(left out), map (relabelled to their targets)")

    p = command("pool", cmd_pool, "cut the masked instances of a generate output into an instance pool "
                                  "(WebDataset shards of RGBA cut-outs) for copy-paste training", config="")
    p.add_argument("--from", dest="source", required=True, help="a generate output.path made with masks.enabled=true")
    p.add_argument("--output", required=True, help="where to write the pool")
    overrides(p)

    f = command("finetune", cmd_finetune, "fine-tune Stable Diffusion on crops of a detection dataset's base images")
    f.add_argument("--dry-run", action="store_true", help="validate config and dataset, plan crops, train nothing")
    overrides(f)

    overrides(command("train-grounding", cmd_train_grounding,
                      "train the grounding head on base shards, then self-train it on novel shards", config=""))

    d = command("train-detector", cmd_train_detector, "train a detector on real + synthetic data and evaluate it",
                config="")
    d.add_argument("--skip-train", action="store_true", help="only evaluate detector.output_dir")
    d.add_argument("--skip-eval", action="store_true", help="only train")
    overrides(d)

    v = command("evaluate", cmd_evaluate, "box AP of COCO results JSON against COCO-format or LVIS ground truth; "
                                          "prints a table and writes OUT/NAME.json and OUT/NAME.md", config=None)
    v.add_argument("--gt", required=True, help="ground-truth instances JSON")
    v.add_argument("--detections", required=True, help="COCO results JSON: [{image_id, category_id, bbox, score}, ...]")
    v.add_argument("--format", choices=("coco", "lvis"), default="coco", help="coco (also Objects365) or lvis")
    v.add_argument("--base", type=_names, default=None, help="comma-separated base category names (coco format only)")
    v.add_argument("--novel", type=_names, default=None, help="comma-separated novel category names (coco only)")
    v.add_argument("--out", required=True, help="directory for the report")
    v.add_argument("--name", default="report", help="report file name (default: report)")

    def runner(p) -> None:  # the recipe runner's flags (engine.runtime.stages.run_plan), for both commands
        p.add_argument("--dry-run", action="store_true",
                       help="check every input and print the stages and what a run would do with each; run nothing")
        p.add_argument("--from", dest="rerun_from", default=None, metavar="STAGE",
                       help="run this stage again, and every stage after it")
        p.add_argument("--only", default=None, metavar="STAGE",
                       help="run only this stage (those before it must have finished)")
        p.add_argument("--rerun", action="append", default=[], metavar="STAGE",
                       help="run this finished stage again, and the stages that read its outputs; repeatable")
        p.add_argument("--keep", action="append", default=[], metavar="STAGE",
                       help="count this finished stage as done under changed settings (a change that "
                            "cannot touch it, e.g. a new config key at its default); repeatable")
        p.add_argument("--draw-only", action="store_true", help="toy world: draw the world and stop")
        p.add_argument("overrides", nargs="*", help="key=value or section.key=value, e.g. real.fraction=0.1")

    runner(command("toy-world", cmd_toy_world, "the InstaGen loop on a drawn world: table 4 in miniature "
                      "(the recipe runner with a toy-world config)", config="configs/toy_world.yaml"))
    runner(command("recipe", cmd_recipe, "the InstaGen recipe on a real dataset, stage by stage, resumable: "
                      f"{' -> '.join(STAGES)}; a toy-world config (with a world: section) runs the toy world",
                      config="configs/coco_ovd.yaml"))
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        args.func(args)
    except UserError as e:
        # One line whatever the message holds (a library's multi-line text included).
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


def run_job(command: str, argv: Optional[list[str]] = None) -> int:
    """What each jobs/<step>.py runs: the sub-command `command` with the script's arguments."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
