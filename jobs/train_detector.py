"""Train a detector on real + synthetic data, save it, and evaluate it.

On a laptop (embedded local Ray, tiny random detector, the small default config):
    python jobs/train_detector.py --config configs/tiny.yaml detector.real_annotations=... \
        detector.real_image_root=... detector.mix_ratio=0

On one machine with GPUs, the paper's COCO setting (configs/coco_ovd.yaml asks for 8 GPU workers;
set detector.run.num_workers to the GPUs you have):
    python jobs/train_detector.py --config configs/coco_ovd.yaml detector.run.num_workers=1

On a cluster:
    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"RAY_AUTH_MODE": "disabled"}}' \\
        -- python jobs/train_detector.py --config configs/coco_ovd.yaml \\
           detector.run.storage_path=s3://bucket/train detector.run.num_workers=8 detector.run.use_gpu=true

The config's `detector:` section is engine.config.DetectorConfig, e.g.

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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import run_job  # noqa: E402


def main(argv=None) -> int:
    return run_job("train-detector", argv)


if __name__ == "__main__":
    sys.exit(main())
