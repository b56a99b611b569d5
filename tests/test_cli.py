"""Every sub-command, given a bad input, says what is wrong in one line and exits 2, with no
traceback and nothing written."""
import json
import os

import pytest

from engine.cli import main
from engine.data.shards import ShardStore
from engine.errors import UserError
from fixtures_coco import make_coco_dataset

BAD = {
    "generate": ["--config", "configs/tiny.yaml", "synthesis.stepz=3"],
    "export": ["--output", "/no/such/run"],
    "pool": ["--from", "/no/such/run", "--output", "OUT"],
    "finetune": ["--config", "configs/tiny.yaml", "--dry-run", "finetune.annotations=/no/such/instances.json"],
    "train-grounding": ["grounding.base_shards=/no/such/run", "grounding.base=[cat]"],
    "train-detector": ["--config", "configs/tiny.yaml", "detector.kind=yolo"],
    "evaluate": ["--gt", "/no/such/gt.json", "--detections", "/no/such/dets.json", "--out", "OUT"],
    "toy-world": ["--config", "configs/toy_world.yaml", "world.image_size=-1"],
    "recipe": ["--config", "configs/coco_ovd.yaml", "--dry-run", "recipe.workdir=OUT",
               "recipe.real.annotations=/no/such/train.json"],
}
WORDS = {"generate": "synthesis.stepz", "export": "/no/such/run", "pool": "/no/such/run", "finetune": "/no/such/instances.json",
         "train-grounding": "/no/such/run", "train-detector": "yolo", "evaluate": "/no/such/gt.json",
         "toy-world": "image_size", "recipe": "/no/such/train.json"}


def test_every_sub_command_is_covered():
    from engine.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(BAD)


@pytest.mark.parametrize("command", sorted(BAD))
def test_bad_input_is_one_line_and_exit_2(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in BAD[command]]
    assert main([command, *argv]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and WORDS[command] in lines[0], captured.err
    assert "Traceback" not in captured.err and not (tmp_path / "out").exists()


def test_every_user_error_class_derives_from_user_error():
    import engine.cli  # noqa: F401  imports every stage, so every error class is defined
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)
    names = {c.__name__ for c in subclasses(UserError)}
    assert {"ConfigError", "ShardError", "DatasetError", "DetectionDataError", "DetectorError", "EvaluationError",
            "ModelLoadError", "ResourceError", "AnnotationError", "TrainingConfigError", "GroundingConfigError",
            "GroundingTrainError", "OpenVocabError"} <= names


# The corpus of bad input, by class (docs/reliability.md counts them): each case is a sub-command,
# its arguments (OUT = a path under the test's folder, FILE = the file the case writes there: a
# (name, content) pair, or a function that makes it in OUT and returns its path), and the words
# the one-line message must hold.
def _coco(out, drop_image: bool = False) -> str:
    """A real COCO file (OUT/instances.json, category "dog") and its images (OUT/images)."""
    ann, root = make_coco_dataset(out, n_images=2, categories=["dog"])
    if drop_image:
        os.remove(os.path.join(root, "000001.jpg"))
    return ann


def _output(folder, damage: str = "") -> str:
    """A generation output of two whole shards, as generate writes them; then `damage`: shard 1
    cut short ("cut"), its manifest entry not JSON ("entry"), or no shard left ("none")."""
    store = ShardStore(str(folder))
    claim = store.prepare({"fingerprint": "corpus", "categories": ["cat"]})
    record = json.dumps({"boxes": [], "labels": [], "categories": ["cat"]})
    for i in range(2):
        store.write_shard(i, [{"__key__": f"{i:09d}", "json": record}], [], claim)
    tar, entry = folder / "shards" / "shard-000001.tar", folder / "manifest" / "shard-000001.json"
    if damage == "cut":
        tar.write_bytes(tar.read_bytes()[:512])
    elif damage == "entry":
        entry.write_text("{not json")
    elif damage == "none":
        for i in range(2):
            (folder / "manifest" / f"shard-00000{i}.json").unlink()
    return str(folder)


def _whole_base_damaged_novel(out) -> str:
    """OUT/base whole, OUT/novel with a shard cut short; returns the novel one."""
    _output(out / "base")
    return _output(out / "novel", "cut")


def _evaluation(out) -> str:
    """Ground truth of one box (OUT/gt.json) and no detections (OUT/dets.json): a valid evaluation."""
    (out / "dets.json").write_text("[]")
    gt = out / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": 1, "width": 8, "height": 8}], "categories": [{"id": 1, "name": "dog"}],
                              "annotations": [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]}]}))
    return str(gt)


