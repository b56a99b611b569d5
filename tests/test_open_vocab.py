"""The zero-shot labellers `owlv2` and `grounding_dino` (engine.models.open_vocab): tiny random
OWLv2 and GroundingDINO folders written by the test through save_pretrained and loaded back through
the real loading path, the labeller's boxes (well-formed, in the image, of the prompted categories,
deterministic), how names are put to each model and matched back, the folder checks, and one
generate run on a real local Ray with the shards read back by webdataset."""
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.config import AnnotationConfig, ConfigError, load_config
from engine.data.shards import iter_samples, shard_urls
from engine.generation.annotation import LABELLERS, AnnotationError, build_labeller, check_labeller
from engine.generation.pipeline import generate, run_fingerprint
from engine.generation.prompts import PromptPlan
from engine.models.open_vocab import OpenVocabError, check_open_vocab_folder, load_open_vocab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs/tiny.yaml")
KINDS = ("owlv2", "grounding_dino")


# -- tiny random models, saved as the real ones are -------------------------------------------------

def owl_tokenizer():
    """A character-level CLIP tokenizer laid out as OWLv2's: OWLv2 takes a query whose first token
    id is 0 for padding and pools each text at its highest token id, so the start and end tokens
    come last in the vocabulary (as in CLIP's) and "!" (id 0) pads."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer
    vocab = {}
    for suffix in ("", "</w>"):
        for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
            vocab.setdefault(ch + suffix, len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32, pad_token="!")


def save_tiny_owlv2(folder, seed: int = 0) -> str:
    """Owlv2ForObjectDetection with 32-pixel inputs (16 patch boxes), one-layer 32-wide towers."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil
    tok = owl_tokenizer()
    config = Owlv2Config(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "max_position_embeddings": 32, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 1, "num_attention_heads": 4},
        projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Owlv2ForObjectDetection(config)
    model.save_pretrained(folder)
    Owlv2Processor(image_processor=Owlv2ImageProcessorPil(size={"height": 32, "width": 32}),
                   tokenizer=tok).save_pretrained(folder)
    return str(folder)


def bert_vocab(path) -> str:
    """A WordPiece vocab file with BERT's ids where GroundingDINO hard-codes them ([CLS] 101, [SEP]
    102, "." 1012, "?" 1029: it splits a caption into phrases at them), the names of the tiny config
    and every letter, so that any word tokenizes."""
    words = ["person", "bicycle", "car", "dog", "cat", "umbrella", "bat", "red"]
    letters = [c for c in "abcdefghijklmnopqrstuvwxyz"] + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += words + letters
    vocab += [f"[unused{i}]" for i in range(len(vocab), 1012)] + ["."]
    vocab += [f"[unused{i}]" for i in range(len(vocab), 1029)] + ["?"]
    assert vocab.index(".") == 1012 and vocab.index("?") == 1029
    with open(path, "w") as f:
        f.write("\n".join(vocab) + "\n")
    return str(path)


def save_tiny_grounding_dino(folder, seed: int = 0) -> str:
    """GroundingDINO on a tiny Swin (transformers' own, no timm) and a one-layer BERT, 64-pixel
    inputs, 10 queries, captions of up to 32 tokens."""
    from transformers import (BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoProcessor, SwinConfig)
    from transformers.models.bert.tokenization_bert import load_vocab
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil
    os.makedirs(folder, exist_ok=True)
    vocab = load_vocab(bert_vocab(os.path.join(os.path.dirname(str(folder)), "vocab.txt")))
    tok = BertTokenizer(vocab=dict(vocab))
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(window_size=7, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                   image_size=64, out_indices=[2, 3, 4]),
        text_config={"model_type": "bert", "vocab_size": len(vocab), "hidden_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32},
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10, num_feature_levels=4, encoder_n_points=2,
        decoder_n_points=2, max_text_len=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(config)
    model.save_pretrained(folder)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(
        size={"shortest_edge": 64, "longest_edge": 64}), tokenizer=tok).save_pretrained(folder)
    return str(folder)


