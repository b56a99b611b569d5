"""Export a generated dataset: COCO and LVIS JSON, the images as files, and a preview sheet.

Reads the finished shards under the generate job's output.path (local or s3://, gs://) and
writes coco.json, lvis.json, images/ and preview.png there, or under --dest.

On a laptop:
    python jobs/export.py --output outputs/tiny

On a cluster (the driver runs on the head node; export needs no Ray actors):
    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"env_vars": {"RAY_AUTH_MODE": "disabled"}}' \
        -- python jobs/export.py --output s3://bucket/run1 --no-images

A missing or unfinished output exits with status 2 and one line saying what to do.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import run_job  # noqa: E402


def main(argv=None) -> int:
    return run_job("export", argv)


if __name__ == "__main__":
    sys.exit(main())
