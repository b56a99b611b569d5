"""Single-file Stable Diffusion checkpoints (.ckpt / .safetensors) in the original CompVis/LDM
key layout, read and written without a model hub.

Layout of such a file (sd-v1-4.ckpt and its kin):
    model.diffusion_model.*          the UNet
    first_stage_model.*              the VAE
    cond_stage_model.transformer.*   the CLIP text encoder (transformers' CLIPTextModel)

Loading: the file holds weights only. Component configs (block sizes, VAE scaling factor), the
tokenizer and the scheduler come from `config_source`, a local diffusers folder of the same
architecture; diffusers would otherwise fetch them from the hub, which is not reachable here.

Why not `StableDiffusionPipeline.from_single_file(path, config=folder)` in one call: it cannot
take a state dict we have already read safely and checked, and for a component it does not find
in the checkpoint it quietly uses the weights in the config folder instead (or leaves tensors
uninitialised on the meta device). So the file is read here once, its keys are checked, the UNet
and VAE go through diffusers' per-model `from_single_file` (its LDM -> diffusers key conversion),
the text encoder is loaded strictly here, and the pipeline is assembled from the folder with
these three models passed in. Every weight then provably comes from the checkpoint.

The tests write such files from the tiny pipeline with the inverse mapping
(tests/single_file_writer.py).
"""
from __future__ import annotations

import contextlib
import os
import zipfile
from typing import Optional

import torch

from engine.errors import UserError


class ModelLoadError(UserError, RuntimeError):
    """A model could not be loaded; the message says what to fix."""

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
_COMPONENTS = {UNET_PREFIX: "UNet", VAE_PREFIX: "VAE", TEXT_PREFIX: "CLIP text encoder"}

# The config folder must provide these; weights in it are not needed.
_REQUIRED_CONFIG_FILES = ("model_index.json", "unet/config.json", "vae/config.json",
                          "text_encoder/config.json", "scheduler/scheduler_config.json")


# ---------------------------------------------------------------------------------------------
# Loading


def load_single_file(path: str, config_source: Optional[str]):
    """A StableDiffusionPipeline whose UNet, VAE and text encoder weights all come from the
    single-file checkpoint `path`, configured by the local diffusers folder `config_source`."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    folder = config_folder(path, config_source)
    state = read_state_dict(path)
    _check_layout(state, path)

    mismatch = (f"the checkpoint {path!r} does not fit model.config_source {folder!r}; the folder "
                f"must describe the same architecture as the checkpoint (e.g. a saved sd-v1-4 "
                f"folder for an SD 1.x checkpoint)")
    try:
        # extract_ema: a training checkpoint carrying both weight sets should give the EMA
        # weights, which are the ones meant for sampling; EMA-only files are unaffected.
        unet = UNet2DConditionModel.from_single_file(state, config=folder, subfolder="unet",
                                                     local_files_only=True, extract_ema=True)
        vae = AutoencoderKL.from_single_file(state, config=folder, subfolder="vae", local_files_only=True)
        text_encoder = _load_text_encoder(state, folder)
    except (ValueError, RuntimeError, KeyError, OSError) as e:  # e.g. a tensor of the wrong shape
        # diffusers appends a hint on loading random weights instead, which is wrong here.
        raise ModelLoadError(f"{mismatch}: {str(e).split('. If you want')[0]}") from e
    # diffusers loads only the keys it finds: a missing one stays on the meta device, an extra
    # one is skipped with a log line. Either means the folder describes another architecture.
    _check_all_used(unet, state, UNET_PREFIX, mismatch)
    _check_all_used(vae, state, VAE_PREFIX, mismatch)

    try:
        return StableDiffusionPipeline.from_pretrained(
            folder, unet=unet, vae=vae, text_encoder=text_encoder, safety_checker=None,
            requires_safety_checker=False, local_files_only=True)
    except (OSError, ValueError) as e:  # tokenizer / scheduler files missing or broken
        raise ModelLoadError(f"could not read the tokenizer or scheduler from model.config_source "
                             f"{folder!r}: {e}") from e


def config_folder(path: str, config_source: Optional[str]) -> str:
    """The local diffusers folder giving a single-file checkpoint its configs and tokenizer."""
    need = ("a local diffusers folder of the same architecture (e.g. sd-v1-4 saved with "
            "`save_pretrained`, or downloaded with `huggingface-cli download "
            "CompVis/stable-diffusion-v1-4 --local-dir /models/sd-v1-4` where there is network); "
            "only its configs and tokenizer are used, its weights are not needed")
    if not config_source:
        raise ModelLoadError(
            f"model.source {path!r} is a single-file checkpoint, which holds weights but no configs "
            f"or tokenizer, and no model hub is reachable to fetch them. Set model.config_source to {need}.")
    folder = os.path.expanduser(config_source)
    if folder.endswith((".yaml", ".yml")):
        raise ModelLoadError(
            f"model.config_source {config_source!r} is an original LDM yaml; offline loading also needs "
            f"the tokenizer and text-encoder config, which the yaml lacks. Set it to {need}.")
    if not os.path.isdir(folder):
        raise ModelLoadError(f"model.config_source {config_source!r} is not a local folder; "
                             f"set it to {need}.")
    missing = [f for f in _REQUIRED_CONFIG_FILES if not os.path.isfile(os.path.join(folder, f))]
    if not os.path.isdir(os.path.join(folder, "tokenizer")):
        missing.append("tokenizer/")
    if missing:
        raise ModelLoadError(f"model.config_source {config_source!r} lacks {', '.join(missing)}; it must be "
                             f"a diffusers Stable Diffusion folder: {need}.")
    return folder


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors or torch-pickled checkpoint, read without running code
    from the file: pickles load with `weights_only=True`."""
    corrupt = (f"could not read the checkpoint {path!r}: the file is corrupt or truncated (re-download "
               f"or re-export it)")
    if path.endswith(".safetensors"):
        import safetensors.torch
        try:
            obj = safetensors.torch.load_file(path)
        except Exception as e:  # safetensors raises its own SafetensorError for bad headers
            raise ModelLoadError(f"{corrupt}: {e}") from e
    else:
        obj = _torch_load_weights_only(path, corrupt)
    # PyTorch Lightning checkpoints nest the weights under "state_dict", next to step counters.
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"the checkpoint {path!r} holds a {type(obj).__name__}, not a dict of tensors; "
                             f"it is not a Stable Diffusion checkpoint")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


