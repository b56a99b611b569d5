"""Fine-tune Stable Diffusion on crops of a detection dataset's base-category images (InstaGen 3.2).

On a laptop (embedded local Ray, tiny random model, CPU):
    python jobs/finetune_sd.py --config configs/tiny.yaml \
        finetune.annotations=data/instances.json finetune.image_root=data/images \
        finetune.crop_size=32 finetune.max_steps=20 finetune.run.num_workers=2 finetune.run.cpus_per_worker=0.5

On a cluster:
    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"RAY_AUTH_MODE": "disabled"}}' -- python jobs/finetune_sd.py --config configs/coco_ovd.yaml

Rerunning the same command (same finetune.run.storage_path and finetune.run.name) resumes from the
latest checkpoint. The fine-tuned pipeline is written to finetune.output_dir; point the generate
job's model.source at it. Add --dry-run to check the config and dataset without training.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import run_job  # noqa: E402


def main(argv=None) -> int:
    return run_job("finetune", argv)


if __name__ == "__main__":
    sys.exit(main())
