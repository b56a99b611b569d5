"""Typed configuration: the sections (plain dataclasses) and the loader (YAML + overrides)."""
from engine.config.loader import fingerprint, from_dict, load_config, to_dict, unshared
from engine.config.sections import (
                                    BUDGET_RULES,
                                    DETECTOR_ATTENTION,
                                    FREQUENCY_GROUPS,
                                    SPLIT_RULES,
                                    AnnotationConfig,
                                    AugmentConfig,
                                    Config,
                                    DetectorConfig,
                                    FinetuneConfig,
                                    GroundingConfig,
                                    GroundingConfigError,
                                    GroundingTrainConfig,
                                    GroundingTrainError,
                                    LayoutConfig,
                                    LossConfig,
                                    ModelConfig,
                                    OutputConfig,
                                    PromptConfig,
                                    RayConfig,
                                    SynthesisConfig,
                                    TinyDetectorConfig,
                                    TinyModelConfig,
                                    TrainRunConfig,
)
from engine.errors import ConfigError

__all__ = ["AnnotationConfig", "AugmentConfig", "BUDGET_RULES", "Config", "ConfigError", "DETECTOR_ATTENTION",
           "DetectorConfig", "FREQUENCY_GROUPS", "FinetuneConfig", "GroundingConfig", "GroundingConfigError",
           "GroundingTrainConfig", "GroundingTrainError", "LayoutConfig", "LossConfig", "ModelConfig", "OutputConfig", "PromptConfig",
           "RayConfig", "SPLIT_RULES", "SynthesisConfig", "TinyDetectorConfig", "TinyModelConfig", "TrainRunConfig",
           "fingerprint", "from_dict", "load_config", "to_dict", "unshared"]