class _Inert:
    """Stands in for any class or function a pickle names beyond tensors and containers (e.g.
    the Lightning callback objects some training checkpoints carry): it accepts whatever the
    pickle passes and does nothing, so the file's own code never runs, and the tensors load."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _torch_load_weights_only(path: str, corrupt: str):
    unsafe: list[str] = []
    is_zip = zipfile.is_zipfile(path)  # torch >= 1.6 format; the older one cannot be memory-mapped
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    if is_zip and scan is not None:
        try:
            unsafe = scan(path)  # reads only the pickle's opcodes, runs nothing
        except Exception as e:
            raise ModelLoadError(f"{corrupt}: {e}") from e
    allow = (torch.serialization.safe_globals([(_Inert, name) for name in unsafe]) if unsafe
             else contextlib.nullcontext())
    try:
        with allow:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:
        # Still refused: globals of modules torch blocks outright (os, sys), and any global in
        # the legacy format, which cannot be inspected before loading. torch has no exception
        # type of its own for this; its messages name the pickle opcode GLOBAL. Its advice to
        # retry with weights_only=False is left out on purpose.
        message = str(e)
        if "weights only load failed" in message.lower():
            globals_named = [line.strip() for line in message.splitlines() if "GLOBAL" in line]
            if globals_named:
                raise ModelLoadError(
                    f"the checkpoint {path!r} pickles Python objects besides tensors, which are not "
                    f"loaded since unpickling them could run arbitrary code ({globals_named[0]}). Convert "
                    f"it to .safetensors with a tool you trust.") from e
            message = "not a torch checkpoint that the safe loader can parse"
        raise ModelLoadError(f"{corrupt}: {message}") from e


def _check_layout(state: dict[str, torch.Tensor], path: str) -> None:
    present = {p for p in _COMPONENTS if any(k.startswith(p) for k in state)}
    if present == set(_COMPONENTS):
        return
    if any(k.startswith("cond_stage_model.model.") for k in state):
        raise ModelLoadError(f"the checkpoint {path!r} has an OpenCLIP text encoder (Stable Diffusion 2.x); "
                             f"only the SD 1.x layout is read from single files. Convert it to a diffusers "
                             f"folder and set model.source to that folder.")
    if not present:
        sample = ", ".join(sorted(state)[:3]) or "no tensors at all"
        raise ModelLoadError(
            f"the file {path!r} is not a Stable Diffusion checkpoint: none of its keys start with "
            f"{', '.join(_COMPONENTS)} (it has e.g. {sample}). Point model.source at an original-layout "
            f"checkpoint such as sd-v1-4.ckpt, or at a diffusers folder.")
    absent = [f"{_COMPONENTS[p]} ({p}*)" for p in _COMPONENTS if p not in present]
    raise ModelLoadError(f"the checkpoint {path!r} lacks the weights of the {', '.join(absent)}; a full "
                         f"Stable Diffusion checkpoint (UNet, VAE and text encoder) is needed")


def _load_text_encoder(state: dict[str, torch.Tensor], folder: str):
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
    with init_empty_weights():  # parameters on meta (no wasted random init), buffers real
        model = CLIPTextModel(config)
    # The original files name keys after the CLIPTextModel of their day ("text_model.*"), and
    # position_ids was a saved buffer then. Newer transformers drop the "text_model." level and
    # rebuild position_ids, so match whichever naming the installed model uses.
    wrapped = any(k.startswith("text_model.") for k in model.state_dict())
    weights = {}
    for key, tensor in state.items():
        if key.startswith(TEXT_PREFIX) and not key.endswith("position_ids"):
            name = key[len(TEXT_PREFIX):].removeprefix("text_model.")
            weights[("text_model." + name) if wrapped else name] = tensor
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if missing or unexpected:
        raise ModelLoadError(f"text encoder keys do not match (missing: {missing[:3]}, "
                             f"unexpected: {unexpected[:3]})")
    return model.eval()


def _check_all_used(model, state: dict[str, torch.Tensor], prefix: str, mismatch: str) -> None:
    # The LDM -> diffusers mapping of the UNet and VAE is one tensor to one tensor, so the
    # counts must agree, and nothing may be left on the meta device.
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    in_file = sum(k.startswith(prefix) for k in state)
    in_model = len(model.state_dict())
    if on_meta or in_file != in_model:
        absent = f"; not in the file: {on_meta[:3]}" if on_meta else ""
        raise ModelLoadError(f"{mismatch}: the {_COMPONENTS[prefix]} has {in_model} tensors but the file "
                             f"{in_file} under {prefix}*{absent}")
