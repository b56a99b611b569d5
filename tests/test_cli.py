"""Every sub-command, given a bad input, says what is wrong in one line and exits 2, with no
traceback and nothing written."""
import os

import pytest

from engine.cli import main
from engine.errors import UserError

BAD = {
    "generate": ["--config", "configs/tiny.yaml", "synthesis.stepz=3"],
    "export": ["--output", "/no/such/run"],
    "finetune": ["--config", "configs/tiny.yaml", "--dry-run", "finetune.annotations=/no/such/instances.json"],
    "train-grounding": ["grounding.base_shards=/no/such/run", "grounding.base=[cat]"],
    "train-detector": ["--config", "configs/tiny.yaml", "detector.kind=yolo"],
    "evaluate": ["--gt", "/no/such/gt.json", "--detections", "/no/such/dets.json", "--out", "OUT"],
    "toy-world": ["--config", "configs/toy_world.yaml", "world.image_size=-1"],
}
WORDS = {"generate": "synthesis.stepz", "export": "/no/such/run", "finetune": "/no/such/instances.json",
         "train-grounding": "/no/such/run", "train-detector": "yolo", "evaluate": "/no/such/gt.json",
         "toy-world": "image_size"}


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
            "GroundingTrainError"} <= names


# The corpus of bad input, by class (docs/reliability.md counts them): each case is a sub-command,
# its arguments (OUT = a path under the test's folder, FILE = the file the case writes there), and
# the words the one-line message must hold.
def _alias_bomb() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    return "\n".join(lines + [f"a{i}: &a{i} [{', '.join(['*a' + str(i - 1)] * 10)}]" for i in range(1, 9)])


GEN = ["generate", "--dry-run", "--config", "configs/tiny.yaml", "output.path=OUT"]
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
    "wrong type": (GEN + ["synthesis.steps=many"], None, "synthesis.steps"),
    "unknown key": (GEN + ["synthesis.stepz=3"], None, "synthesis.stepz"),
    # output paths
    "root output": (["generate", "--dry-run", "--config", "configs/tiny.yaml", "output.path=/"], None, "root"),
    "home output": (["generate", "--dry-run", "--config", "configs/tiny.yaml", "output.path=~/"], None, "home"),
    "unknown protocol": (["generate", "--dry-run", "--config", "configs/tiny.yaml", "output.path=foo://b/r"], None,
                         "protocol 'foo'"),
    "export to unknown protocol": (["export", "--output", "bar://b/r"], None, "protocol 'bar'"),
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
    # damaged outputs
    "damaged run.json": (["export", "--output", "OUT"], ("run.json", "{nope"), "run.json is damaged"),
    # evaluation input
    "repeated image id": (["evaluate", "--gt", "FILE", "--detections", "FILE", "--out", "OUT/eval"],
                          ("gt.json", '{"images": [{"id": 1}, {"id": 1}], "annotations": [], "categories": []}'),
                          "repeats image id"),
    "detections not a list": (["evaluate", "--gt", "FILE", "--detections", "FILE", "--out", "OUT/eval"],
                              ("gt.json", '{"images": [], "annotations": [], "categories": []}'), "detections"),
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
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_bad_input_corpus(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    argv, file, words = CORPUS[case]
    out = tmp_path / "out"
    if file:
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
