"""Writes a diffusers pipeline as one single-file checkpoint in the original CompVis/LDM key layout
(the inverse of engine.models.checkpoints' loading), so the tests can make the files a user
brings: `.safetensors`, or a torch pickle `{"state_dict": ...}` for .ckpt/.pt/.bin."""
from __future__ import annotations

import os
from typing import Callable

import torch

from engine.models.checkpoints import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX


def save_single_file(pipe, path: str) -> None:
    """Write the pipeline's UNet, VAE and text encoder as one original-layout checkpoint:
    `.safetensors`, or a torch pickle `{"state_dict": ...}` for .ckpt/.pt/.bin."""
    state: dict[str, torch.Tensor] = {}
    for prefix, part in ((UNET_PREFIX, unet_to_original(pipe.unet)),
                         (VAE_PREFIX, vae_to_original(pipe.vae)),
                         (TEXT_PREFIX, text_encoder_to_original(pipe.text_encoder))):
        state.update({prefix + k: v.detach().cpu().contiguous() for k, v in part.items()})

    # Write next to the target and rename, so an interrupted export never leaves a truncated
    # file under the real name.
    if not path.endswith((".safetensors", ".ckpt", ".pt", ".bin")):
        raise ValueError(f"checkpoint path {path!r} must end in .safetensors, .ckpt, .pt or .bin")
    tmp = path + ".partial"
    try:
        if path.endswith(".safetensors"):
            import safetensors.torch
            safetensors.torch.save_file(state, tmp)
        else:
            torch.save({"state_dict": state}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# Inner names of a ResNet block: diffusers -> LDM.
_UNET_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "norm2.": "out_layers.0.",
                "conv2.": "out_layers.3.", "time_emb_proj.": "emb_layers.1.",
                "conv_shortcut.": "skip_connection."}
_VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.",
                  "to_out.0.": "proj_out."}


def unet_to_original(unet) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel weights under LDM names. LDM numbers all down blocks' layers in one
    sequence `input_blocks.N` (N=0 is conv_in; each level holds layers_per_block layers, then a
    downsampler), and the up path likewise in `output_blocks.N` with one more layer per level."""
    cfg = unet.config
    levels, per = len(cfg.block_out_channels), cfg.layers_per_block
    if not isinstance(per, int):
        raise ValueError("unet.config.layers_per_block must be one number for the LDM layout")
    sd = unet.state_dict()
    table = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    resnets = set()
    for i in range(levels):
        for j in range(per):
            n = 1 + i * (per + 1) + j
            table[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{n}.0."
            table[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{n}.1."
            resnets.add(f"down_blocks.{i}.resnets.{j}.")
        if i < levels - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (per + 1)}.0.op."
        for j in range(per + 1):
            n = i * (per + 1) + j
            table[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{n}.0."
            table[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{n}.1."
            resnets.add(f"up_blocks.{i}.resnets.{j}.")
        if i < levels - 1:
            # The upsampler follows the level's last layer: after its attention, if it has one.
            slot = 2 if any(k.startswith(f"up_blocks.{i}.attentions.") for k in sd) else 1
            table[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (per + 1) + per}.{slot}."
    # The middle block alternates ResNet, attention, ResNet.
    n_mid = 1 + max([int(k.split(".")[2]) for k in sd if k.startswith("mid_block.resnets.")], default=0)
    for j in range(n_mid):
        table[f"mid_block.resnets.{j}."] = f"middle_block.{2 * j}."
        table[f"mid_block.attentions.{j}."] = f"middle_block.{2 * j + 1}."
        resnets.add(f"mid_block.resnets.{j}.")
    # Attention blocks (Transformer2DModel / SpatialTransformer) use the same inner names.
    return _rename(sd, table, lambda head: _UNET_RESNET if head in resnets else {}, "UNet")


def vae_to_original(vae) -> dict[str, torch.Tensor]:
    """AutoencoderKL weights under LDM names. The decoder's up levels are numbered in reverse
    in LDM (up.0 is the last, full-resolution level), and the mid attention's linear layers are
    1x1 convolutions there."""
    levels, per = len(vae.config.block_out_channels), vae.config.layers_per_block
    table = {f"{name}.": f"{name}." for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in",
                                                 "decoder.conv_out", "quant_conv", "post_quant_conv")}
    table["encoder.conv_norm_out."] = "encoder.norm_out."
    table["decoder.conv_norm_out."] = "decoder.norm_out."
    for i in range(levels):
        for j in range(per):
            table[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        for j in range(per + 1):
            table[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{levels - 1 - i}.block.{j}."
        if i < levels - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
            table[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{levels - 1 - i}.upsample."
    for side in ("encoder", "decoder"):
        table[f"{side}.mid_block.resnets.0."] = f"{side}.mid.block_1."
        table[f"{side}.mid_block.resnets.1."] = f"{side}.mid.block_2."
        table[f"{side}.mid_block.attentions.0."] = f"{side}.mid.attn_1."

    def inner(head: str) -> dict[str, str]:
        if ".mid_block.attentions." in head:
            return _VAE_ATTENTION
        return _VAE_RESNET if ".resnets." in head else {}

    out = _rename(vae.state_dict(), table, inner, "VAE")
    for key, tensor in out.items():
        if ".mid.attn_1." in key and key.endswith("weight") and tensor.ndim == 2:
            out[key] = tensor[:, :, None, None]  # Linear [out, in] -> 1x1 conv [out, in, 1, 1]
    return out


def text_encoder_to_original(text_encoder) -> dict[str, torch.Tensor]:
    """CLIPTextModel weights as the original files name them: "text_model.*" (newer transformers
    drop that level, older ones have it)."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in text_encoder.state_dict().items()}


def _rename(sd: dict[str, torch.Tensor], table: dict[str, str],
            inner: Callable[[str], dict[str, str]], what: str) -> dict[str, torch.Tensor]:
    """Rename each key by the longest prefix in `table`, then the first inner name after it
    by `inner(prefix)`. A key with no prefix is an error: a variant this mapping does not know
    (e.g. a class embedding) must not be dropped silently."""
    out = {}
    for key, tensor in sd.items():
        parts = key.split(".")
        heads = (".".join(parts[:n]) + "." for n in range(len(parts) - 1, 0, -1))
        head = next((h for h in heads if h in table), None)
        if head is None:
            raise ValueError(f"{what} weight {key!r} has no counterpart in the original LDM layout")
        tail = key[len(head):]
        for old, new in inner(head).items():
            if tail.startswith(old):
                tail = new + tail[len(old):]
                break
        out[table[head] + tail] = tensor
    return out
