"""The InstaGen loop on a drawn world, measured: the paper's table 4 in miniature.

With tiny random weights the engine runs but proves nothing. Here every stage runs on real
signal, through the same engine functions the jobs call (finetune, generate, train_grounding,
train_detector, evaluate_detector), on a world small enough for a 2-core CPU
(engine.toyworld.world): coloured shapes named like "red circle", some categories never annotated.

    world          draw pretrain (captions), train (base boxes only) and test (all boxes) splits
    clip           a CLIP on the pretraining pictures and captions, scored zero-shot on the test
                   split's boxes (results["clip"]); the quality filter's model for this world.
                   Only with clip.enabled: true
    pretrain_vae   the VAE, from scratch on the pretraining images    } the world's stand-in for
    pretrain_unet  the UNet on their captions, text from MiniLM       } a pretrained SD
    finetune       the UNet fine-tuned on the base detection images (paper 3.2)
    teacher        a detector trained on the real base set (the generation teacher)
    then for each generator (pretrained; fine-tuned):
      <g>_base         base images labelled by the teacher (score >= alpha)
      <g>_head_sup     grounding head trained on them until the transfer epoch   [pretrained only]
      <g>_novel_sup    novel images labelled by that head (score >= beta)        [pretrained only]
      <g>_novel_raw    novel images without boxes, for self-training             [fine-tuned only]
      <g>_head_st      grounding head self-trained on novel and base images (EMA teacher),
                       starting from the pretrained generator's supervised head
      <g>_novel_st     novel images labelled by the self-trained head
      pretrained_<set>_expanded  novel_sup, head_st and novel_st again, the novel images drawn from
                       prompts a local language model wrote (`expansion`, SmolLM2 by default;
                       ImaginaryNet, DiverGen: seeds 004, 002); only for the row self_training_expanded
    detectors, all evaluated on the test split (AP50 all / base / novel):
      real_only        real base set
      grounding_head   + pretrained generator's base + novel_sup images
      self_training    + pretrained generator's base + novel_st images
      self_training_expanded  the same, its novel images from the language model's prompts instead
                       of the template; a row only when `rows` lists it
      fine_tuning      + fine-tuned generator's base + novel_st images
      synthetic_only   the last synthetic row's images alone, no real image (ImaginaryNet's
                       setting, seed 004); a row only when `rows` lists it
      synthetic_only_clip  the same, on those images again with the world's CLIP as the quality
                       filter (DiverGen: seed 002): boxes and images it scores low are left out.
                       Its stages <set>_clip regenerate the same samples (same prompts and seeds),
                       scored. Needs clip.enabled; a row only when `rows` lists it
      layout           real base set + images GLIGEN drew from layouts, labelled by them (seed 003);
                       a row only when `rows` lists it. Its stages:
        gligen         GLIGEN's gated layers added to the pretrained UNet and trained on the
                       pretraining pictures' exact boxes of every category
        layouts        base layouts from the real train split's scenes (boxes moved and scaled),
                       novel ones borrowed from them (a box relabelled), drawn by GLIGEN
      layout_base      the same with GLIGEN trained on base boxes alone (stages gligen_base,
                       layouts_base): how much of the layout row comes from seeing novel boxes
      layout_inpaint   the same with GLIGEN inpainting (stages gligen_inpaint_data,
                       gligen_inpaint_decoder, gligen_inpaint, layouts_inpaint): each real scene
                       kept outside its boxes and redrawn inside them, the novel layouts'
                       relabelled box redrawn as the novel category (seed 003's second mode);
                       trained on the pretraining pictures and the train split's scenes
                       (layout.inpaint_splits), their boxes as the holes, after the VAE's decoder
                       has learnt to draw them (layout.decoder)
      copy_paste       real base set, each image with objects of the instance pool pasted on
                       (X-Paste, DiverGen: seed 002); a row only when `rows` lists it. Its stages:
        pretrained_objects  one object per image on a plain picture, every category, labelled by
                            the teacher (base) and the self-trained head (novel), masked by the
                            colour segmenter, whose true IoU on drawn objects is recorded
        pool                the masked objects' cut-outs (engine.generation.pool)

    random_boxes       the chance row: random boxes of the objects' sizes on the test split

`plan_loop` declares these stages (engine.runtime.stages.Stage) and `run_loop` runs them through
the recipe's runner (run_plan: --from, --only, --rerun, --keep; with dry=True what a run would do, for --dry-run), then
writes the table. Each stage records a fingerprint of its inputs in WORKDIR/stages.json: a rerun
skips stages that finished with the same inputs, and a stage interrupted half-way resumes through
its job's own resume (trainer checkpoints, finished shards). A stage whose inputs changed starts
over.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import random
import sys
import textwrap
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from engine.config import (
    AnnotationConfig,
    ClipTrainConfig,
    Config,
    ConfigError,
    CopyPasteConfig,
    DetectorConfig,
    ExpandConfig,
    FilterConfig,
    FinetuneConfig,
    GroundingTrainConfig,
    LayoutConfig,
    MaskConfig,
    ModelConfig,
    OutputConfig,
    PoolConfig,
    PromptConfig,
    RayConfig,
    SynthesisConfig,
    TrainRunConfig,
    load_config,
    to_dict,
)
from engine.data.shards import iter_samples, shard_urls, usable
from engine.data.sheet import BASE_COLOUR, NOVEL_COLOUR, Tile, contact_sheet
from engine.evaluation.detector import evaluate_detector
from engine.evaluation.metrics import evaluate_coco
from engine.generation.pipeline import generate
from engine.generation.pool import build_pool
from engine.models.segmenter import build_segmenter
from engine.ops import kernel_status
from engine.runtime.stages import Stage, run_plan
from engine.runtime.storage import write_file
from engine.toyworld.world import IMAGE_NAME, WorldConfig, draw_scene, draw_world, merge_splits, object_masks
from engine.training.clip import train_clip
from engine.training.copy_paste import CopyPaste, load_pool_index
from engine.training.detection import train_detector
from engine.training.finetune import finetune
from engine.training.grounding import train_grounding

ROWS = ("real_only", "grounding_head", "self_training", "fine_tuning", "self_training_expanded", "synthetic_only",
        "synthetic_only_clip", "layout", "layout_base", "layout_inpaint", "copy_paste")
# The layout rows and the boxes their GLIGEN learns from the pretraining pictures: every category's
# (as the real GLIGEN learns from grounding data far beyond a detection set), or the base ones
# alone (what InstaGen's grounding head is allowed to see).
LAYOUT_ROWS = {"layout": "all", "layout_base": "base", "layout_inpaint": "all"}
DEFAULT_ROWS = ROWS[:4]  # table 4's rows; each other row costs one more detector per seed
METRICS = ("AP50", "AP50_base", "AP50_novel")
ROW_TITLES = {"real_only": "real only", "grounding_head": "+ grounding head",
              "self_training": "+ self-training", "fine_tuning": "+ fine-tuning",
              "self_training_expanded": "+ self-training, prompts by a language model",
              "synthetic_only": "synthetic only (no real image)",
              "synthetic_only_clip": "synthetic only, CLIP-filtered",
              "layout": "+ layouts (GLIGEN)",
              "layout_base": "+ layouts (GLIGEN, base boxes only)",
              "layout_inpaint": "+ layouts (GLIGEN inpainting)",
              "copy_paste": "real + pasted objects (copy-paste)",
              "random_boxes": "random boxes (chance)"}


@dataclass
class CopyPasteRowConfig:
    """The copy_paste row: single generated objects, cut out, pasted onto the real images."""
    images_per_category: int = 32
    # The colour segmenter: no SAM checkpoint exists for this world, and its generated objects
    # stand on plain pictures; the background prompt is DiverGen's SAM-bg.
    masks: MaskConfig = field(default_factory=lambda: MaskConfig(enabled=True, model="colour", prompt="background"))
    # Each picture keeps its labellers' best box of the prompted category whatever its score
    # (alpha = beta = 0): the pool judges it, at min_score (annotation.beta's value), and by its mask.
    pool: PoolConfig = field(default_factory=lambda: PoolConfig(min_area=16, min_score=0.2))
    paste: CopyPasteConfig = field(default_factory=CopyPasteConfig)  # `pool` is filled in


@dataclass
class LayoutRowConfig:
    """The layout row: GLIGEN trained on the world's boxes draws scenes from the real layouts."""
    # GLIGEN training (finetune.train=gligen) on the pretraining pictures and their exact boxes.
    gligen: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(train="gligen"))
    # Layout rows from the real train split (annotations, image_root and borrow_for filled in:
    # the novel categories borrow the base scenes' layouts).
    rows: LayoutConfig = field(default_factory=lambda: LayoutConfig(
        max_objects=3, one_category=False, rows_per_category=64, borrow_rows=64))
    # The layout_inpaint row's GLIGEN inpainting; its rows are `rows` with the real boxes unmoved
    # (inpainting keeps the scene around them).
    inpaint: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(train="gligen", inpaint=True))
    # The world splits it learns from, with their boxes as holes: the pretraining pictures (every
    # category, plain backgrounds) and the train split's scenes (base boxes, the cluttered
    # backgrounds it redraws in). Trained on the pictures alone it filled holes in the scenes with
    # plain background: its objects were named right in 0% of the boxes, against 57% on pictures.
    inpaint_splits: list[str] = field(default_factory=lambda: ["pretrain", "train"])
    # Its VAE decoder, fine-tuned on those splits first (the encoder and the latent space kept):
    # the toy VAE learnt plain pictures only and drew the scenes as a pale smear (mean error 0.52
    # of the [-1, 1] range on test scenes; 0.12 with the decoder tuned), and so the objects inside the holes.
    decoder: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(train="decoder"))