SAVE = {"owlv2": save_tiny_owlv2, "grounding_dino": save_tiny_grounding_dino}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {kind: SAVE[kind](tmp_path_factory.mktemp(kind) / "model", seed=1) for kind in KINDS}


def labeller_cfg(kind, folder, **more) -> AnnotationConfig:
    return AnnotationConfig(labeller=kind, open_vocab=folder, box_threshold=0.0, text_threshold=0.0,
                            nms_iou=0.5, **more)


def images():
    rng = np.random.RandomState(0)
    return [rng.randint(0, 255, (64, 48, 3), dtype=np.uint8), rng.randint(0, 255, (40, 64, 3), dtype=np.uint8),
            rng.randint(0, 255, (64, 64, 3), dtype=np.uint8)]


CATEGORIES = [["dog", "bat_(animal)"], ["person"], []]


# -- the labellers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_labels_the_prompted_categories_inside_the_image(kind, folders):
    assert kind in LABELLERS
    labeller = build_labeller(labeller_cfg(kind, folders[kind]), ["dog", "bat_(animal)", "person"])
    assert labeller.name == kind
    found = labeller.label(images(), CATEGORIES)
    assert len(found) == 3 and found[2] == []  # an image asked nothing gets nothing
    for image, wanted, boxes in zip(images(), CATEGORIES, found):
        h, w = image.shape[:2]
        for b in boxes:
            assert set(b) == {"bbox", "category", "score", "labeller"} and b["labeller"] == kind
            x0, y0, x1, y1 = b["bbox"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, b
            assert b["category"] in wanted and 0.0 <= b["score"] <= 1.0
        assert [b["score"] for b in boxes] == sorted((b["score"] for b in boxes), reverse=True)
    assert found[0] and found[1]  # at threshold 0 a random model boxes something
    assert labeller.label(images(), CATEGORIES) == found  # deterministic
    labeller.max_per_category = 1
    fewer = labeller.label(images()[:2], CATEGORIES[:2])
    assert all(len([b for b in boxes if b["category"] == c]) <= 1 for boxes in fewer for c in ("dog", "bat_(animal)"))
    labeller.box_threshold = 1.0
    assert labeller.label(images()[:2], CATEGORIES[:2]) == [[], []]


@pytest.mark.parametrize("kind", KINDS)
def test_names_are_put_to_the_model_as_prompts_say_them(kind, folders, monkeypatch):
    labeller = build_labeller(labeller_cfg(kind, folders[kind]), [])
    asked = []

    def detect(ims, names, box_threshold, text_threshold):
        asked.append(names)
        return [[([1.0, 2.0, 10.0, 12.0], len(n) - 1, 0.9)] if n else [] for n in names]
    monkeypatch.setattr(labeller.detector, "detect", detect)
    found = labeller.label(images(), CATEGORIES)
    assert asked == [[["dog", "bat"], ["person"], []]]  # prompt names; the dataset names come back
    assert [[b["category"] for b in boxes] for boxes in found] == [["bat_(animal)"], ["person"], []]


class Fake:
    """Stands in for the model: fixed outputs, whatever the inputs."""

    def __init__(self, logits, boxes, max_text_len=32):
        self.logits, self.boxes, self.config = logits, boxes, SimpleNamespace(max_text_len=max_text_len)

    def __call__(self, **inputs):
        self.inputs = inputs
        return SimpleNamespace(logits=self.logits, pred_boxes=self.boxes)


def test_grounding_dino_boxes_take_the_name_their_tokens_score(folders):
    detector = load_open_vocab("grounding_dino", folders["grounding_dino"], device="cpu")
    # "dog. red car." -> [CLS] dog . red car . [SEP]: dog at 1, "red car" at 3 and 4.
    logits = torch.full((1, 3, 32), -20.0)
    logits[0, 0, 1] = 3.0  # query 0: dog
    logits[0, 1, 3] = logits[0, 1, 4] = 2.0  # query 1: both tokens of "red car"
    logits[0, 2, 4] = 4.0  # query 2: only "car" of "red car": mean of its tokens about 0.49
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    detector.model = Fake(logits, boxes)
    image = np.zeros((40, 80, 3), dtype=np.uint8)
    (found,) = detector.detect([image], [["dog", "red car"]], box_threshold=0.5, text_threshold=0.6)
    ids = detector.processor.tokenizer.convert_tokens_to_ids(["dog", "red", "car"])
    assert detector.model.inputs["input_ids"][0].tolist() == [101, ids[0], 1012, ids[1], ids[2], 1012, 102]
    assert [(k, round(s, 3)) for _, k, s in found] == [(0, round(1 / (1 + np.exp(-3.0)), 3)), (1, round(1 / (1 + np.exp(-2.0)), 3))]
    assert found[0][0] == pytest.approx([20.0, 10.0, 60.0, 30.0]) and found[1][0] == pytest.approx([0.0, 0.0, 40.0, 20.0])
    (loose,) = detector.detect([image], [["dog", "red car"]], box_threshold=0.5, text_threshold=0.4)
    assert [k for _, k, _ in loose] == [1, 0, 1]  # query 2 passes the text threshold now


def test_owlv2_boxes_are_scaled_to_the_padded_square_and_batch_padding_is_ignored(folders):
    detector = load_open_vocab("owlv2", folders["owlv2"], device="cpu")
    logits = torch.full((2, 2, 2), -20.0)
    logits[0, 0, 1] = 1.0  # image 0, box 0: its second name
    logits[1, 0, 1] = 5.0  # image 1 has one name: its second query is the batch's padding
    logits[1, 1, 0] = 0.0
    boxes = torch.tensor([[[0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 0.2, 0.2]]] * 2)
    detector.model = Fake(logits, boxes)
    ims = [np.zeros((40, 64, 3), dtype=np.uint8), np.zeros((64, 40, 3), dtype=np.uint8)]
    found = detector.detect(ims, [["dog", "cat"], ["person"]], box_threshold=0.3)
    # OWLv2 pads each image at the bottom and right to a square: boxes scale by its longer side.
    assert len(found[0]) == 1 and found[0][0][0] == pytest.approx([0.0, 0.0, 32.0, 32.0]) and found[0][0][1] == 1
    assert [(k, round(s, 2)) for _, k, s in found[1]] == [(0, 0.5)]
    assert found[1][0][0] == pytest.approx([25.6, 25.6, 38.4, 38.4])
    assert detector.model.inputs["input_ids"].shape[0] == 4  # two queries per image


# -- bad folders ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_a_folder_that_is_not_the_model_is_one_line(kind, folders, tmp_path):
    other = "grounding_dino" if kind == "owlv2" else "owlv2"
    (tmp_path / "empty").mkdir()
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (tmp_path / "notjson").mkdir()
    (tmp_path / "notjson" / "config.json").write_text("[1, 2")
    shutil.copytree(folders[kind], tmp_path / "pickled")
    os.remove(tmp_path / "pickled" / "model.safetensors")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04 not loaded")
    shutil.copytree(folders[kind], tmp_path / "noprocessor")
    os.remove(tmp_path / "noprocessor" / "processor_config.json")
    shutil.copytree(folders[kind], tmp_path / "notokenizer")
    os.remove(tmp_path / "notokenizer" / "tokenizer.json")
    cases = [("", "annotation.open_vocab is not set"), (str(tmp_path / "none"), "is not a local folder"),
             (str(tmp_path / "empty"), "no config.json"), (str(tmp_path / "clip"), "holds a clip, not a"),
             (str(tmp_path / "notjson"), "not a JSON object"), (folders[other], "not a"),
             (str(tmp_path / "pickled"), "weights are a pickle"),
             (str(tmp_path / "noprocessor"), "not its processor"), (str(tmp_path / "notokenizer"), "no tokenizer")]
    for folder, why in cases:
        with pytest.raises(AnnotationError, match=why) as e:
            check_labeller(labeller_cfg(kind, folder))
        assert "\n" not in str(e.value) and "save_pretrained" in str(e.value)
    # what the file list cannot tell: weights of the wrong shapes, refused by the loader in one line
    shutil.copytree(folders[other], tmp_path / "swapped")
    shutil.copy(os.path.join(folders[kind], "config.json"), tmp_path / "swapped" / "config.json")
    with pytest.raises(AnnotationError, match="could not load the") as e:
        build_labeller(labeller_cfg(kind, str(tmp_path / "swapped")), [])
    assert "\n" not in str(e.value)
    with pytest.raises(OpenVocabError, match="unknown open-vocabulary detector"):
        check_open_vocab_folder("yolo_world", folders[kind])


def test_thresholds_and_folder_are_checked_and_in_the_fingerprint(folders):
    for bad in ("annotation.box_threshold=1.5", "annotation.text_threshold=-0.1", "annotation.open_vocab=s3://b/m"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].split(".")[1]):
            load_config(TINY, [bad])
    base = ["annotation.labeller=owlv2", f"annotation.open_vocab={folders['owlv2']}"]
    prints = {run_fingerprint(cfg, PromptPlan(cfg.prompts)) for cfg in (
        load_config(TINY, base), load_config(TINY, base + ["annotation.box_threshold=0.5"]),
        load_config(TINY, base[:1] + [f"annotation.open_vocab={folders['grounding_dino']}"]))}
    assert len(prints) == 3
    # the detector labeller's fingerprint ignores the zero-shot settings
    plain = load_config(TINY, [])
    assert run_fingerprint(plain, PromptPlan(plain.prompts)) == run_fingerprint(
        load_config(TINY, ["annotation.box_threshold=0.5"]), PromptPlan(plain.prompts))


