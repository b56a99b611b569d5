"""Train a detector on real + synthetic data, save it, and evaluate it.

On a laptop (embedded local Ray, tiny random detector):
    python jobs/train_detector.py --config configs/coco_ovd.yaml

On a cluster:
    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"RAY_AUTH_MODE": "disabled"}}' \\
        -- python jobs/train_detector.py --config configs/coco_ovd.yaml \\
           detector.storage_path=s3://bucket/train detector.num_workers=8 detector.use_gpu=true

The config's `detector:` section is engine.detection_train.DetectorConfig, e.g.

    detector:
      kind: deformable_detr            # detr | rt_detr | faster_rcnn (CUDA hosts with torchvision)
      model: tiny                      # or a local save_pretrained folder
      attention: project_op            # reference | project_op (engine.ops.ms_deform_attn)
      real_annotations: data/coco/annotations/instances_train2017_base.json
      real_image_root: data/coco/train2017
      synthetic: [outputs/coco_ovd]    # shard outputs of `instagen generate`
      mix_ratio: 0.5                   # half of each epoch's samples synthetic
      eval_annotations: data/coco/annotations/instances_val2017.json
      eval_image_root: data/coco/val2017
      base: [person, car]
      novel: [dog]

Rerunning the same command after an interruption resumes from the latest checkpoint under
storage_path/name. The trained detector lands in output_dir (model + image processor), usable
as the generation stage's teacher (annotation.labeller=detector annotation.model=<output_dir>);
the evaluation in output_dir/eval: detections.json (COCO results), report.json, report.md and
predictions.png. Bad input exits with status 2 and one message saying what to fix.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jobs/train_detector.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config with a detector: section")
    parser.add_argument("--skip-train", action="store_true", help="only evaluate detector.output_dir")
    parser.add_argument("--skip-eval", action="store_true", help="only train")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def load(path: str, overrides: list[str]):
    cfg = load_config(path, overrides)
    cfg.detector.validate()
    return cfg


def main(argv: Optional[list[str]] = None) -> int:
    from engine.datasets import DatasetError
    from engine.detection_train import DetectionDataError, evaluate_detector, train_detector
    from engine.detectors import DetectorError
    from engine.evaluation import EvaluationError, format_table
    from engine.training import TrainingConfigError

    args = parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
        det = cfg.detector
        if not args.skip_train:
            summary = train_detector(det, cfg.ray)
            print(f"[train_detector] {summary.line()}")
        if not args.skip_eval and det.eval_annotations:
            metrics = evaluate_detector(det)
            print(format_table(metrics), end="")
            print(f"[train_detector] report in {det.eval_dir or os.path.join(det.output_dir, 'eval')}")
    except (ConfigError, DatasetError, DetectionDataError, DetectorError, EvaluationError,
            TrainingConfigError) as e:
        print(f"train_detector: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