@dataclass
class AblationConfig:
    """One file for the whole loop (configs/toy_world.yaml). Paths are filled in under
    `workdir`; categories come from the world."""
    name: str = "toy_world"
    workdir: str = "outputs/toy_world"
    rows: list[str] = field(default_factory=lambda: list(DEFAULT_ROWS))
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # the untrained generator's sizes
    pretrain_vae: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(train="vae"))
    pretrain_unet: FinetuneConfig = field(default_factory=FinetuneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)  # template, images per category
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    annotation: AnnotationConfig = field(default_factory=AnnotationConfig)  # alpha, beta, batch
    shard_size: int = 64
    teacher: DetectorConfig = field(default_factory=DetectorConfig)
    grounding: GroundingTrainConfig = field(default_factory=GroundingTrainConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    random_boxes: int = 10  # boxes per test image of the chance baseline
    # Each row's detector is trained once per seed (detector.seed and detector.tiny.seed set to
    # it); with several, the table shows mean ± sd. On this world one row moves by up to 23 AP50
    # base between seeds on the same data (run 7, real only: 13.2-36.2), so one seed cannot rank
    # the rows.
    detector_seeds: list[int] = field(default_factory=lambda: [0])
    # Where each row's detector starts: "scratch" (random weights from detector.tiny) or "teacher"
    # (the teacher's weights, its classification heads re-initialised, by the seed, for every
    # category; detector.model is replaced). From scratch, 500 steps leave a detector inside
    # DETR's slow start, which each seed leaves at its own step: real-only AP50 base 16-28
    # between seeds (sd 6.2); from the teacher 51-56 (sd 2.6). docs/benchmarks.md, issue 26.
    detector_init: str = "scratch"
    # The world's own CLIP (stage `clip`); its data paths are filled in from the world.
    clip: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    copy_paste: CopyPasteRowConfig = field(default_factory=CopyPasteRowConfig)
    layout: LayoutRowConfig = field(default_factory=LayoutRowConfig)
    # The synthetic_only_clip row's filter (always on there); its model is the world's CLIP (filled in).
    clip_filter: FilterConfig = field(default_factory=lambda: FilterConfig(enabled=True))
    # The self_training_expanded row's prompt expansion (on there whatever `enabled` says); the
    # other rows keep the template (prompts.expand).
    expansion: ExpandConfig = field(default_factory=ExpandConfig)

    def validate(self) -> None:
        self.world.validate()
        unknown = [r for r in self.rows if r not in ROWS]
        if unknown or not self.rows:
            raise ConfigError(f"rows {unknown or self.rows} are not table rows; choose from {', '.join(ROWS)}")
        for row in ("synthetic_only", "synthetic_only_clip"):
            if row in self.rows and not {"self_training", "fine_tuning"} & set(self.rows):
                raise ConfigError(f"rows: {row} trains on the images of the self_training or fine_tuning row; "
                                  f"list one of them too")
        if "synthetic_only_clip" in self.rows:
            if not self.clip.enabled:
                raise ConfigError("rows: synthetic_only_clip filters with the world's CLIP; set clip.enabled: true "
                                  "(configs/toy_world.yaml has a clip: section to uncomment)")
            dataclasses.replace(self.clip_filter, model="models/clip").validate(key="clip_filter")
        if "self_training_expanded" in self.rows:
            dataclasses.replace(self.expansion, enabled=True).validate(key="expansion")
        if set(LAYOUT_ROWS) & set(self.rows):
            lr = self.layout
            if lr.gligen.train != "gligen":
                raise ConfigError(f"layout.gligen.train must be gligen (got {lr.gligen.train!r})")
            if "layout_inpaint" in self.rows:
                if not (lr.inpaint.train == "gligen" and lr.inpaint.inpaint):
                    raise ConfigError("layout.inpaint trains the layout_inpaint row's GLIGEN inpainting: it needs "
                                      f"train: gligen and inpaint: true (got {lr.inpaint.train!r}, {lr.inpaint.inpaint})")
                if lr.decoder.train != "decoder":
                    raise ConfigError(f"layout.decoder fine-tunes the inpainting's VAE decoder: it needs train: "
                                      f"decoder (got {lr.decoder.train!r})")
                if not (lr.inpaint_splits and set(lr.inpaint_splits) <= {"pretrain", "train"}):
                    raise ConfigError(f"layout.inpaint_splits must name pretrain and/or train (the test split is "
                                      f"what the rows are judged on); got {lr.inpaint_splits!r}")
            dataclasses.replace(lr.rows, annotations="world/train/instances.json", image_root="world/train",
                                borrow_for=list(self.world.novel)).validate()
        if "copy_paste" in self.rows:
            if "self_training" not in self.rows:
                raise ConfigError("rows: copy_paste's novel objects are labelled by the self_training row's head; "
                                  "list self_training too")
            cp = self.copy_paste
            if cp.images_per_category < 1 or not cp.masks.enabled:
                raise ConfigError("copy_paste.images_per_category must be >= 1 and copy_paste.masks.enabled true")
            cp.masks.validate()
            cp.pool.validate()
            cp.paste.validate()
        if self.pretrain_vae.train != "vae" or self.pretrain_unet.train != "unet" or self.finetune.train != "unet":
            raise ConfigError("pretrain_vae trains the vae, pretrain_unet and finetune the unet: leave their "
                              "`train` keys out")
        novel_images = len(self.world.novel) * self.prompts.images_per_category
        if novel_images < self.grounding.batch_size:
            raise ConfigError(f"{novel_images} novel images (prompts.images_per_category x {len(self.world.novel)} "
                              f"novel categories) cannot fill one self-training batch of grounding.batch_size="
                              f"{self.grounding.batch_size}; raise images_per_category or lower batch_size")
        if self.detector_init not in ("scratch", "teacher"):
            raise ConfigError(f"detector_init must be scratch or teacher, not {self.detector_init!r}")
        if self.detector_init == "teacher" and self.detector.kind != self.teacher.kind:
            raise ConfigError(f"detector_init: teacher starts each row's detector from the teacher's weights, so "
                              f"detector.kind ({self.detector.kind}) must be teacher.kind ({self.teacher.kind})")
        if not self.detector_seeds or len(set(self.detector_seeds)) != len(self.detector_seeds):
            raise ConfigError(f"detector_seeds {self.detector_seeds} must list one or more different seeds, "
                              f"e.g. [0, 1, 2]")
        if self.grounding.transfer_epoch >= self.grounding.epochs:
            raise ConfigError(f"grounding.transfer_epoch ({self.grounding.transfer_epoch}) must be below "
                              f"grounding.epochs ({self.grounding.epochs}): the self-trained head needs epochs "
                              f"after the transfer")
        if self.clip.enabled:  # the paths the stage fills in, so that only the user's keys are judged
            dataclasses.replace(self.clip, captions="world/pretrain/captions.json", image_root="world/pretrain",
                                eval_annotations="", eval_image_root="", output_dir="models/clip").validate()


class Loop:
    """The stages of the module docstring, with their paths under cfg.workdir."""

    def __init__(self, cfg: AblationConfig, log: Callable[[str], None]):
        self.cfg, self.log = cfg, log
        self.ws = os.path.abspath(os.path.expanduser(cfg.workdir))
        self.world_dir = os.path.join(self.ws, "world")
        self.base, self.novel = cfg.world.base, cfg.world.novel
        self.plan: list[Stage] = []  # declared in order; `run` runs them
        self.rows: dict[str, dict[str, str]] = {}  # table row -> detector seed -> its stage
        self.samples: Optional[tuple[str, str]] = None  # the base and novel sets samples.png shows
        self.sets: dict[str, dict] = {}  # each synthetic set's generate() arguments, to redo it filtered

    def declare(self, name: str, inputs: Any, fn: Callable[[], dict], outputs: list[str], after: list[str]) -> None:
        self.plan.append(Stage(name, inputs, fn, outputs, after))

    def run(self, **flags) -> dict[str, dict]:
        """Runs the declared stages (engine.runtime.stages.run_plan; flags: rerun_from, only,
        rerun, keep); returns each stage's result by name."""
        return run_plan(self.plan, self.ws, self.log, **flags)

    def path(self, *parts: str) -> str:
        return os.path.join(self.ws, *parts)

    def split(self, name: str) -> tuple[str, str]:
        return self.path("world", name, "instances.json"), self.path("world", name)

    # -- stages -----------------------------------------------------------------------------

    def world(self) -> None:
        self.declare("world", dataclasses.asdict(self.cfg.world), lambda: draw_world(self.world_dir, self.cfg.world),
                     [self.world_dir], after=[])

    def clip(self) -> None:
        """The world's CLIP, trained on the pretraining split, scored zero-shot on the test split."""
        out = self.path("models", "clip")
        test_ann, test_root = self.split("test")
        cc = dataclasses.replace(self.cfg.clip, captions=self.path("world", "pretrain", "captions.json"),
                                 image_root=self.path("world", "pretrain"), eval_annotations=test_ann,
                                 eval_image_root=test_root, eval_base=self.base, eval_novel=self.novel,
                                 output_dir=out, run=self.run_settings(self.cfg.clip.run, "clip"))

        def run() -> dict:
            s = train_clip(cc, self.cfg.ray)
            m = s.metrics
            return {"model": out, "steps": s.steps, "final_loss": m["loss"], "loss_first": m["losses"][:20],
                    "loss_last": m["losses"][-20:], "train_s": m["train_s"], "zero_shot": m["zero_shot"]}
        self.declare("clip", {"clip": to_dict(cc)}, run, [out, self.path("ray", "clip")], ["world"])

    def run_settings(self, run: TrainRunConfig, name: str) -> TrainRunConfig:
        """A stage's Ray Train run: its checkpoints under WORKDIR/ray/<stage name>."""
        return dataclasses.replace(run, storage_path=self.path("ray"), name=name)

    def train_generator(self, name: str, fc: FinetuneConfig, source: str, after: list[str], **data) -> str:
        out = self.path("models", name)
        fc = dataclasses.replace(fc, run=self.run_settings(fc.run, name), output_dir=out, **data)
        cfg = Config(model=dataclasses.replace(self.cfg.model, source=source),
                     prompts=dataclasses.replace(self.cfg.prompts, base=self.base, novel=self.novel),
                     finetune=fc, ray=self.cfg.ray)

        def run() -> dict:
            s = finetune(cfg)
            return {"steps": s.steps, "final_loss": s.metrics["loss"], "loss_first": s.metrics["losses"][:20],
                    "loss_last": s.metrics["losses"][-20:], "samples_per_s": s.metrics["samples_per_s"]}
        self.declare(name, {"finetune": to_dict(fc), "model": to_dict(cfg.model)}, run,
                     [out, self.path("ray", name)], after)
        return out

    def teacher(self) -> None:
        """The generation teacher: base categories only, evaluated on them."""
        self._detector_stage("teacher", self.cfg.teacher, [], self.base, [], ["world"])

    def generate(self, name: str, source: str, which: str, labeller: str, after: list[str],
                 head: str = "", masks: Optional[MaskConfig] = None, min_score: Optional[float] = None,
                 quality: Optional[FilterConfig] = None, layout: Optional[LayoutConfig] = None, **prompts) -> str:
        """A synthetic set; `min_score` replaces both labellers' thresholds (alpha and beta),
        `quality` is its CLIP filter, `layout` its layout rows (in place of prompt rows)."""
        self.sets[name] = {"source": source, "which": which, "labeller": labeller, "head": head, "masks": masks,
                           "min_score": min_score, "layout": layout, **prompts}
        scores = {} if min_score is None else {"alpha": min_score, "beta": min_score}
        out = self.path("synthetic", name)
        cfg = Config(model=ModelConfig(source=source, scheduler=self.cfg.model.scheduler),
                     prompts=dataclasses.replace(self.cfg.prompts, base=self.base, novel=self.novel, generate=which,
                                                 **prompts),
                     synthesis=self.cfg.synthesis, masks=masks or MaskConfig(), filter=quality or FilterConfig(),
                     layout=layout or LayoutConfig(),
                     annotation=dataclasses.replace(self.cfg.annotation, labeller=labeller,
                                                    model=self.path("models", "teacher"), head=head, **scores),
                     output=OutputConfig(path=out, shard_size=self.cfg.shard_size), ray=self.cfg.ray)

        def run() -> dict:
            s = generate(cfg)
            return {"images": s.images, "boxes": s.boxes, "dropped": s.dropped, "images_per_s": s.images_per_s}
        self.declare(name, {"config": to_dict(cfg)}, run, [out], after)
        return out

    def merged_splits(self, name: str, splits: list[str]) -> tuple[str, str]:
        """Stage `name`: the world's `splits` as one COCO file; (its path, its image root)."""
        out = self.path("data", name, "instances.json")
        self.declare(name, {"splits": splits}, lambda: merge_splits(self.world_dir, splits, out),
                     [os.path.dirname(out)], ["world"])
        return out, self.world_dir

    def layouts(self, pretrained: str, row: str) -> tuple[str, str]:
        """GLIGEN on the pretrained generator, trained on the boxes LAYOUT_ROWS gives `row`, then the
        layout set it draws from the real scenes: (the set's stage name, its path)."""
        suffix, inpaint = row[len("layout"):], row == "layout_inpaint"
        boxes = self.base + self.novel if LAYOUT_ROWS[row] == "all" else self.base
        data, data_root, source, after = *self.split("pretrain"), pretrained, ["pretrain_unet"]
        if inpaint:
            data, data_root = self.merged_splits("gligen_inpaint_data", self.cfg.layout.inpaint_splits)
            source = self.train_generator("gligen_inpaint_decoder", self.cfg.layout.decoder, pretrained,
                                          after + ["gligen_inpaint_data"], annotations=data, image_root=data_root,
                                          base=boxes)
            after = ["gligen_inpaint_decoder", "gligen_inpaint_data"]
        gligen = self.train_generator(f"gligen{suffix}", self.cfg.layout.inpaint if inpaint else self.cfg.layout.gligen,
                                      source, after, annotations=data, image_root=data_root, base=boxes)
        ann, root = self.split("train")
        exact = {"mode": "inpainting", "jitter": 0.0, "scale_min": 1.0, "scale_max": 1.0} if inpaint else {}
        rows = dataclasses.replace(self.cfg.layout.rows, annotations=ann, image_root=root, borrow_for=list(self.novel),
                                   **exact)
        name = f"layouts{suffix}"
        return name, self.generate(name, gligen, "all", "layout", [f"gligen{suffix}"], layout=rows)

    def filtered(self, name: str) -> str:
        """Synthetic set `name` again, scored by the world's CLIP: the same prompts and seeds give
        the same images and labels, and the filter marks what it refuses."""
        quality = dataclasses.replace(self.cfg.clip_filter, enabled=True, model=self.path("models", "clip"))
        return self.generate(f"{name}_clip", **self.sets[name], after=[name, "clip"], quality=quality)

    def pool(self, source: str, after: list[str]) -> str:
        """The instance pool of `source`'s masked objects, and the segmenter's true IoU on the
        world's own drawn objects (its masks are exact)."""
        out, cp = self.path("pool"), self.cfg.copy_paste

        def run() -> dict:
            s = build_pool(source, out, cp.pool, self.cfg.ray)
            return {"instances": s.instances, "per_category": s.per_category, "rejected": s.rejected,
                    "segmenter_iou": segmenter_iou(self.cfg.world, self.world_dir, cp.masks)}
        self.declare("pool", {"pool": to_dict(cp.pool), "masks": to_dict(cp.masks)}, run, [out], after)
        return out

    def grounding(self, name: str, source: str, base_shards: str, novel_shards: str, after: list[str],
                  init_head: str = "") -> str:
        """Without novel shards: the supervised head, trained until the transfer epoch. With them:
        supervised then self-trained, or only the self-training epochs from `init_head`."""
        g, a = self.cfg.grounding, self.cfg.annotation  # the head's pseudo-labels obey the labellers' rules
        out = self.path("models", name)
        gc = dataclasses.replace(
            g, base_shards=base_shards, novel_shards=novel_shards, base=self.base,
            novel=self.novel if novel_shards else [], synthesis_steps=self.cfg.synthesis.steps,
            alpha=a.alpha, beta=a.beta, nms_iou=a.nms_iou, max_per_category=a.max_per_category,
            output=out, init_head=init_head,
            epochs=g.epochs if novel_shards else g.transfer_epoch,
            run=self.run_settings(g.run, name))
        model = ModelConfig(source=source, scheduler=self.cfg.model.scheduler)

        def run() -> dict:
            s = train_grounding(gc, model, self.cfg.ray)
            return {"step": s.steps, "loss": s.metrics.get("loss")}
        self.declare(name, {"grounding": to_dict(gc)}, run, [out, self.path("ray", name)], after)
        return out

    def detector(self, row: str, synthetic: list[str], after: list[str], synthetic_only: bool = False,
                 pool: str = "") -> None:
        """A table row: every category, real base boxes plus `synthetic` shards (or those alone),
        pasted with `pool`'s objects if given, one detector per seed (`rows`)."""
        for seed in self.cfg.detector_seeds:
            extra: dict[str, Any] = {"mix_ratio": 1.0} if synthetic_only else {}
            if self.cfg.detector_init == "teacher":
                extra["model"] = self.path("models", "teacher")
            if pool:
                extra["copy_paste"] = dataclasses.replace(self.cfg.copy_paste.paste, pool=pool)
            section = dataclasses.replace(self.cfg.detector, seed=seed,
                                          tiny=dataclasses.replace(self.cfg.detector.tiny, seed=seed), **extra)
            name = f"detector_{row}" + (f"_seed{seed}" if seed else "")
            self._detector_stage(name, section, synthetic, self.base + self.novel, self.novel,
                                 after + ["teacher"] if self.cfg.detector_init == "teacher" else after)
            self.rows.setdefault(row, {})[str(seed)] = name

    def chance(self) -> None:
        """The chance row: random boxes of the objects' sizes on the test split."""
        w = self.cfg.world
        self.declare("random_boxes", {"per_image": self.cfg.random_boxes},
                     lambda: random_box_baseline(self.split("test")[0], self.base, self.novel, self.cfg.random_boxes,
                                                 (w.min_object, w.max_object), w.seed), [], ["world"])

    def _detector_stage(self, name: str, section: DetectorConfig, synthetic: list[str], categories: list[str],
                        novel: list[str], after: list[str]) -> None:
        """Train on the real train split (+ `synthetic`), evaluate on the test split."""
        ann, root = self.split("train")
        test_ann, test_root = self.split("test")
        dc = dataclasses.replace(section, real_annotations=ann, real_image_root=root, synthetic=synthetic,
                                 mix_ratio=section.mix_ratio if synthetic else 0.0,
                                 synthetic_complete_only=section.synthetic_complete_only and bool(synthetic),
                                 categories=categories,
                                 base=self.base, novel=novel, eval_annotations=test_ann, eval_image_root=test_root,
                                 run=self.run_settings(section.run, name), output_dir=self.path("models", name),
                                 eval_dir=self.path("eval", name))

        def run() -> dict:
            train_detector(dc, self.cfg.ray)
            m = evaluate_detector(dc)
            return {k: m.get(k) for k in ("AP50", "AP50_base", "AP50_novel", "per_category_AP50")}
        self.declare(name, {"detector": to_dict(dc)}, run, [dc.output_dir, dc.eval_dir, self.path("ray", name)], after)


def plan_loop(cfg: AblationConfig, log: Callable[[str], None]) -> Loop:
    """The stages of the rows cfg.rows asks for, declared in the order they run."""
    loop = Loop(cfg, log)
    loop.world()
    if cfg.clip.enabled:
        loop.clip()
    ann, root = loop.split("train")
    captions = loop.path("world", "pretrain", "captions.json")
    pre_images = loop.path("world", "pretrain")
    vae = loop.train_generator("pretrain_vae", cfg.pretrain_vae, cfg.model.source, ["world"],
                               captions=captions, image_root=pre_images)
    pretrained = loop.train_generator("pretrain_unet", cfg.pretrain_unet, vae, ["pretrain_vae"],
                                      captions=captions, image_root=pre_images)
    loop.teacher()

    want = set(cfg.rows)
    if "real_only" in want:
        loop.detector("real_only", [], ["world"])
    if want & {"grounding_head", "self_training", "fine_tuning", "self_training_expanded"}:
        base = loop.generate("pretrained_base", pretrained, "base", "detector", ["pretrain_unet", "teacher"])
        head_sup = loop.grounding("pretrained_head_sup", pretrained, base, "", ["pretrained_base"])
    if want & {"grounding_head", "self_training"}:
        novel_sup = loop.generate("pretrained_novel_sup", pretrained, "novel", "grounding_head",
                                  ["pretrained_head_sup"], head=head_sup)
        if "grounding_head" in want:
            loop.detector("grounding_head", [base, novel_sup], ["pretrained_novel_sup"])
        if "self_training" in want:
            head_st = loop.grounding("pretrained_head_st", pretrained, base, novel_sup,
                                     ["pretrained_head_sup", "pretrained_novel_sup"], init_head=head_sup)
            novel_st = loop.generate("pretrained_novel_st", pretrained, "novel", "grounding_head",
                                     ["pretrained_head_st"], head=head_st)
            loop.detector("self_training", [base, novel_st], ["pretrained_novel_st"])
        if "copy_paste" in want:
            # Single objects on plain pictures, as the pretrained generator learnt them: what the
            # colour segmenter (and DiverGen's SAM-bg) cuts out cleanly.
            cp = cfg.copy_paste
            objects = loop.generate("pretrained_objects", pretrained, "all", "teacher+head",
                                    ["pretrained_head_st", "teacher"], head=head_st, masks=cp.masks, min_score=0.0,
                                    max_categories=1, images_per_category=cp.images_per_category)
            pool = loop.pool(objects, ["pretrained_objects"])
            loop.detector("copy_paste", [], ["pool"], pool=pool)
    if "self_training_expanded" in want:
        # The self_training row's stages, the novel images drawn from the language model's texts;
        # the base images (the teacher's) stay the template's, so the row differs in that alone.
        # One cache for the row's sets: the supervised- and self-trained-head sets draw the same
        # rows, so the language model writes their texts once.
        expand = dataclasses.replace(cfg.expansion, enabled=True, cache=loop.path("expansions"))
        novel_sup = loop.generate("pretrained_novel_sup_expanded", pretrained, "novel", "grounding_head",
                                  ["pretrained_head_sup"], head=head_sup, expand=expand)
        head_st = loop.grounding("pretrained_head_st_expanded", pretrained, base, novel_sup,
                                 ["pretrained_head_sup", "pretrained_novel_sup_expanded"], init_head=head_sup)
        novel_st = loop.generate("pretrained_novel_st_expanded", pretrained, "novel", "grounding_head",
                                 ["pretrained_head_st_expanded"], head=head_st, expand=expand)
        loop.detector("self_training_expanded", [base, novel_st], ["pretrained_novel_st_expanded"])
    for row in LAYOUT_ROWS:
        if row in want:
            name, layouts = loop.layouts(pretrained, row)
            loop.detector(row, [layouts], [name])
    samples = None
    if "fine_tuning" in want:
        # Replay (finetune.replay) draws on the pretraining captions: the base model's own data.
        tuned = loop.train_generator("finetune", cfg.finetune, pretrained, ["pretrain_unet"],
                                     annotations=ann, image_root=root, replay_captions=captions,
                                     replay_image_root=pre_images)
        base = loop.generate("finetuned_base", tuned, "base", "detector", ["finetune", "teacher"])
        novel_raw = loop.generate("finetuned_novel_raw", tuned, "novel", "none", ["finetune"])
        # Starts from the supervised head, as the pretrained generator's does: a few dozen fine-tuning
        # steps move the UNet's features little, and the self-training epochs train on the fine-tuned
        # generator's base images too. Training the head from scratch again took 415 s of the hour.
        head_st = loop.grounding("finetuned_head_st", tuned, base, novel_raw,
                                 ["pretrained_head_sup", "finetuned_base", "finetuned_novel_raw"], init_head=head_sup)
        novel_st = loop.generate("finetuned_novel_st", tuned, "novel", "grounding_head",
                                 ["finetuned_head_st"], head=head_st)
        loop.detector("fine_tuning", [base, novel_st], ["finetuned_novel_st"])
        samples = (base, novel_st)
    elif "self_training" in want:
        samples = (loop.path("synthetic", "pretrained_base"), loop.path("synthetic", "pretrained_novel_st"))
    if "synthetic_only" in want:
        loop.detector("synthetic_only", list(samples),
                      ["finetuned_novel_st" if "fine_tuning" in want else "pretrained_novel_st"], synthetic_only=True)
    if "synthetic_only_clip" in want:
        names = [os.path.basename(s) for s in samples]
        loop.detector("synthetic_only_clip", [loop.filtered(n) for n in names], [f"{n}_clip" for n in names],
                      synthetic_only=True)

    loop.chance()
    loop.samples = samples
    return loop


def run_loop(cfg: AblationConfig, log: Callable[[str], None] = lambda m: print(f"[toy-world] {m}", file=sys.stderr),
             rerun: Iterable[str] = (), keep: Iterable[str] = (), rerun_from: Optional[str] = None,
             only: Optional[str] = None) -> dict:
    """Every stage (engine.runtime.stages.run_plan: `rerun_from` and `only` as the recipe's --from
    and --only), then the table. Returns the results dict also written to WORKDIR/results.json."""
    cfg.validate()
    started = time.time()
    loop = plan_loop(cfg, log)
    done = loop.run(rerun_from=rerun_from, only=only, rerun=rerun, keep=keep)
    if only is not None:
        return {"name": cfg.name, "ran": only}
    rows = {row: seed_summary({seed: done[name] for seed, name in seeds.items()}) for row, seeds in loop.rows.items()}
    rows["random_boxes"] = done["random_boxes"]
    with open(loop.path("stages.json")) as f:
        record = json.load(f)
    results = {"name": cfg.name, "rows": rows, "order": [r for r in ROWS if r in rows] + ["random_boxes"],
               "teacher": done["teacher"], "stages_s": {k: v.get("seconds") for k, v in record.items()},
               "wall_s": round(time.time() - started, 1), "base": loop.base, "novel": loop.novel}
    # This invocation's time, and all stages' (earlier invocations included, when it resumed).
    results["stages_total_s"] = round(sum(v or 0 for v in results["stages_s"].values()), 1)
    # Whether the detectors ran the compiled attention kernels or the fallback: on this world the
    # two train to different tables (docs/benchmarks.md, "Deformable attention on pixel centres").
    results["attention_kernels"] = kernel_status()
    # And which float kernels the CPU ran: the same config repeats bit for bit on one machine, but
    # the UNet's pretraining differed by 1e-6 from step 0 on a VM of another CPU (fourteenth run).
    results["machine"] = {"processor": platform.processor() or platform.machine(),
                          "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if "clip" in done:
        results["clip"] = done["clip"]
    if "self_training_expanded" in rows:  # what the language model wrote, counted and drawn
        sets = [loop.path("synthetic", f"pretrained_{s}_expanded") for s in ("novel_sup", "novel_st")]
        results["expansion"] = expansion_summary(sets)
        results["expanded_png"] = draw_expanded(sets[1], loop.base, loop.path("expanded.png"))
    if "copy_paste" in rows:  # the pool's counts, the segmenter's true IoU, pasted images to look at
        results["pool"] = done["pool"]
        results["copy_paste_png"] = draw_pasted(loop, loop.path("copy_paste.png"))
    if loop.samples:
        results["samples_png"] = draw_samples(loop.samples, loop.base, loop.path("samples.png"))
    results["table"] = format_table(results)
    results["table_png"] = plot_table(results, loop.path("table.png"))
    write_file(loop.path("results.json"), json.dumps(results, indent=2).encode())
    return results


def segmenter_iou(world: WorldConfig, world_dir: str, masks: MaskConfig, images: int = 200) -> dict:
    """Mean IoU of the segmenter's masks with the exact ones: on the pretraining pictures holding
    one object (plain, the background prompt: as the cut-outs are made) and on the test split's
    boxes (cluttered scenes, box prompts)."""
    from PIL import Image
    seg = build_segmenter(masks.model, masks.seed)
    ious: dict[str, list[float]] = {"pretrain": [], "test": []}
    for split in ious:
        for i in range(min(images, getattr(world, f"{split}_images"))):
            _, objects = draw_scene(world, split, i)
            if split == "pretrain" and len(objects) != 1:
                continue
            with Image.open(os.path.join(world_dir, split, IMAGE_NAME.format(split=split, index=i))) as im:
                pixels = np.asarray(im.convert("RGB"))
            exact = object_masks(objects, world.size)
            if split == "pretrain":
                found = seg.segment_background(pixels)[0][None]
            else:
                found = seg.segment_boxes(pixels, [[x, y, x + w, y + h] for _, (x, y, w, h) in objects])[0]
            ious[split] += [float((f & e).sum() / max((f | e).sum(), 1)) for f, e in zip(found, exact)]
    return {split: {"mean_iou": round(float(np.mean(v)), 4) if v else None, "objects": len(v)}
            for split, v in ious.items()}


def random_box_baseline(test_annotations: str, base: list[str], novel: list[str], per_image: int,
                        sides: tuple[int, int], seed: int) -> dict:
    """AP50 of random boxes of the objects' sizes (sides uniform in `sides`, anywhere in the image,
    random category and score): what a detector that learnt only how large objects are scores."""
    with open(test_annotations) as f:
        gt = json.load(f)
    rng = random.Random(seed)
    ids = [c["id"] for c in gt["categories"]]
    dets = []
    for im in gt["images"]:
        for _ in range(per_image):
            w, h = rng.uniform(*sides), rng.uniform(*sides)
            x0, y0 = rng.uniform(0, im["width"] - w), rng.uniform(0, im["height"] - h)
            dets.append({"image_id": im["id"], "category_id": rng.choice(ids), "score": rng.random(),
                         "bbox": [x0, y0, w, h]})
    m = evaluate_coco(gt, dets, base=base, novel=novel)
    return {k: m.get(k) for k in METRICS}


def seed_summary(runs: dict[str, dict]) -> dict:
    """One row from its detectors' results by seed: mean and sample standard deviation of each
    metric (None where a seed has none, e.g. no novel category in the test split)."""
    row: dict[str, Any] = {"seeds": runs, "sd": {}}
    for k in METRICS:
        values = [r.get(k) for r in runs.values()]
        if any(v is None for v in values):
            row[k] = row["sd"][k] = None
            continue
        mean = sum(values) / len(values)
        row[k] = mean
        row["sd"][k] = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return row


def format_table(results: dict) -> str:
    """The markdown table; cells are mean ± sd over the detector seeds where a row has several."""
    def cell(m: dict, k: str) -> str:
        if m[k] is None:
            return "n/a"
        spread = f" ± {100 * m['sd'][k]:.1f}" if len(m.get("seeds", ())) > 1 else ""
        return f"{100 * m[k]:.1f}{spread}"
    seeds = max(len(m.get("seeds", ())) for m in results["rows"].values())
    title = "detector trained on" + (f" (mean ± sd, {seeds} seeds)" if seeds > 1 else "")
    lines = [f"| {title} | AP50 all | AP50 base | AP50 novel |", "|---|---|---|---|"]
    for row in results["order"]:
        m = results["rows"][row]
        lines.append(f"| {ROW_TITLES[row]} | " + " | ".join(cell(m, k) for k in METRICS) + " |")
    return "\n".join(lines)




def plot_table(results: dict, path: str) -> str:
    """The table as a picture: per row, a bar per metric at its mean over the detector seeds and a
    point per seed, so a gain that holds in every seed stands apart from one seed's luck."""
    import matplotlib
    matplotlib.use("Agg")  # no display on a cluster node; also keeps a user's backend choice out
    import matplotlib.pyplot as plt

    names = {"AP50": "AP50 all", "AP50_base": "AP50 base", "AP50_novel": "AP50 novel"}
    order = results["order"]
    fig, ax = plt.subplots(figsize=(1.9 * len(order) + 2, 4))
    width = 0.8 / len(METRICS)
    for j, k in enumerate(METRICS):
        xs = [i + (j - (len(METRICS) - 1) / 2) * width for i in range(len(order))]
        # No bar where a row has no mean (a seed without novel categories in its test split).
        means = [float("nan") if results["rows"][r][k] is None else 100 * results["rows"][r][k] for r in order]
        ax.bar(xs, means, width, label=names[k], color=f"C{j}", alpha=0.55)
        for x, r in zip(xs, order):
            seeds = [100 * m[k] for m in results["rows"][r].get("seeds", {}).values() if m.get(k) is not None]
            ax.scatter([x] * len(seeds), seeds, s=12, color=f"C{j}", edgecolors="black", linewidths=0.5, zorder=3)
    # Wrapped: the longer row titles ran into each other at this width.
    ax.set_xticks(range(len(order)), [textwrap.fill(ROW_TITLES[r], 18, break_on_hyphens=False) for r in order])
    ax.set_ylabel("AP50 x 100 on the test split")
    seeds = max(len(results["rows"][r].get("seeds", ())) for r in order)
    ax.set_title(f"{results['name']}: bars are the mean, points the {seeds} detector seed(s)")
    ax.legend(frameon=False)
    fig.tight_layout()
    data = io.BytesIO()
    fig.savefig(data, format="png", dpi=110)
    plt.close(fig)
    write_file(path, data.getvalue())
    return path


def coloured(boxes: list, labels: list[str], base: list[str]) -> list:
    """Boxes for a contact sheet: base categories green, novel orange (the paper's figures)."""
    return [(box, label, BASE_COLOUR if label in base else NOVEL_COLOUR) for box, label in zip(boxes, labels)]


def draw_samples(shard_paths: tuple[str, str], base: list[str], path: str, per_set: int = 16,
                 side: int = 192, columns: int = 8) -> str:
    """A PNG of generated images with their boxes: base-category boxes green, novel orange (the
    paper's figures), first `per_set` images of the base set, then of the novel set."""
    tiles = []
    for shards in shard_paths:
        for i, s in enumerate(x for x in iter_samples(shard_urls(shards)) if usable(x["json"])):
            if i == per_set:
                break
            rec = s["json"]
            tiles.append(Tile(s["jpg"], coloured(rec["boxes"], rec["labels"], base)))
    if not tiles:
        raise ValueError(f"no generated samples under {shard_paths}")
    write_file(path, contact_sheet(tiles, columns, side))
    return path


def expansion_summary(sets: list[str], examples: int = 8) -> dict:
    """Per set, how many rows the language model's text replaced (the rest kept the template), and
    the first texts it wrote."""
    out = {}
    for shards in sets:
        counts, texts = {"expanded": 0, "fell_back": 0}, []
        for s in iter_samples(shard_urls(shards), decode=False):
            rec = json.loads(s["json"])
            counts[rec["expansion"]["status"]] += 1
            if rec["expansion"]["status"] == "expanded" and len(texts) < examples:
                texts.append(rec["prompt"])
        out[os.path.basename(shards)] = {**counts, "examples": texts}
    return out


def draw_expanded(shards: str, base: list[str], path: str, images: int = 16, side: int = 192,
                  columns: int = 4) -> str:
    """A PNG of the first images drawn from the language model's texts, each with its boxes and,
    under it, the text it was drawn from."""
    tiles = []
    for s in iter_samples(shard_urls(shards)):
        rec = s["json"]
        if rec["expansion"]["status"] != "expanded":
            continue
        tiles.append(Tile(s["jpg"], coloured(rec["boxes"], rec["labels"], base), textwrap.wrap(rec["prompt"], 30)[:3]))
        if len(tiles) == images:
            break
    if not tiles:
        raise ValueError(f"no sample of {shards} was drawn from an expanded prompt")
    write_file(path, contact_sheet(tiles, columns, side))
    return path


def draw_pasted(loop: Loop, path: str, images: int = 16, side: int = 192, columns: int = 8) -> str:
    """A PNG of the first real training images as the copy_paste row's detector sees them (the
    training pipeline's own CopyPaste, seeded by image), boxes green for base, orange for novel."""
    from PIL import Image
    cfg = dataclasses.replace(loop.cfg.copy_paste.paste, pool=loop.path("pool"))
    paster = CopyPaste(cfg, load_pool_index(cfg, loop.base + loop.novel))
    ann, root = loop.split("train")
    with open(ann) as f:
        coco = json.load(f)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    tiles = []
    for im in coco["images"][:images]:
        objects = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in objects)]
        with Image.open(os.path.join(root, im["file_name"])) as f:
            pixels = np.asarray(f.convert("RGB"))
        out, boxes, labels, _ = paster(pixels, boxes, [names[a["category_id"]] for a in objects], seed=im["id"])
        tiles.append(Tile(Image.fromarray(out), coloured(boxes, labels, loop.base)))
    write_file(path, contact_sheet(tiles, columns, side))
    return path


def load_ablation_config(path: Optional[str], overrides: Optional[list[str]] = None) -> AblationConfig:
    return load_config(path, overrides, cls=AblationConfig)
