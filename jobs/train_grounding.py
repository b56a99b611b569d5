"""Train the grounding head: supervised on base-category shards, then EMA self-training on
novel-category shards (paper 3.3, 4.1), on Ray Train + DeepSpeed.

On a laptop (embedded local Ray, the tiny pipeline):
    python jobs/train_grounding.py --config configs/tiny.yaml \\
        grounding.base_shards=outputs/tiny grounding.novel_shards=outputs/tiny_novel \\
        'grounding.base=[person, bicycle, car, dog]' 'grounding.novel=[cat, umbrella]' \\
        grounding.synthesis_steps=10 grounding.batch_size=4 grounding.train.num_workers=1

On a cluster:
    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"RAY_AUTH_MODE": "disabled"}}' \\
        -- python jobs/train_grounding.py --config configs/coco_ovd.yaml \\
           grounding.train.storage_path=s3://bucket/train grounding.train.num_workers=8 \\
           grounding.train.use_gpu=true grounding.bf16=true

The config's `model:` section names the pipeline whose UNet features the head reads (the one
that generated the shards); its `grounding:` section is engine.grounding.GroundingTrainConfig.
Rerunning the same command resumes from the latest checkpoint under
grounding.train.storage_path/name. The head lands in grounding.output (head.safetensors +
grounding.json), for annotation.labeller=grounding_head or teacher+head. Bad input exits with
status 2 and one message saying what to fix.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import ConfigError, load_config  # noqa: E402


def load(path: Optional[str], overrides: list[str]):
    cfg = load_config(path, overrides)
    cfg.grounding.validate()  # only this job needs the grounding section filled in
    return cfg


def main(argv: Optional[list[str]] = None) -> int:
    from engine.cluster import ResourceError, connect
    from engine.grounding.model import GroundingConfigError
    from engine.grounding.train import GroundingTrainError, check_inputs, train_grounding
    from engine.models import ModelLoadError
    from engine.shards import ShardError
    from engine.training import TrainingConfigError

    parser = argparse.ArgumentParser(prog="jobs/train_grounding.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML config with model: and grounding: sections")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
        check_inputs(cfg.grounding, cfg.model)
        connect(cfg.ray)
        result = train_grounding(cfg.grounding, cfg.model)
        metrics = result.metrics or {}  # a rerun of a finished run trains (and reports) nothing
        print(f"[train_grounding] {metrics.get('step', 0)} steps, last loss "
              f"{metrics.get('loss', float('nan')):.4f} -> {cfg.grounding.output}")
    except (ConfigError, GroundingTrainError, GroundingConfigError, ModelLoadError, ShardError,
            ResourceError, TrainingConfigError) as e:
        print(f"train_grounding: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
