"""The InstaGen recipe on a real dataset, as one resumable command (`instagen recipe`).

    real        the real training set as the detectors see it: base categories' boxes only, and for
                the data-sparse setting a seeded fraction of the images (recorded in the file)
    finetune    Stable Diffusion fine-tuned on crops of the real base images (paper 3.2)
    teacher     a detector trained on the real base set: labels the base categories
    base        base-category images, labelled by the teacher (score >= alpha)
    novel_raw   novel-category images without boxes, for self-training
    head_sup    the grounding head trained on the base images until the transfer epoch
    head_st     the head self-trained on the novel images (EMA teacher, score >= beta)
    final       the final synthetic set: every category, base boxes by the teacher, novel by the head
    detector    a detector trained on the real base set + the final synthetic set
    synthetic_only  (recipe.synthetic_only) a detector trained on the final synthetic set alone, no
                real image: ImaginaryNet's setting (seed 004), with the engine's boxes
    evaluate    each detector scored on detector.eval_annotations (COCO: AP50 base / novel; LVIS: AP,
                AP50, APr / APc / APf) and on each recipe.evaluate dataset; WORKDIR/results.json

Each stage calls the function its own command calls (finetune, train-detector, generate,
train-grounding, evaluate), with its paths under WORKDIR (recipe.workdir), and is recorded with the fingerprint of
its inputs in WORKDIR/stages.json (engine.runtime.stages): a rerun skips finished stages, resumes
an interrupted one through its trainer checkpoints or finished shards, and redoes a stage whose
inputs changed together with every stage after it. A stage the user already has is skipped by
pointing at it in the config's `recipe` section: `have.generator` (a fine-tuned SD folder),
`have.teacher` (a detector folder), `have.synthetic` (finished outputs of `instagen generate`: no generation, no grounding head).

Everything a user can get wrong is checked before the first stage runs (and by --dry-run, which
prints the stages, their image counts per category group and their GPU-hours, and writes nothing).
On a cluster WORKDIR must be a folder every node sees at the same path (a shared filesystem):
trainers write checkpoints and models there, generation actors shards.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from typing import Callable, Iterable, Optional

from engine.config import (
    Config,
    ConfigError,
    CopyPasteConfig,
    DetectorConfig,
    GroundingTrainConfig,
    ModelConfig,
    OutputConfig,
    PromptConfig,
    TrainRunConfig,
    to_dict,
)
from engine.config.sections import check_output_path
from engine.data.categories import plan_categories
from engine.data.datasets import DatasetError, check_dataset
from engine.data.shards import finished_shards
from engine.evaluation.detector import check_evaluation_inputs, evaluate_detector
from engine.generation.generators import single_model
from engine.generation.pipeline import generate
from engine.generation.prompts import PromptPlan
from engine.models.diffusion import check_source
from engine.runtime.stages import Stage, Stages, run_plan
from engine.runtime.storage import parse_once, read_json, write_file
from engine.training.detection import train_detector
from engine.training.finetune import finetune
from engine.training.grounding import train_grounding

STAGES = ("real", "finetune", "teacher", "base", "novel_raw", "head_sup", "head_st", "final", "detector",
          "synthetic_only", "evaluate")
GENERATION_STAGES = {"base": "base", "novel_raw": "novel", "final": "all"}  # stage -> prompts.generate
# What results.json keeps of each evaluation: COCO-OVD's base / novel AP50, LVIS's frequency groups.
COCO_METRICS = ("AP", "AP50", "AP50_base", "AP50_novel")
LVIS_METRICS = ("AP", "AP50", "APr", "APc", "APf")


class Recipe:
    """The stages of the module docstring, with their paths under recipe.workdir; base / novel
    categories come from `prompts` (typed, or read from the dataset with prompts.categories_from)
    and are handed to every stage. Building one checks every input (nothing is written); `run`
    runs the stages."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = lambda m: print(f"[recipe] {m}", file=sys.stderr)):
        self.cfg, self.log = cfg, log
        # The checks and the plans read the same annotation files several times (LVIS train, ~1 GB,
        # is the category file, the real set and the dataset checked): each is parsed once here.
        with parse_once():
            self._prepare()

    def _prepare(self) -> None:
        cfg = self.cfg
        cfg.recipe.validate()
        single_model(cfg, "instagen recipe (which fine-tunes the generator it draws with)")
        if cfg.grounding.transfer_epoch >= cfg.grounding.epochs:
            raise ConfigError(f"grounding.transfer_epoch ({cfg.grounding.transfer_epoch}) must be below "
                              f"grounding.epochs ({cfg.grounding.epochs}): self-training needs epochs after it")
        if cfg.finetune.train != "unet" or cfg.finetune.captions:
            raise ConfigError("the recipe fine-tunes the UNet on crops of the real base images: leave "
                              "finetune.train and finetune.captions out")
        check_output_path("recipe.workdir", cfg.recipe.workdir)
        self.ws = os.path.abspath(os.path.expanduser(cfg.recipe.workdir))
        everything = PromptPlan(dataclasses.replace(cfg.prompts, generate="all"))
        self.base, self.novel = everything.base, everything.novel
        if not self.base:
            raise ConfigError("the recipe needs base categories (the teacher labels them) and prompts give none; set "
                              "prompts.base, or a prompts.split that makes some")
        # Without novel categories (the data-sparse setting) the teacher labels everything: no base
        # or novel_raw images, no grounding head.
        self.plans = {"final": everything} | ({stage: PromptPlan(self.generation_config(stage, "").prompts)
                                               for stage in ("base", "novel_raw")} if self.novel else {})
        planned = plan_categories(cfg.prompts) if cfg.prompts.categories_from else []
        self.frequency = {c.name: c.frequency for c in planned}
        # Each base category's name in recipe.real (prompts.split=base_list can say "television_set =
        # tv"); the real set is written with the categories' own names, so that every stage speaks one
        # vocabulary.
        self.real_name = {c.name: c.real_name or c.name for c in planned if c.split == "base"}
        self.check()

    # -- paths and the stages' configs --------------------------------------------------------

    def path(self, *parts: str) -> str:
        return os.path.join(self.ws, *parts)

    @property
    def generator(self) -> str:
        return self.cfg.recipe.have.generator or self.path("models", "finetune")

    @property
    def teacher_model(self) -> str:
        return self.cfg.recipe.have.teacher or self.path("models", "teacher")

    @property
    def synthetic(self) -> list[str]:
        return list(self.cfg.recipe.have.synthetic) or [self.path("synthetic", "final")]

    def run_settings(self, run: TrainRunConfig, name: str) -> TrainRunConfig:
        """A stage's Ray Train run: its checkpoints under WORKDIR/ray/<stage name>."""
        return dataclasses.replace(run, storage_path=self.path("ray"), name=name)

    def real_files(self) -> tuple[str, str]:
        return self.path("real", "instances.json"), self.cfg.recipe.real.image_root

    def generation_config(self, stage: str, head: str) -> Config:
        c = self.cfg
        labeller = {"base": "detector", "novel_raw": "none",
                    "final": "teacher+head" if self.novel else "detector"}[stage]
        cfg = Config(name=f"{c.name}-{stage}", model=dataclasses.replace(c.model, source=self.generator),
                     prompts=dataclasses.replace(c.prompts, generate=GENERATION_STAGES[stage]),
                     synthesis=c.synthesis,
                     annotation=dataclasses.replace(c.annotation, labeller=labeller, model=self.teacher_model,
                                                    head=head),
                     # The CLIP filter in every generation stage (the head trains only on what it
                     # keeps); masks for the final set only, the one an instance pool is built from.
                     filter=c.filter, masks=c.masks if stage == "final" else dataclasses.replace(c.masks, enabled=False),
                     output=OutputConfig(path=self.path("synthetic", stage), shard_size=c.output.shard_size), ray=c.ray)
        cfg.validate()
        return cfg

    def finetune_config(self) -> Config:
        ann, root = self.real_files()
        fc = dataclasses.replace(self.cfg.finetune, annotations=ann, image_root=root, format=self.cfg.recipe.real.format,
                                 base=self.base, output_dir=self.path("models", "finetune"),
                                 run=self.run_settings(self.cfg.finetune.run, "finetune"))
        return Config(name=f"{self.cfg.name}-finetune", model=self.cfg.model,
                      prompts=PromptConfig(base=self.base, novel=self.novel), finetune=fc, ray=self.cfg.ray)

    def detector_config(self, name: str, section: DetectorConfig, synthetic: list[str]) -> DetectorConfig:
        """Trained on the real base set (+ `synthetic`); `teacher` on base categories only;
        `synthetic_only` on `synthetic` alone."""
        ann, root = self.real_files()
        teacher = name == "teacher"
        coco_eval = section.eval_format == "coco"
        mix = 1.0 if name == "synthetic_only" else section.mix_ratio if synthetic else 0.0
        dc = dataclasses.replace(
            section, real_annotations=ann, real_image_root=root, real_format=self.cfg.recipe.real.format,
            synthetic=synthetic, mix_ratio=mix, copy_paste=section.copy_paste if mix < 1 else CopyPasteConfig(),
            categories=self.base if teacher else (section.categories or self.base + self.novel),
            # COCO-OVD's AP50 base / novel; without novel categories, plain COCO AP.
            base=self.base if coco_eval and self.novel else [],
            novel=self.novel if coco_eval and self.novel and not teacher else [],
            run=self.run_settings(section.run, name), output_dir=self.path("models", name),
            eval_dir=self.path("eval", name))
        dc.validate()
        return dc

    def grounding_config(self, name: str, novel_shards: str, init_head: str) -> GroundingTrainConfig:
        """Without novel shards: the supervised head, until the transfer epoch. With them: the
        self-training epochs, from `init_head`."""
        g, a = self.cfg.grounding, self.cfg.annotation  # the head's pseudo-labels obey the labellers' rules
        gc = dataclasses.replace(
            g, base_shards=self.path("synthetic", "base"), novel_shards=novel_shards, base=self.base,
            novel=self.novel if novel_shards else [], synthesis_steps=self.cfg.synthesis.steps,
            alpha=a.alpha, beta=a.beta, nms_iou=a.nms_iou, max_per_category=a.max_per_category,
            output=self.path("models", name), init_head=init_head,
            epochs=g.epochs if novel_shards else g.transfer_epoch, run=self.run_settings(g.run, name))
        return gc

    def detectors(self) -> dict[str, DetectorConfig]:
        """The detectors the recipe trains and evaluates: real + synthetic, and synthetic only."""
        out = {"detector": self.detector_config("detector", self.cfg.detector, self.synthetic)}
        if self.cfg.recipe.synthetic_only:
            out["synthetic_only"] = self.detector_config("synthetic_only", self.cfg.detector, self.synthetic)
        return out

    def eval_sets(self) -> dict[str, DetectorConfig]:
        """Each detector's evaluation config per dataset: its own eval set, then each `evaluate`
        one: `detector` (its own) and `<dataset>` for the real + synthetic detector (results.json's
        keys since the first recipe), `synthetic_only/detector` and `synthetic_only/<dataset>`."""
        sets = {}
        for trained, dc in self.detectors().items():
            prefix = "" if trained == "detector" else f"{trained}/"
            if dc.eval_annotations:
                sets[prefix + "detector"] = dc
            for e in self.cfg.recipe.evaluate:
                sets[prefix + e.name] = dataclasses.replace(
                    dc, eval_annotations=e.annotations, eval_image_root=e.image_root, eval_format=e.format,
                    base=[], novel=[], eval_dir=self.path("eval", prefix + e.name))
        return sets

    # -- the checks (--dry-run, and before a run) ----------------------------------------------

    def check(self) -> None:
        c = self.cfg
        if not c.recipe.real.annotations:
            raise ConfigError("recipe.real.annotations is empty; set it to the real training set's COCO/LVIS JSON")
        check_dataset(c.recipe.real.annotations, c.recipe.real.image_root,
                      ("recipe.real.annotations", "recipe.real.image_root"))
        names = {cat.get("name") for cat in self._real_json()["categories"] if isinstance(cat, dict)}
        missing = [b for b in self.base if self.real_name.get(b, b) not in names]
        if missing:
            b = missing[0]
            said = f" (as {self.real_name[b]!r}, prompts.base_list)" if self.real_name.get(b, b) != b else ""
            raise ConfigError(f"base category {b!r}{said} is not in recipe.real.annotations ({c.recipe.real.annotations}); the "
                              f"teacher and detector learn base categories from it: fix the name or the file")
        if c.recipe.have.generator:
            check_source(ModelConfig(source=c.recipe.have.generator))
        else:
            check_source(c.model)
            self.finetune_config().finetune.run.validate("finetune")
        if c.recipe.have.teacher and c.recipe.have.teacher != "tiny" and not os.path.isdir(c.recipe.have.teacher):
            raise ConfigError(f"recipe.have.teacher {c.recipe.have.teacher!r} is not a folder; point it at a trained detector "
                              f"(train-detector's output_dir), or leave it empty to train the teacher")
        if not c.recipe.have.teacher:
            self.detector_config("teacher", c.recipe.teacher, [])
        for i, path in enumerate(c.recipe.have.synthetic):
            finished_shards(path, f"recipe.have.synthetic[{i}]")
        if not c.recipe.have.synthetic and self.novel:
            self.grounding_config("head_sup", "", "").validate()
            self.grounding_config("head_st", self.path("synthetic", "novel_raw"), self.path("models", "head_sup")).validate()
        sets = self.eval_sets()
        if not sets:
            raise ConfigError("nothing to evaluate on: set detector.eval_annotations and detector.eval_image_root, "
                              "or list datasets in recipe.evaluate")
        for ec in sets.values():
            check_evaluation_inputs(ec)

    def _real_json(self) -> dict:
        data = read_json(self.cfg.recipe.real.annotations, "recipe.real.annotations", DatasetError,
                         "set it to a COCO/LVIS instances JSON")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data, dict) or not isinstance(data.get(key), list):
                raise DatasetError(f"recipe.real.annotations {self.cfg.recipe.real.annotations!r} has no {key!r} list; it must be a "
                                   f"COCO/LVIS instances JSON")
        return data

    # -- the plan (--dry-run) --------------------------------------------------------------------

    def skipped(self, stage: str) -> str:
        h = self.cfg.recipe.have
        if stage == "finetune" and h.generator:
            return f"recipe.have.generator {h.generator}"
        if stage == "teacher" and h.teacher:
            return f"recipe.have.teacher {h.teacher}"
        if stage in ("base", "novel_raw", "head_sup", "head_st", "final") and h.synthetic:
            return "recipe.have.synthetic " + ", ".join(h.synthetic)
        if stage in ("base", "novel_raw", "head_sup", "head_st") and not self.novel:
            return "no novel categories: the teacher labels the final set"
        if stage == "synthetic_only" and not self.cfg.recipe.synthetic_only:
            return "recipe.synthetic_only is off"
        return ""

    def plan(self, **flags) -> list[dict]:
        """Each stage: what a run with `flags` (run_plan's) would do with it (WORKDIR/stages.json),
        and for generation stages the images per category group and the GPU-hours at
        cfg.images_per_s (docs/scale.md: N / (r * u) / 3600)."""
        out = []
        stages = self.stages()
        status = run_plan(stages, self.ws, self.log, dry=True, **flags)
        for stage in stages:
            row: dict = {"stage": stage.name, "skipped": stage.skipped, "status": status[stage.name]}
            if stage.name in GENERATION_STAGES and not row["skipped"]:
                p = self.plans[stage.name]
                groups: dict[str, int] = {}
                for cat, n in zip(p.categories, p.counts):
                    split = "base" if cat in p.base else "novel"
                    key = f"{split}/{self.frequency[cat]}" if self.frequency.get(cat) else split
                    groups[key] = groups.get(key, 0) + n
                row |= {"images": len(p), "categories": len(p.categories), "groups": dict(sorted(groups.items())),
                        "gpu_hours": len(p) / (self.cfg.recipe.images_per_s * self.cfg.recipe.utilisation) / 3600,
                        "also": self.generation_extras(stage.name)}
            out.append(row)
        return out

    def generation_extras(self, stage: str) -> list[str]:
        """What a generation stage does besides drawing and labelling, as its config says."""
        g = self.generation_config(stage, "")
        return ([f"prompts expanded by {g.prompts.expand.model}"] if g.prompts.expand.enabled else []) + \
            ([f"CLIP filter {g.filter.model}"] if g.filter.enabled else []) + \
            ([f"masks by {g.masks.model}"] if g.masks.enabled else [])

    def plan_lines(self, **flags) -> list[str]:
        lines, total = [], 0.0
        for row in self.plan(**flags):
            if row["skipped"]:
                lines.append(f"  {row['stage']:<10} skipped: {row['skipped']}")
                continue
            if "images" in row:
                done = row["status"] == "done earlier"
                total += 0 if done else row["gpu_hours"]
                groups = ", ".join(f"{k} {v}" for k, v in row["groups"].items())
                lines.append(f"  {row['stage']:<10} {row['images']} images of {row['categories']} categories "
                             f"({groups}); {row['gpu_hours']:.1f} GPU-hours"
                             + "".join(f"; {step}" for step in row["also"]) + ("; done earlier" if done else ""))
            else:
                lines.append(f"  {row['stage']:<10} {row['status']}")
        lines.append(f"  generation: {total:.1f} GPU-hours to run at {self.cfg.recipe.images_per_s} images/s per GPU and "
                     f"{self.cfg.recipe.utilisation:.0%} utilisation (docs/scale.md)")
        return lines

    # -- the stages ----------------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        """The recipe as declared stages, in STAGES' order; those the config skips say why."""
        c = self.cfg
        renamed = {b: r for b, r in self.real_name.items() if r != b}  # only then: older runs keep their keys
        plan = [Stage("real", {"real": to_dict(c.recipe.real), "base": self.base}
                      | ({"real_name": renamed} if renamed else {}), self.write_real, [self.path("real")])]
        if not self.skipped("finetune"):
            fcfg = self.finetune_config()

            def tune() -> dict:
                s = finetune(fcfg)
                return {"steps": s.steps, "final_loss": s.metrics.get("loss")}
            plan.append(Stage("finetune", {"finetune": to_dict(fcfg.finetune), "model": to_dict(fcfg.model)}, tune,
                              [fcfg.finetune.output_dir, self.path("ray", "finetune")], ["real"]))
        if not self.skipped("teacher"):
            plan.append(self._detector_stage("teacher", self.detector_config("teacher", c.recipe.teacher, []),
                                             ["real"]))
        if not self.skipped("base"):
            plan += [self._generate_stage("base", "", ["finetune", "teacher"]),
                     self._generate_stage("novel_raw", "", ["finetune"]),
                     self._grounding_stage("head_sup", "", "", ["base"]),
                     self._grounding_stage("head_st", self.path("synthetic", "novel_raw"),
                                           self.path("models", "head_sup"), ["head_sup", "novel_raw"])]
        if not self.skipped("final"):
            head = self.path("models", "head_st") if self.novel else ""
            plan.append(self._generate_stage("final", head, ["finetune", "head_st", "teacher"]))
        synthetic_keys = {"have_synthetic": list(c.recipe.have.synthetic)}
        for name, dc in self.detectors().items():
            plan.append(self._detector_stage(name, dc, ["real", "final"], synthetic_keys))
        sets = self.eval_sets()
        plan.append(Stage("evaluate", {k: to_dict(v) for k, v in sets.items()}, lambda: self.evaluate(sets),
                          [self.path("eval")], list(self.detectors())))
        declared = {s.name: s for s in plan}
        return [declared.get(n) or Stage(n, skipped=self.skipped(n)) for n in STAGES]

    def run(self, rerun_from: Optional[str] = None, only: Optional[str] = None, rerun: Iterable[str] = (),
            keep: Iterable[str] = ()) -> dict:
        """The stages (engine.runtime.stages.run_plan), then WORKDIR/results.json and the table."""
        started = time.time()
        results = run_plan(self.stages(), self.ws, self.log, rerun_from=rerun_from, only=only, rerun=rerun, keep=keep)
        if only is not None and only != "evaluate":
            return {"name": self.cfg.name, "ran": only}
        record = Stages(self.ws, lambda m: None).record
        out = {"name": self.cfg.name, "results": results["evaluate"], "base": self.base, "novel": self.novel,
               "real": results["real"], "stages_s": {k: v.get("seconds") for k, v in record.items()},
               "wall_s": round(time.time() - started, 1)}
        out["table"] = format_results(results["evaluate"])
        write_file(self.path("results.json"), json.dumps(out, indent=2).encode())
        return out

    def write_real(self) -> dict:
        """WORKDIR/real/instances.json: the real set with only base boxes, of the chosen images."""
        data, r = self._real_json(), self.cfg.recipe.real
        images = sorted(data["images"], key=lambda im: im.get("id"))
        keep = len(images) if r.fraction >= 1 else max(1, round(r.fraction * len(images)))
        chosen = images if keep == len(images) else sorted(random.Random(r.seed).sample(images, keep),
                                                            key=lambda im: im.get("id"))
        ids = {im.get("id") for im in chosen}
        categories, relabel = self._real_categories(data["categories"])
        anns, next_id = [], 1 + max((a.get("id") for a in data["annotations"] if isinstance(a.get("id"), int)), default=0)
        seen = dropped = 0
        for a in data["annotations"]:
            if a.get("image_id") not in ids:
                continue
            seen += 1
            dropped += a.get("category_id") not in relabel
            # A real box of a category several base categories are named after (COCO "tv": Objects365
            # "Monitor/TV" and LVIS "television_set") is a box of each: one copy per name.
            for k, cid in enumerate(relabel.get(a.get("category_id"), [])):
                anns.append({**a, "category_id": cid} if k == 0 else {**a, "category_id": cid, "id": next_id})
                next_id += k > 0
        subset = {**data, "images": chosen, "annotations": anns, "categories": categories,
                  "instagen_subset": {"source": r.annotations, "fraction": r.fraction, "seed": r.seed,
                                      "image_ids": sorted(ids)}}
        write_file(self.real_files()[0], json.dumps(subset).encode())
        return {"images": len(chosen), "of_images": len(images), "boxes": len(anns),
                "boxes_dropped_not_base": dropped, "real_boxes_kept": seen - dropped,
                "fraction": r.fraction, "seed": r.seed, "file": self.real_files()[0]}

    def _real_categories(self, real: list[dict]) -> tuple[list[dict], dict[int, list[int]]]:
        """The real set's categories as the recipe writes them, and each real category id -> the
        ids of the base categories its boxes become. A base category named as in the real set keeps
        its entry and id; one the real set names otherwise (prompts.base_list) gets a copy of the
        real entry under its own name and a new id."""
        by_name = {c.get("name"): c for c in real if isinstance(c, dict)}
        out, relabel = list(real), {}
        next_id = 1 + max((c["id"] for c in real if isinstance(c.get("id"), int)), default=0)
        for b in self.base:
            source = by_name[self.real_name.get(b, b)]
            if b in by_name:
                cid = by_name[b]["id"]
            else:
                cid, next_id = next_id, next_id + 1
                out.append({**source, "id": cid, "name": b, "instagen_real_name": source["name"]})
            relabel.setdefault(source["id"], []).append(cid)
        return out, relabel

    def _generate_stage(self, name: str, head: str, after: list[str]):
        cfg = self.generation_config(name, head)

        def run() -> dict:
            s = generate(cfg)
            return {"images": s.images, "boxes": s.boxes, "dropped": s.dropped, "shards_written": s.shards_written,
                    "images_per_s": s.images_per_s}
        return Stage(name, {"config": to_dict(cfg)}, run, [cfg.output.path], after)

    def _grounding_stage(self, name: str, novel_shards: str, init_head: str, after: list[str]):
        gc = self.grounding_config(name, novel_shards, init_head)
        model = dataclasses.replace(self.cfg.model, source=self.generator)

        def run() -> dict:
            s = train_grounding(gc, model, self.cfg.ray)
            return {"steps": s.steps, "loss": s.metrics.get("loss")}
        return Stage(name, {"grounding": to_dict(gc), "model": to_dict(model)}, run,
                     [gc.output, self.path("ray", name)], after)

    def _detector_stage(self, name: str, dc: DetectorConfig, after: list[str], inputs: Optional[dict] = None):
        def run() -> dict:
            return {"steps": train_detector(dc, self.cfg.ray).steps}
        return Stage(name, {"detector": to_dict(dc), **(inputs or {})}, run, [dc.output_dir, self.path("ray", name)],
                     after)

    def evaluate(self, sets: dict[str, DetectorConfig]) -> dict:
        results = {}
        for name, ec in sets.items():
            m = evaluate_detector(ec)
            keys = LVIS_METRICS if ec.eval_format == "lvis" else COCO_METRICS
            results[name] = {"format": ec.eval_format, **{k: m.get(k) for k in keys},
                             "report": os.path.join(ec.eval_dir, "report.md")}
        return results


def format_results(results: dict) -> str:
    """One markdown table per metric family: COCO-style sets, then LVIS-style ones."""
    lines = []
    for fmt, keys in (("coco", COCO_METRICS), ("lvis", LVIS_METRICS)):
        rows = [(n, m) for n, m in results.items() if m["format"] == fmt]
        if not rows:
            continue
        lines += [f"| trained on | evaluated on | {' | '.join(keys)} |", "|---" * (len(keys) + 2) + "|"]
        for n, m in rows:
            trained, _, dataset = n.rpartition("/")  # eval_sets' keys
            lines.append(f"| {'synthetic only' if trained else 'real + synthetic'} | {dataset} | "
                         + " | ".join("n/a" if m[k] is None else f"{100 * m[k]:.1f}" for k in keys) + " |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")
