"""Typed configs: YAML into dataclasses, overrides, and errors that name the key."""
import pytest

from engine.config import Config, ConfigError, load_config
from engine.generation.prompts import PromptPlan, make_prompts


def test_tiny_and_coco_ovd_load():
    tiny = load_config("configs/tiny.yaml")
    assert isinstance(tiny, Config) and tiny.model.source == "tiny"
    coco = load_config("configs/coco_ovd.yaml")
    assert (len(coco.prompts.base), len(coco.prompts.novel)) == (48, 17)
    assert not set(coco.prompts.base) & set(coco.prompts.novel)
    assert coco.synthesis.steps == 50 and coco.synthesis.guidance == 5.0
    assert (coco.synthesis.height, coco.synthesis.width) == (512, 512)
    assert (coco.annotation.alpha, coco.annotation.beta) == (0.8, 0.4)
    assert coco.model.scheduler == "ddim"


def test_overrides_are_typed():
    cfg = load_config("configs/tiny.yaml", ["synthesis.steps=7", "output.path=/x/y", "prompts.base=[a, b]",
                                           "synthesis.guidance=3", "ray.address=null"])
    assert cfg.synthesis.steps == 7 and cfg.output.path == "/x/y" and cfg.prompts.base == ["a", "b"]
    assert isinstance(cfg.synthesis.guidance, float) and cfg.ray.address is None


@pytest.mark.parametrize("override, key", [
    ("synthesis.stepz=3", "synthesis.stepz"),
    ("synthesis.steps=many", "synthesis.steps"),
    ("synthesis.keep_features=3", "synthesis.keep_features"),
    ("prompts.base=cat", "prompts.base"),
    ("nonsense.key=1", "nonsense"),
    ("synthesis.height=65", "synthesis.height"),
    ("annotation.alpha=1.5", "annotation.alpha"),
    # Every float is finite, every string printable, every template plain, every count sensible.
    ("synthesis.guidance=.nan", "synthesis.guidance"),
    ("annotation.alpha=.inf", "annotation.alpha"),
    ("finetune.lr=nan", "finetune.lr"),
    ("annotation.batch_size=0", "annotation.batch_size"),
    ("synthesis.jpeg_quality=0", "synthesis.jpeg_quality"),
    ("model.scheduler=foo", "model.scheduler"),
    ("prompts.template={c1:>99999999999}", "prompts.template"),
    ("prompts.template={c1!r} and {c2}", "prompts.template"),
    ("prompts.template_single=a {c2}", "prompts.template_single"),
    ("prompts.base=[\"dog\\u0000\", cat]", "prompts.base"),
    ("prompts.base=[\"dog\\nrm -rf\", cat]", "prompts.base"),
    ("prompts.base=[\" dog\", cat]", "prompts.base"),
    ("output.path=foo://bucket/run", "output.path"),
    ("output.path=/", "output.path"),
    ("output.path=~", "output.path"),
])
def test_bad_keys_and_types_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/tiny.yaml", [override])


def test_malformed_and_missing_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n  source: tiny")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(scalar))


def test_prompts_are_deterministic_and_shaped():
    cfg = load_config("configs/tiny.yaml").prompts
    rows = make_prompts(cfg)
    assert rows == make_prompts(cfg)
    assert len(rows) == len(cfg.base) * cfg.images_per_category
    assert [r.id for r in rows] == list(range(len(rows)))
    for r in rows:
        assert 1 <= len(r.categories) <= 2 and set(r.categories) <= set(cfg.base)
        assert len(set(r.categories)) == len(r.categories)
        expected = (cfg.template.format(c1=r.categories[0], c2=r.categories[1]) if len(r.categories) == 2
                    else cfg.template_single.format(c1=r.categories[0]))
        assert r.text == expected
    assert any(len(r.categories) == 2 for r in rows) and any(len(r.categories) == 1 for r in rows)
    other = make_prompts(load_config("configs/tiny.yaml", ["prompts.seed=1"]).prompts)
    assert [r.seed for r in other] != [r.seed for r in rows]


