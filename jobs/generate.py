"""Generate a labelled synthetic detection dataset (images, step T-1 latents, boxes) into shards.

On a laptop (embedded local Ray, tiny random models):
    python jobs/generate.py --config configs/tiny.yaml

On a cluster:
    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"env_vars": {"RAY_AUTH_MODE": "disabled"}}' \
        -- python jobs/generate.py --config configs/coco_ovd.yaml output.path=s3://bucket/run1

Rerunning the same command after an interruption writes only the missing shards.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import run_job  # noqa: E402


def main(argv=None) -> int:
    return run_job("generate", argv)


if __name__ == "__main__":
    sys.exit(main())
