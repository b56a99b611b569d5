"""The grounding head's inputs, taken from the (frozen) Stable Diffusion pipeline.

Image side: the paper reads the UNet's multi-scale decoder features at the last denoising step
(t = 1 for SD's DDIM with steps_offset 1). Shards keep the latents that *enter* that step, so the
features are recomputed exactly: one UNet pass at the scheduler's last timestep on those latents
with the prompt's text embedding (the text-conditioned branch, as synthesis keeps it), recording
each up-block's output with synthesis's UNetFeatureTap. Coarsest level first.

Text side: one embedding per category name from the pipeline's own text encoder (CLIP in SD).
We take the EOS-pooled hidden state (CLIPTextModel's pooler_output) of the bare name: CLIP's text
transformer is causal, so the EOS token is the only one that has read the whole name ("traffic
light" is one thing, not two tokens), and it is the token CLIP trains to stand for the text. A
mean over tokens would mix in the start token, which is the same for every name. A sentence
model (the toy world's MiniLM) is the other way round: it is trained for the token mean, and its
pooler head is untrained, so there the mean over real tokens is taken.
"""
from __future__ import annotations

import copy

import torch

from engine.models.diffusion import PromptEmbeddings, UNetFeatureTap
from engine.runtime.cache import ByteBudgetCache


def head_inputs(pipe) -> tuple[list[int], int]:
    """(channels of each up-block output, coarsest first; text embedding width) of `pipe`."""
    channels = list(reversed(pipe.unet.config.block_out_channels))
    return channels, int(pipe.text_encoder.config.hidden_size)


class Featurizer:
    """Recomputes UNet features from stored latents and embeds category names, with no gradient."""

    def __init__(self, pipe, steps: int, cache_mb: float = 0):
        self.pipe = pipe
        self.scheduler = copy.deepcopy(pipe.scheduler)  # its state must not leak into synthesis
        self.scheduler.set_timesteps(steps, device=pipe.unet.device)
        self.timestep = self.scheduler.timesteps[-1]
        self._names: dict[str, torch.Tensor] = {}
        self._prompts = PromptEmbeddings(pipe)
        # Features per sample key while they fit: the UNet is frozen and the pass is deterministic
        # (stored latents, fixed timestep), so every epoch after the first would recompute the
        # same tensors (the pass was 23% of a toy-world head step). At SD 1.5 sizes a sample's
        # features are ~22 MB, so there the cache holds few and training simply recomputes.
        self._features = ByteBudgetCache(cache_mb)

    @property
    def device(self):
        return self.pipe.unet.device

    def unet_features(self, latents: torch.Tensor, prompts: list[str],
                      keys: list[str] | None = None) -> list[torch.Tensor]:
        """Each up-block's output for the batch, coarsest first. With `keys` (a unique name per
        sample), samples seen before come from the cache."""
        if keys is None:
            return self._unet_pass(latents, prompts)

        def compute(miss: list[int]) -> list[list[torch.Tensor]]:
            levels = self._unet_pass(latents[miss], [prompts[i] for i in miss])
            return [[level[j] for level in levels] for j in range(len(miss))]
        rows = self._features.get(keys, compute)
        return [torch.stack([r[level] for r in rows]) for level in range(len(rows[0]))]

    @torch.no_grad()
    def _unet_pass(self, latents: torch.Tensor, prompts: list[str]) -> list[torch.Tensor]:
        unet = self.pipe.unet
        cond = self._prompts(list(prompts))
        x = latents.to(self.device, unet.dtype)
        if hasattr(self.scheduler, "_step_index"):  # Euler-type schedulers scale by the step's sigma
            self.scheduler._step_index = None
        x = self.scheduler.scale_model_input(x, self.timestep)
        tap = UNetFeatureTap(unet)
        tap.active = True
        try:
            unet(x, self.timestep, encoder_hidden_states=cond)
            return [f.float() for f in tap.outputs]
        finally:
            tap.close()

    @torch.no_grad()
    def category_embeddings(self, names: list[str]) -> torch.Tensor:
        """(len(names), text_dim) embeddings, cached by name (names repeat every batch)."""
        todo = [n for n in dict.fromkeys(names) if n not in self._names]
        if todo:
            tok = self.pipe.tokenizer(todo, padding="max_length", truncation=True,
                                      max_length=self.pipe.tokenizer.model_max_length, return_tensors="pt")
            enc = self.pipe.text_encoder
            out = enc(tok.input_ids.to(enc.device))
            if enc.config.model_type == "clip_text_model":
                pooled = out.pooler_output
            else:
                mask = tok.attention_mask.to(enc.device).unsqueeze(-1).float()
                pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
            for n, e in zip(todo, pooled.float().cpu()):
                self._names[n] = e
        return torch.stack([self._names[n] for n in names]) if names else torch.zeros(0, self.text_dim)

    @property
    def text_dim(self) -> int:
        return int(self.pipe.text_encoder.config.hidden_size)

    def text_batch(self, category_lists: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad per-image category lists to (B, T, text_dim) embeddings and a (B, T) bool mask
        (True = a real category)."""
        T = max(1, max(len(c) for c in category_lists))
        text = torch.zeros(len(category_lists), T, self.text_dim)
        mask = torch.zeros(len(category_lists), T, dtype=torch.bool)
        for i, cats in enumerate(category_lists):
            if cats:
                text[i, :len(cats)] = self.category_embeddings(cats)
                mask[i, :len(cats)] = True
        return text, mask
