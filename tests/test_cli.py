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
