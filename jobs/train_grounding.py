"""Train the grounding head: supervised on base-category shards, then EMA self-training on
novel-category shards (paper 3.3, 4.1), on Ray Train + DeepSpeed.

On a laptop (embedded local Ray, the tiny pipeline):
    python jobs/train_grounding.py --config configs/tiny.yaml \\
        grounding.base_shards=outputs/tiny grounding.novel_shards=outputs/tiny_novel \\
        'grounding.base=[person, bicycle, car, dog]' 'grounding.novel=[cat, umbrella]' \\
        grounding.synthesis_steps=10 grounding.batch_size=4 grounding.run.num_workers=1

On a cluster:
    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"RAY_AUTH_MODE": "disabled"}}' \\
        -- python jobs/train_grounding.py --config configs/coco_ovd.yaml \\
           grounding.run.storage_path=s3://bucket/train grounding.run.num_workers=8 \\
           grounding.run.use_gpu=true grounding.run.bf16=true

The config's `model:` section names the pipeline whose UNet features the head reads (the one
that generated the shards); its `grounding:` section is engine.config.GroundingTrainConfig.
Rerunning the same command resumes from the latest checkpoint under
grounding.run.storage_path/name. The head lands in grounding.output (head.safetensors +
grounding.json), for annotation.labeller=grounding_head or teacher+head. Bad input exits with
status 2 and one message saying what to fix.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import run_job  # noqa: E402


def main(argv=None) -> int:
    return run_job("train-grounding", argv)


if __name__ == "__main__":
    sys.exit(main())
