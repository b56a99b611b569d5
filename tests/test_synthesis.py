"""The denoising loop: per-sample seeds, the latents InstaGen keeps, and UNet features."""
import io

import numpy as np
import pytest
import torch

from engine.config import ModelConfig, PromptConfig, SynthesisConfig
from engine.generation.prompts import PromptPlan
from engine.models.diffusion import load_pipeline
from engine.generation.synthesis import Synthesizer, derived_seed, draw


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(ModelConfig())


def test_image_depends_on_its_seed_not_its_batch(pipe):
    cfg = SynthesisConfig(steps=3, height=64, width=64)
    together = draw(pipe, ["a photograph of cat", "a photograph of dog"], [11, 22], cfg)
    alone = draw(pipe, ["a photograph of dog"], [22], cfg)
    # Equal up to float reassociation in batched matmuls (about 1e-5), never a different image.
    assert np.abs(together.images[1].astype(int) - alone.images[0].astype(int)).max() <= 1
    np.testing.assert_allclose(together.latents[1], alone.latents[0], rtol=1e-4, atol=1e-4)
    other_seed = draw(pipe, ["a photograph of dog"], [23], cfg)
    assert not np.array_equal(other_seed.images[0], alone.images[0])


def test_kept_latents_enter_the_last_step(pipe):
    """Finishing the last denoising step from the kept latents must reproduce the image."""
    cfg = SynthesisConfig(steps=4, height=64, width=64, guidance=1.0)
    drawn = draw(pipe, ["a photograph of cat"], [5], cfg)
    sched = pipe.scheduler
    sched.set_timesteps(cfg.steps)
    t = sched.timesteps[-1]
    text, _ = pipe.encode_prompt(["a photograph of cat"], "cpu", 1, False)
    with torch.no_grad():
        x = torch.from_numpy(drawn.latents)
        eps = pipe.unet(sched.scale_model_input(x, t), t, encoder_hidden_states=text).sample
        final = sched.step(eps, t, x).prev_sample
        image = pipe.vae.decode(final / pipe.vae.config.scaling_factor).sample
    pixels = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(pixels.astype(int) - drawn.images.astype(int)).max() <= 1


def test_features_are_the_up_blocks_of_the_last_step(pipe):
    cfg = SynthesisConfig(steps=2, height=64, width=64, keep_features=True)
    drawn = draw(pipe, ["a photograph of cat"] * 2, [1, 2], cfg)
    assert len(drawn.features) == len(pipe.unet.up_blocks)
    for f in drawn.features:
        assert f.shape[0] == 2 and f.dtype == np.float16 and np.isfinite(f).all()


def test_synthesizer_regenerates_nonfinite_samples(monkeypatch):
    monkeypatch.setenv("INSTAGEN_FAULT_NAN", "7")
    cfg = SynthesisConfig(steps=2, height=64, width=64, keep_features=True)
    plan = PromptPlan(PromptConfig(base=["a", "b"], images_per_category=4))
    actor = Synthesizer(ModelConfig(), cfg, plan, shard_size=4)
    out = actor({"shard": 1})  # rows 4..7, made by the actor itself
    assert out["id"] == [4, 5, 6, 7] and out["seed"] == [plan.row(i).seed for i in range(4, 8)]
    assert out["status"] == ["ok"] * 4
    assert out["seed_used"] == out["seed"][:3] + [derived_seed(out["seed"][3], 1)]
    assert np.isfinite(np.load(io.BytesIO(out["latent"][3]), allow_pickle=False)).all()
    with np.load(io.BytesIO(out["features"][0]), allow_pickle=False) as z:
        assert len(z.files) == len(actor.pipe.unet.up_blocks)
    actor.cfg = SynthesisConfig(steps=2, height=64, width=64, on_nonfinite="drop")
    out = actor({"shard": 1})
    assert out["status"] == ["ok"] * 3 + ["dropped"] and out["jpg"][3] == b""