def _alias_bomb() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    return "\n".join(lines + [f"a{i}: &a{i} [{', '.join(['*a' + str(i - 1)] * 10)}]" for i in range(1, 9)])


GEN = ["generate", "--dry-run", "--config", "configs/tiny.yaml", "output.path=OUT"]
# Each trainer writes under OUT if it gets past its checks.
DET = ["train-detector", "--config", "configs/tiny.yaml", "--skip-eval", "detector.run.storage_path=OUT/runs",
       "detector.output_dir=OUT/detector"]
SYN = DET + ["detector.mix_ratio=1", "detector.categories=[cat]", "detector.batch_size=1"]
EVAL = ["train-detector", "--config", "configs/tiny.yaml", "detector.run.storage_path=OUT/runs",
        "detector.output_dir=OUT/detector", "detector.mix_ratio=1", "detector.categories=[cat]",
        "detector.synthetic=[OUT/none]", "detector.eval_annotations=FILE"]
FT = ["finetune", "--config", "configs/tiny.yaml", "finetune.base=[dog]", "finetune.crop_size=64",
      "finetune.run.storage_path=OUT/runs", "finetune.output_dir=OUT/pipe"]
GRD = ["train-grounding", "grounding.base=[cat]", "grounding.run.storage_path=OUT/runs", "grounding.output=OUT/head"]
EMPTY_GT = '{"images": [], "annotations": [], "categories": []}'

