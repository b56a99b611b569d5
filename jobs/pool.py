"""Build an instance pool: RGBA cut-outs of the masked objects of a generate output.

Reads the shards of an output generated with masks.enabled=true and writes WebDataset shards of
instances (<key>.png, <key>.json) with a manifest of per-category counts; filters from the
config's `pool` section. Rerun the same command to finish an interrupted pool.

On a laptop:
    python jobs/pool.py --from outputs/tiny --output outputs/tiny_pool pool.min_area=64

On a cluster:
    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"env_vars": {"RAY_AUTH_MODE": "disabled"}}' \
        -- python jobs/pool.py --from s3://bucket/run1 --output s3://bucket/pool1

An output without masks, or a filter naming an unknown category, exits with status 2 and one line.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import run_job  # noqa: E402


def main(argv=None) -> int:
    return run_job("pool", argv)


if __name__ == "__main__":
    sys.exit(main())
