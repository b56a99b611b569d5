"""The InstaGen recipe on a real dataset, every stage in order, resumable (engine/recipe.py):
real -> finetune -> teacher -> base -> novel_raw -> head_sup -> head_st -> final -> detector -> evaluate.

Check the inputs and print the stages, their images and GPU-hours first:
    python jobs/recipe.py --config configs/coco_ovd.yaml --dry-run

On a cluster (WORKDIR on a filesystem every node mounts at the same path):
    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"RAY_AUTH_MODE": "disabled"}}' \\
        -- python jobs/recipe.py --config configs/coco_ovd.yaml workdir=/shared/instagen/coco_ovd

Rerunning the same command skips finished stages and resumes an interrupted one; `--from STAGE`
runs a stage and those after it again, `--only STAGE` runs one stage. Results: WORKDIR/results.json
and the table on stdout; each evaluation's report under WORKDIR/eval/. A toy-world config
(configs/toy_world.yaml) runs the toy world through the same runner, as jobs/toy_world.py does.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import run_job  # noqa: E402


def main(argv=None) -> int:
    return run_job("recipe", argv)


if __name__ == "__main__":
    sys.exit(main())
