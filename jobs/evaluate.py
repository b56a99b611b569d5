"""Score a detector's COCO-format results against COCO/Objects365 or LVIS ground truth.

    python jobs/evaluate.py --gt instances_val2017.json --detections detections.json \\
        --format coco --base person,car --novel dog --out outputs/eval

Prints the metrics as a Markdown table and writes OUT/report.json and OUT/report.md (see
engine/evaluation.py for what each metric means). --base/--novel (COCO format only) add AP50
over those categories; novel AP50 is the open-vocabulary COCO metric. For LVIS, APr is the
open-vocabulary metric. Bad input exits with status 2 and one message saying what to fix.

On a cluster (the files must be where the head can read them):
    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"env_vars": {"RAY_AUTH_MODE": "disabled"}}' \
        -- python jobs/evaluate.py --gt instances_val2017.json --detections detections.json --out outputs/eval
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from engine.evaluation import EvaluationError, evaluate_coco, evaluate_lvis, format_table, \
    write_report


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="jobs/evaluate.py",
        description="Box AP of detections (COCO results JSON) against COCO-format or LVIS "
                    "ground truth; prints a table and writes OUT/NAME.json and OUT/NAME.md.")
    parser.add_argument("--gt", required=True, help="ground-truth instances JSON")
    parser.add_argument("--detections", required=True,
                        help="COCO results JSON: [{image_id, category_id, bbox, score}, ...]")
    parser.add_argument("--format", choices=("coco", "lvis"), default="coco",
                        help="coco (also Objects365) or lvis (default: coco)")
    parser.add_argument("--base", type=_names, default=None,
                        help="comma-separated base category names (coco format only)")
    parser.add_argument("--novel", type=_names, default=None,
                        help="comma-separated novel category names (coco format only)")
    parser.add_argument("--out", required=True, help="directory for the report")
    parser.add_argument("--name", default="report", help="report file name (default: report)")
    return parser.parse_args(argv)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.format == "lvis":
            if args.base is not None or args.novel is not None:
                raise EvaluationError("--base/--novel apply to --format coco only; for LVIS the "
                                      "open-vocabulary metric is APr (rare categories)")
            metrics = evaluate_lvis(args.gt, args.detections)
        else:
            metrics = evaluate_coco(args.gt, args.detections, base=args.base, novel=args.novel)
        json_path, md_path = write_report(metrics, args.out, args.name)
    except (EvaluationError, OSError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(format_table(metrics), end="")
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