def test_category_errors():
    with pytest.raises(ConfigError, match="unknown category 'zebra'"):
        PromptPlan(load_config("configs/tiny.yaml", ["prompts.generate=list",
                                                            "prompts.categories=[cat, zebra]"]).prompts)
    with pytest.raises(ConfigError, match="no categories"):
        PromptPlan(load_config("configs/tiny.yaml", ["prompts.base=[]"]).prompts)
    with pytest.raises(ConfigError, match="listed twice"):
        PromptPlan(load_config("configs/tiny.yaml", ["prompts.base=[cat, cat]"]).prompts)
    with pytest.raises(ConfigError, match="characters"):
        make_prompts(load_config("configs/tiny.yaml", [f"prompts.base=[{'x' * 100_000}]"]).prompts)


def test_bad_template():
    with pytest.raises(ConfigError, match="prompts.template"):
        load_config("configs/tiny.yaml", ["prompts.template=a photo of {c3}"])


def test_every_section_is_wired_and_scientific_floats_parse():
    cfg = load_config("configs/tiny.yaml", ["detector.lr=1e-3", "finetune.lr=2e-5"])
    assert cfg.detector.lr == 1e-3 and cfg.finetune.lr == 2e-5
    with pytest.raises(ConfigError, match="detector.lr"):
        load_config("configs/tiny.yaml", ["detector.lr=fast"])


def test_an_override_of_a_merged_section_changes_only_that_section():
    # configs/toy_world.yaml builds `detector` from `teacher` with a YAML merge key; the nested
    # `tiny` mapping is then one object in both, and an override must not reach through it.
    from engine.toyworld.loop import load_ablation_config
    cfg = load_ablation_config("configs/toy_world.yaml", ["detector.tiny.seed=5", "detector.seed=3"])
    assert (cfg.detector.tiny.seed, cfg.detector.seed) == (5, 3)
    assert (cfg.teacher.tiny.seed, cfg.teacher.seed) == (0, 0)
    assert cfg.detector.tiny.num_queries == cfg.teacher.tiny.num_queries == 20


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    # 9 levels of 10 aliases each: 10**9 values once expanded, from a few hundred bytes.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join(['*a' + str(i - 1)] * 10)}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="expands to more than"):
        load_config(str(path))
    (tmp_path / "self.yaml").write_text("a: &a [*a]\n")
    with pytest.raises(ConfigError, match="alias that contains itself"):
        load_config(str(tmp_path / "self.yaml"))


@pytest.mark.parametrize("override, key", [
    ("detector.run.num_workers=0", "detector.run.num_workers"),
    ("detector.run.bf16=true", "detector.run.bf16"),
    ("detector.categories=[a, a]", "detector.categories"),
])
def test_trainer_sections_are_checked_by_their_job(override, key):
    ok = ["detector.mix_ratio=1", "detector.synthetic=[x]", "detector.categories=[a, b]"]
    load_config("configs/tiny.yaml", ok).detector.validate()
    cfg = load_config("configs/tiny.yaml", ok + [override])  # a later override wins
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg.detector.validate()


def test_a_late_key_at_its_default_keeps_recorded_fingerprints():
    # A key added to a section after runs were recorded (engine.config.sections.late): at its
    # default the section's fingerprint is the one recorded before the key existed, so finished
    # stages stay finished and half-done runs resume; set, it is a different run.
    import dataclasses
    from engine.config import DetectorConfig, fingerprint, from_dict, to_dict
    from engine.config.sections import late

    @dataclasses.dataclass
    class Before:
        lr: float = 1e-4

    @dataclasses.dataclass
    class After:
        lr: float = 1e-4
        ema: bool = late(False)

    assert fingerprint(to_dict(After())) == fingerprint(to_dict(Before()))
    assert fingerprint(to_dict(After(ema=True))) != fingerprint(to_dict(Before()))
    d = DetectorConfig()
    assert "ema" not in to_dict(d) and to_dict(DetectorConfig(ema=True))["ema"] is True
    assert from_dict(DetectorConfig, to_dict(d)) == d
