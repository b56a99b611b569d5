"""Fine-tune Stable Diffusion on crops of a detection dataset's base-category images (InstaGen 3.2).

On a laptop (embedded local Ray, tiny random model, CPU):
    python jobs/finetune_sd.py --config configs/tiny.yaml \
        finetune.annotations=data/instances.json finetune.image_root=data/images \
        finetune.crop_size=32 finetune.max_steps=20 finetune.num_workers=2 finetune.cpus_per_worker=0.5

On a cluster:
    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"RAY_AUTH_MODE": "disabled"}}' -- python jobs/finetune_sd.py --config configs/coco_ovd.yaml

Rerunning the same command (same finetune.storage_path and finetune.name) resumes from the
latest checkpoint. The fine-tuned pipeline is written to finetune.output_dir; point the generate
job's model.source at it. Add --dry-run to check the config and dataset without training.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--dry-run", action="store_true", help="validate config and dataset, plan crops, train nothing")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. finetune.max_steps=100")
    args = parser.parse_args(argv)

    from engine.cluster import ResourceError
    from engine.config import ConfigError, load_config
    from engine.datasets import DatasetError
    from engine.finetune import finetune, prepare, summary_lines
    from engine.models import ModelLoadError
    from engine.training import TrainingConfigError

    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            fc, rows, skipped, n_images = prepare(cfg)
            print(f"[finetune] config valid: {n_images} base-category images, {len(rows)} crops planned; "
                  f"{skipped.summary()}")
            return 0
        summary = finetune(cfg)
    except (ConfigError, DatasetError, ModelLoadError, ResourceError, TrainingConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in summary_lines(summary):
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