CORPUS = {
    # config values
    "nan float": (GEN + ["synthesis.guidance=.nan"], None, "synthesis.guidance"),
    "infinite float": (GEN + ["annotation.beta=-.inf"], None, "annotation.beta"),
    "zero batch": (GEN + ["annotation.batch_size=0"], None, "annotation.batch_size"),
    "huge format spec": (GEN + ["prompts.template=a photo of {c1:>99999999999}"], None, "format spec"),
    "unknown placeholder": (GEN + ["prompts.template=a {c3}"], None, "prompts.template"),
    "NUL in a name": (GEN + ['prompts.base=["cat\\u0000", dog]'], None, "control character"),
    "escape in a name": (GEN + ['prompts.base=["cat\\u001b[31m", dog]'], None, "control character"),
    "blank name": (GEN + ['prompts.base=[" ", dog]'], None, "prompts.base"),
    "unknown scheduler": (GEN + ["model.scheduler=foo"], None, "model.scheduler"),
    # several generators (models:)
    "shares not summing to one": (GEN + ["models=[{source: tiny, share: 0.5}, {source: tiny, share: 0.4}]"], None,
                                  "sum to 0.9, not 1"),
    "a zero share": (GEN + ["models=[{source: tiny, share: 0}, {source: tiny, share: 1}]"], None,
                     "models[0].share must be > 0"),
    "no generators": (GEN + ["models=[]"], None, "models is an empty list"),
    "model and models": (GEN + ["model.scheduler=euler", "models=[{source: tiny, share: 1}]"], None,
                         "model and models are both given"),
    "a generator's source missing": (GEN + ["models=[{source: tiny, share: 0.5}, {source: OUT/sd, share: 0.5}]"],
                                     None, "models[1].source"),
    "recipe given several generators": (["recipe", "--dry-run", "--config", "configs/tiny.yaml", "recipe.workdir=OUT",
                                         "models=[{source: tiny, share: 0.5}, {source: tiny, share: 0.5}]"], None,
                                        "recipe (which fine-tunes the generator it draws with) uses one generator"),
    "wrong type": (GEN + ["synthesis.steps=many"], None, "synthesis.steps"),
    "unknown key": (GEN + ["synthesis.stepz=3"], None, "synthesis.stepz"),
    # output paths
    "root output": (["generate", "--dry-run", "--config", "configs/tiny.yaml", "output.path=/"], None, "root"),
    "home output": (["generate", "--dry-run", "--config", "configs/tiny.yaml", "output.path=~/"], None, "home"),
    "unknown protocol": (["generate", "--dry-run", "--config", "configs/tiny.yaml", "output.path=foo://b/r"], None,
                         "protocol 'foo'"),
    "export to unknown protocol": (["export", "--output", "bar://b/r"], None, "protocol 'bar'"),
    "output in one process's memory": (["generate", "--dry-run", "--config", "configs/tiny.yaml",
                                        "output.path=memory://b/r"], None, "workers that write outputs cannot see it"),
    "evaluate out is a file": (["evaluate", "--gt", "FILE", "--detections", "OUT/dets.json", "--out", "FILE"],
                               _evaluation, "is a file"),
    "evaluate out unknown protocol": (["evaluate", "--gt", "FILE", "--detections", "OUT/dets.json", "--out",
                                       "foo://b/r"], _evaluation, "protocol 'foo'"),
    # config files
    "missing config": (["generate", "--config", "OUT/none.yaml"], None, "does not exist"),
    "alias bomb": (["generate", "--dry-run", "--config", "FILE"], ("bomb.yaml", _alias_bomb()), "expands to more"),
    "self alias": (["generate", "--dry-run", "--config", "FILE"], ("self.yaml", "a: &a [*a]\n"), "contains itself"),
    "not YAML": (["generate", "--config", "FILE"], ("bad.yaml", "model: [\n"), "not valid YAML"),
    "YAML list": (["generate", "--config", "FILE"], ("list.yaml", "- a\n- b\n"), "mapping of sections"),
    "not UTF-8": (["generate", "--config", "FILE"], ("latin.yaml", b"name: caf\xe9\n"), "not UTF-8"),
    # models
    "hub id": (GEN + ["model.source=CompVis/stable-diffusion-v1-4"], None, "model-hub id"),
    "checkpoint without configs": (GEN + ["model.source=FILE"], ("sd.ckpt", b"\0" * 64), "config_source"),
    "folder without index": (GEN + ["model.source=OUT"], None, "model_index.json"),
    "filter folder not a CLIP": (GEN + ["filter.enabled=true", "filter.model=OUT"],
                                 ("config.json", '{"model_type": "sam"}'), "not a CLIP model"),
    "open-vocab folder missing": (GEN + ["annotation.labeller=owlv2", "annotation.open_vocab=OUT/none"], None,
                                  "annotation.open_vocab"),
    "open-vocab folder is a CLIP": (["generate", "--config", "configs/tiny.yaml", "output.path=OUT/run",
                                     "annotation.labeller=grounding_dino", "annotation.open_vocab=OUT"],
                                    ("config.json", '{"model_type": "clip"}'),
                                    "holds a clip, not a GroundingDinoForObjectDetection"),
    # damaged outputs
    "damaged run.json": (["export", "--output", "OUT"], ("run.json", "{nope"), "run.json is damaged"),
    # evaluation input
    "repeated image id": (["evaluate", "--gt", "FILE", "--detections", "FILE", "--out", "OUT/eval"],
                          ("gt.json", '{"images": [{"id": 1}, {"id": 1}], "annotations": [], "categories": []}'),
                          "repeats image id"),
    "detections not a list": (["evaluate", "--gt", "FILE", "--detections", "FILE", "--out", "OUT/eval"],
                              ("gt.json", EMPTY_GT), "detections"),
    "evaluate gt are detections": (["evaluate", "--gt", "FILE", "--detections", "FILE", "--out", "OUT/eval"],
                                   ("gt.json", "[]"), "looks like detections"),
    "evaluate detections missing": (["evaluate", "--gt", "FILE", "--detections", "OUT/none.json", "--out",
                                     "OUT/eval"], ("gt.json", EMPTY_GT), "does not exist"),
    # trainers
    "no workers": (["train-detector", "--config", "configs/tiny.yaml", "detector.run.num_workers=0",
                    "detector.mix_ratio=1", "detector.synthetic=[x]", "detector.categories=[a]"], None,
                   "detector.run.num_workers"),
    "bf16 on CPU workers": (["train-detector", "--config", "configs/tiny.yaml", "detector.run.bf16=true",
                             "detector.mix_ratio=1", "detector.synthetic=[x]", "detector.categories=[a]"], None,
                            "use_gpu"),
    "finetune template": (["finetune", "--dry-run", "--config", "configs/tiny.yaml", "finetune.template=a photo",
                           "finetune.annotations=x.json"], None, "finetune.template"),
    "equal seeds": (["toy-world", "--config", "configs/toy_world.yaml", "detector_seeds=[0, 0]"], None,
                    "detector_seeds"),
    # training inputs: real datasets
    "detector annotations missing": (DET + ["detector.mix_ratio=0", "detector.real_annotations=OUT/none.json",
                                            "detector.real_image_root=OUT"], None,
                                     "detector.real_annotations"),
    "detector annotations not JSON": (DET + ["detector.mix_ratio=0", "detector.real_annotations=FILE",
                                             "detector.real_image_root=OUT"], ("instances.json", "{oops"),
                                      "not valid JSON"),
    "detector annotations are detections": (DET + ["detector.mix_ratio=0", "detector.real_annotations=FILE",
                                                   "detector.real_image_root=OUT"],
                                            ("dets.json", '[{"image_id": 1, "bbox": [0, 0, 1, 1]}]'),
                                            "not the COCO/LVIS object"),
    "detector image root missing": (DET + ["detector.mix_ratio=0", "detector.real_annotations=FILE",
                                           "detector.real_image_root=OUT/nope"], _coco, "detector.real_image_root"),
    "finetune annotations missing": (FT + ["finetune.annotations=OUT/none.json"], None, "finetune.annotations"),
    "finetune image root missing": (FT + ["finetune.annotations=FILE", "finetune.image_root=OUT/nope"], _coco,
                                    "finetune.image_root"),
    "finetune replay image root missing": (FT + ["finetune.annotations=FILE", "finetune.image_root=OUT/images",
                                                 "finetune.replay=0.2", "finetune.replay_captions=FILE",
                                                 "finetune.replay_image_root=OUT/nope"], _coco,
                                           "finetune.replay_image_root"),
    "finetune captions not captions": (FT + ["finetune.captions=FILE"], ("captions.json", '{"images": []}'),
                                       "COCO captions format"),
    # training inputs: generation outputs
    "synthetic folder not an output": (SYN + ["detector.synthetic=[OUT]"], ("notes.txt", "x"), "no run.json"),
    "synthetic output without shards": (SYN + ["detector.synthetic=[FILE]"], lambda out: _output(out / "run", "none"),
                                        "no finished shards"),
    "synthetic shard cut short": (SYN + ["detector.synthetic=[FILE]"], lambda out: _output(out / "run", "cut"),
                                  "shard-000001.tar: the shard holds"),
    "synthetic manifest entry damaged": (SYN + ["detector.synthetic=[FILE]"],
                                         lambda out: _output(out / "run", "entry"), "manifest entry"),
    "grounding base not an output": (GRD + ["grounding.base_shards=OUT"], ("notes.txt", "x"),
                                     "grounding.base_shards"),
    "grounding novel shard damaged": (GRD + ["grounding.base_shards=OUT/base", "grounding.novel_shards=FILE",
                                             "grounding.novel=[dog]"],
                                      _whole_base_damaged_novel,
                                      "grounding.novel_shards"),
    # the detector's evaluation inputs, which train-detector checks before it trains (the training
    # input of these cases is bad too: a check after training would name that instead)
    "eval image root missing": (EVAL + ["detector.eval_image_root=OUT/nope"], _coco, "detector.eval_image_root"),
    "eval image missing": (EVAL + ["detector.eval_image_root=OUT/images"], lambda out: _coco(out, drop_image=True),
                           "missing under detector.eval_image_root"),
    "eval ground truth not LVIS": (EVAL + ["detector.eval_image_root=OUT/images", "detector.eval_format=lvis"], _coco,
                                   "not_exhaustive_category_ids"),
    "eval split unknown": (EVAL + ["detector.eval_image_root=OUT/images", "detector.novel=[unicorn]"], _coco,
                           "unicorn"),
    "no trained detector": (["train-detector", "--config", "configs/tiny.yaml", "--skip-train",
                             "detector.output_dir=OUT/none", "detector.eval_annotations=FILE",
                             "detector.eval_image_root=OUT/images"], _coco, "no trained detector"),
}


def test_reliability_doc_counts_the_corpus():
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "reliability.md")) as f:
        doc = f.read()
    assert f"{len(CORPUS)} cases run through" in doc


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_bad_input_corpus(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    argv, file, words = CORPUS[case]
    out = tmp_path / "out"
    if callable(file):
        out.mkdir()
        path = file(out)
    elif file:
        name, content = file
        out.mkdir()
        path = out / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    elif "OUT" in " ".join(argv) and "model.source=OUT" in argv:
        out.mkdir()  # a folder that is not a pipeline
    before = sorted(os.listdir(out)) if out.exists() else None
    argv = [a.replace("FILE", str(path) if file else "").replace("OUT", str(out)) for a in argv]
    assert main(argv) == 2, case
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], captured.err
    assert "Traceback" not in captured.err
    assert (sorted(os.listdir(out)) if out.exists() else None) == before, "a refused input leaves nothing"
