"""Score a detector's COCO-format results against COCO/Objects365 or LVIS ground truth.

    python jobs/evaluate.py --gt instances_val2017.json --detections detections.json \\
        --format coco --base person,car --novel dog --out outputs/eval

Prints the metrics as a Markdown table and writes OUT/report.json and OUT/report.md (see
engine/evaluation/metrics.py for what each metric means). --base/--novel (COCO format only) add AP50
over those categories; novel AP50 is the open-vocabulary COCO metric. For LVIS, APr is the
open-vocabulary metric. Bad input exits with status 2 and one message saying what to fix.

On a cluster (the files must be where the head can read them):
    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"env_vars": {"RAY_AUTH_MODE": "disabled"}}' \
        -- python jobs/evaluate.py --gt instances_val2017.json --detections detections.json --out outputs/eval
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import run_job  # noqa: E402


def main(argv=None) -> int:
    return run_job("evaluate", argv)


if __name__ == "__main__":
    sys.exit(main())