def test_a_bad_folder_stops_generate_before_anything_is_written(tmp_path):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    out = tmp_path / "out"
    cfg = load_config(TINY, ["annotation.labeller=grounding_dino", f"annotation.open_vocab={tmp_path / 'clip'}",
                             f"output.path={out}"])
    with pytest.raises(AnnotationError, match="holds a clip, not a GroundingDinoForObjectDetection") as e:
        generate(cfg)
    assert "\n" not in str(e.value) and not out.exists()


# -- in generate, on Ray ----------------------------------------------------------------------------

def test_generate_labels_with_owlv2_and_records_it(local_ray, folders, tmp_path):
    out = str(tmp_path / "run")
    cfg = load_config(TINY, ["prompts.images_per_category=1", "synthesis.steps=2", "synthesis.batch_size=4",
                             "output.shard_size=4", "annotation.labeller=owlv2",
                             f"annotation.open_vocab={folders['owlv2']}", "annotation.box_threshold=0.0",
                             "annotation.max_per_category=2"])
    cfg.output.path = out
    summary = generate(cfg)
    records = [s["json"] for s in iter_samples(shard_urls(out))]
    assert summary.images == len(records) == 4 and summary.boxes > 0
    assert sum(len(r["boxes"]) for r in records) == summary.boxes
    for r in records:
        assert set(r["labellers"]) <= {"owlv2"} and len(r["labellers"]) == len(r["boxes"]) == len(r["labels"])
        assert set(r["labels"]) <= set(r["categories"])
        assert all(0 <= x0 < x1 <= r["width"] and 0 <= y0 < y1 <= r["height"] for x0, y0, x1, y1 in r["boxes"])
        assert all(r["labels"].count(c) <= 2 for c in r["categories"])
