"""The instance grounding head (paper 3.3.1, 4.1): a Grounding-DINO-like detector that reads the
diffusion UNet's multi-scale decoder features and the text embeddings of category names, and
says where each named category is.

    head = GroundingHead(GroundingConfig(in_channels=[1280, 1280, 640, 320], text_dim=768))
    out = head(features, text, text_mask)   # logits (B, Q, T), boxes (B, Q, 4) cxcywh in [0, 1]

Four parts, in the paper's order: (i) a 3x3 conv per scale compressing channels to d_model;
(ii) a feature enhancer (deformable self-attention on image tokens, self-attention on text,
image-to-text and text-to-image cross-attention); (iii) language-guided query selection (the
top-N image tokens by similarity to the text give anchor boxes, i.e. positional queries; the
content queries are learnt); (iv) a cross-modality decoder (query self-attention, text
cross-attention, deformable image cross-attention, iterative box refinement). A class score is
the sigmoid of a query-text dot product, so any category with a text embedding can be asked for.

Text "tokens" here are categories: one embedding per category name (see engine.models.grounding.features),
so logit [b, q, t] scores query q of image b as the t-th category in that image's list.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from engine.config import (
    GroundingConfig,
    GroundingConfigError,
    GroundingTrainConfig,
    GroundingTrainError,
    ModelConfig,
    from_dict,
)
from engine.models.boxes import cxcywh_to_xyxy, nms
from engine.models.grounding.features import head_inputs
from engine.ops import MSDeformAttn
from engine.runtime.storage import atomic_folder

# A padded text slot's logit: far below any real one, finite so that no loss sees inf * 0.
MASKED_LOGIT = -1e4


# ------------------------------------------------------------------------------------------------
# Small pieces


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


class MLP(nn.Module):
    def __init__(self, dims: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class FFN(nn.Module):
    def __init__(self, d: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, d))
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.drop(self.net(x)))


class CrossAttention(nn.Module):
    """Post-norm residual attention block: x + Attn(x + x_pos, kv + kv_pos, kv)."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: Tensor, kv: Tensor, x_pos: Optional[Tensor] = None, kv_pos: Optional[Tensor] = None,
                kv_padding: Optional[Tensor] = None) -> Tensor:
        q = x if x_pos is None else x + x_pos
        k = kv if kv_pos is None else kv + kv_pos
        out = self.attn(q, k, kv, key_padding_mask=kv_padding, need_weights=False)[0]
        return self.norm(x + self.drop(out))


def sine_embed(coords: Tensor, d: int, temperature: float = 10000.0) -> Tensor:
    """Sine/cosine embedding of each coordinate in [0, 1] (..., K) -> (..., K * d)."""
    dim_t = torch.arange(d // 2, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * dim_t / d)
    pos = coords.float()[..., None] * (2 * math.pi) / dim_t  # (..., K, d/2)
    emb = torch.stack([pos.sin(), pos.cos()], -1).flatten(-2)  # (..., K, d)
    return emb.flatten(-2).to(coords.dtype)


def level_geometry(shapes: list[tuple[int, int]], device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For flattened tokens of all levels: spatial_shapes (L, 2), level_start_index (L,), token
    centres (S, 2) normalised xy, and each token's anchor size (S,) growing with the level's
    stride (a coarse level's token stands for a bigger region)."""
    spatial = torch.tensor(shapes, dtype=torch.long, device=device)
    start = torch.cat([spatial.new_zeros(1), (spatial[:, 0] * spatial[:, 1]).cumsum(0)[:-1]])
    finest = max(h for h, _ in shapes)
    centres, sizes = [], []
    for h, w in shapes:
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                                torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
        centres.append(torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], -1))
        sizes.append(torch.full((h * w,), 0.05 * finest / h, device=device))
    return spatial, start, torch.cat(centres), torch.cat(sizes).clamp(max=0.9)


# ------------------------------------------------------------------------------------------------
# Feature enhancer


class EnhancerLayer(nn.Module):
    """Fuse image and text (Grounding DINO's feature enhancer layer): image-to-text and text-to-image
    cross-attention, then self-attention on text and deformable self-attention on image tokens."""

    def __init__(self, cfg: GroundingConfig):
        super().__init__()
        d, h, p = cfg.d_model, cfg.n_heads, cfg.attn_dropout
        self.image_from_text = CrossAttention(d, h, p)
        self.text_from_image = CrossAttention(d, h, p)
        self.text_self = CrossAttention(d, h, p)
        self.text_ffn = FFN(d, cfg.ffn_dim, p)
        self.image_self = MSDeformAttn(d, cfg.n_levels, h, cfg.n_points)
        self.image_drop = nn.Dropout(p)
        self.image_norm = nn.LayerNorm(d)
        self.image_ffn = FFN(d, cfg.ffn_dim, p)

    def forward(self, image, image_pos, text, text_padding, reference, spatial, start):
        fused_image = self.image_from_text(image, text, kv_padding=text_padding)
        text = self.text_from_image(text, image, kv_pos=image_pos)
        image = fused_image
        text = self.text_ffn(self.text_self(text, text, kv_padding=text_padding))
        attended = self.image_self(image + image_pos, reference, image, spatial, start)
        image = self.image_ffn(self.image_norm(image + self.image_drop(attended)))
        return image, text


# ------------------------------------------------------------------------------------------------
# Cross-modality decoder


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GroundingConfig):
        super().__init__()
        d, h, p = cfg.d_model, cfg.n_heads, cfg.attn_dropout
        self.self_attn = CrossAttention(d, h, p)
        self.text_attn = CrossAttention(d, h, p)
        self.image_attn = MSDeformAttn(d, cfg.n_levels, h, cfg.n_points)
        self.image_drop = nn.Dropout(p)
        self.image_norm = nn.LayerNorm(d)
        self.ffn = FFN(d, cfg.ffn_dim, p)

    def forward(self, query, query_pos, ref_boxes, text, text_padding, memory, spatial, start):
        query = self.self_attn(query, query, x_pos=query_pos, kv_pos=query_pos)
        query = self.text_attn(query, text, x_pos=query_pos, kv_padding=text_padding)
        reference = ref_boxes[:, :, None, :].expand(-1, -1, spatial.shape[0], -1)
        attended = self.image_attn(query + query_pos, reference, memory, spatial, start)
        query = self.image_norm(query + self.image_drop(attended))
        return self.ffn(query)


class ContrastiveScore(nn.Module):
    """logit[b, q, t] = <query, text> / sqrt(d) + bias; padded text slots get MASKED_LOGIT.
    The bias starts at the focal-loss prior (p = 0.01) so early training is not swamped by
    the many negatives."""

    def __init__(self, d: int, prior: float = 0.01):
        super().__init__()
        self.scale = 1.0 / math.sqrt(d)
        # shape (1,), not a 0-dim scalar: safetensors cannot save 0-dim tensors
        self.bias = nn.Parameter(torch.full((1,), -math.log((1 - prior) / prior)))

    def forward(self, query: Tensor, text: Tensor, text_padding: Tensor) -> Tensor:
        logits = torch.einsum("bqd,btd->bqt", query, text) * self.scale + self.bias
        return logits.masked_fill(text_padding[:, None, :], MASKED_LOGIT)


# ------------------------------------------------------------------------------------------------
# The head


class GroundingHead(nn.Module):
    def __init__(self, cfg: GroundingConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.d_model
        # (i) channel compression: one 3x3 conv per scale, GroupNorm as in Grounding DINO's input_proj.
        self.compress = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d, 3, padding=1), nn.GroupNorm(32 if d % 32 == 0 else 1, d))
            for c in cfg.in_channels)
        self.level_embed = nn.Parameter(torch.randn(cfg.n_levels, d) * 0.02)
        self.text_proj = nn.Linear(cfg.text_dim, d)
        # (ii) feature enhancer
        self.enhancer = nn.ModuleList(EnhancerLayer(cfg) for _ in range(cfg.enhancer_layers))
        # (iii) language-guided query selection
        self.proposal_proj = nn.Linear(d, d)
        self.proposal_norm = nn.LayerNorm(d)
        self.content_queries = nn.Embedding(cfg.num_queries, d)
        # (iv) decoder; class scoring and box MLP shared by all layers (Grounding DINO shares them)
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.ref_point_head = MLP([2 * d, d, d])
        self.score = ContrastiveScore(d)
        self.box_mlp = MLP([d, d, d, 4])
        self.proposal_box_mlp = MLP([d, d, d, 4])
        for mlp in (self.box_mlp, self.proposal_box_mlp):  # start as "keep the anchor"
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        self.layer_dropout = nn.Dropout(0.0)

    def set_layer_dropout(self, p: float) -> None:
        self.layer_dropout.p = float(p)

    def forward(self, features: list[Tensor], text: Tensor, text_mask: Tensor) -> dict:
        """features: per level (B, C_l, H_l, W_l), coarsest first, as the UNet's up-blocks give them;
        text: (B, T, text_dim) category embeddings; text_mask: (B, T) bool, True = a real category.

        Returns {"logits": (B, Q, T), "boxes": (B, Q, 4) cxcywh in [0, 1], "aux": [per earlier
        decoder layer and the query-selection proposals: {"logits", "boxes"}]}.
        """
        if len(features) != self.cfg.n_levels:
            raise GroundingConfigError(f"grounding head expects {self.cfg.n_levels} feature levels, "
                                       f"got {len(features)}")
        if text_mask.dtype != torch.bool or text_mask.shape != text.shape[:2]:
            raise GroundingConfigError("text_mask must be a bool (B, T) tensor matching text")
        padding = ~text_mask
        B = text.shape[0]
        # Keep the dtype of the head's weights (bf16 under DeepSpeed) whatever the inputs came as.
        dtype = self.text_proj.weight.dtype
        tokens, shapes = [], []
        for conv, f in zip(self.compress, features):
            x = conv(f.to(dtype))
            shapes.append(tuple(x.shape[-2:]))
            tokens.append(x.flatten(2).transpose(1, 2))
        image = torch.cat(tokens, 1)
        spatial, start, centres, sizes = level_geometry(shapes, image.device)
        level_of = torch.repeat_interleave(torch.arange(len(shapes), device=image.device),
                                           spatial[:, 0] * spatial[:, 1])
        image_pos = (sine_embed(centres, self.cfg.d_model // 2) + self.level_embed[level_of]).to(dtype)
        image_pos = image_pos[None].expand(B, -1, -1)
        reference = centres[None, :, None, :].expand(B, -1, len(shapes), -1).to(dtype)
        text = self.text_proj(text.to(dtype))

        for layer in self.enhancer:
            image, text = layer(image, image_pos, text, padding, reference, spatial, start)
            image, text = self.layer_dropout(image), self.layer_dropout(text)

        # Language-guided query selection: the image tokens most similar to any category.
        memory = self.proposal_norm(self.proposal_proj(image))
        token_logits = self.score(memory, text, padding)  # (B, S, T)
        anchors = torch.cat([centres, sizes[:, None].expand(-1, 2)], -1).to(dtype)  # cxcywh
        token_boxes_unact = self.proposal_box_mlp(memory) + inverse_sigmoid(anchors)[None]
        k = min(self.cfg.num_queries, image.shape[1])
        top = token_logits.max(-1).values.topk(k, dim=1).indices  # (B, k)
        gather = lambda x: torch.gather(x, 1, top[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
        proposal = {"logits": gather(token_logits), "boxes": gather(token_boxes_unact).sigmoid()}
        ref_boxes = proposal["boxes"].detach()  # positional queries from the anchors
        query = self.content_queries.weight[None, :k].expand(B, -1, -1)  # content queries: learnt

        outputs = []
        for layer in self.decoder:
            query_pos = self.ref_point_head(sine_embed(ref_boxes, self.cfg.d_model // 2))
            query = layer(query, query_pos, ref_boxes, text, padding, image, spatial, start)
            query = self.layer_dropout(query)
            boxes = (self.box_mlp(query) + inverse_sigmoid(ref_boxes)).sigmoid()  # iterative refinement
            outputs.append({"logits": self.score(query, text, padding), "boxes": boxes})
            ref_boxes = boxes.detach()
        final = outputs[-1]
        return {"logits": final["logits"], "boxes": final["boxes"], "aux": outputs[:-1] + [proposal]}


# ------------------------------------------------------------------------------------------------
# Predictions -> boxes


@torch.no_grad()
def predictions(out: dict, text_mask: Tensor, threshold: float, nms_iou: float = 0.7,
                max_boxes: int = 100, per_category: int = 0) -> list[list[tuple[int, float, list[float]]]]:
    """Per image: (category index in its text list, score, [x0, y0, x1, y1] normalised) for each
    query-category pair scoring >= threshold, after per-category NMS and keeping at most
    `per_category` boxes of each category (0 = all), best first."""
    # A padded slot scores -1 so that it is never kept, even with threshold 0.
    probs = out["logits"].float().sigmoid().masked_fill(~text_mask[:, None, :], -1.0)
    boxes = cxcywh_to_xyxy(out["boxes"].float()).clamp(0, 1)
    result = []
    for b in range(probs.shape[0]):
        q, t = torch.nonzero(probs[b] >= threshold, as_tuple=True)
        found = []
        for cat in t.unique().tolist():
            sel = q[t == cat]
            s = probs[b, sel, cat]
            keep = nms(boxes[b, sel], s, nms_iou) if nms_iou < 1.0 else s.argsort(descending=True)
            keep = keep[:per_category] if per_category > 0 else keep
            found += [(cat, float(s[k]), boxes[b, sel[k]].tolist()) for k in keep.tolist()]
        found.sort(key=lambda r: -r[1])
        result.append(found[:max_boxes])
    return result


def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for parameters; buffers copied."""
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.mul_(momentum).add_(s.detach().to(t.dtype), alpha=1 - momentum)
        for t, s in zip(teacher.buffers(), student.buffers()):
            t.copy_(s)


def make_teacher(student: nn.Module) -> nn.Module:
    """The mean teacher starts as a copy of the student; it never trains, never drops out."""
    teacher = copy.deepcopy(student).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def build_head(cfg: GroundingConfig, pipe) -> GroundingHead:
    """The head of sizes `cfg` over the pipeline's UNet features and text encoder: the one place
    a grounding head is built from config (load_grounding_head builds a saved one)."""
    in_channels, text_dim = head_inputs(pipe)
    return GroundingHead(dataclasses.replace(cfg, in_channels=in_channels, text_dim=text_dim))


# ------------------------------------------------------------------------------------------------
# The head's folder: what train-grounding writes and the grounding_head labeller reads

HEAD_FILE = "head.safetensors"
CONFIG_FILE = "grounding.json"


def save_grounding_head(folder: str, head: GroundingHead, model: ModelConfig, grounding: GroundingTrainConfig) -> str:
    """head.safetensors + grounding.json (head sizes, the pipeline it reads, its base categories,
    the synthesis steps), written to a temporary folder and moved into place whole."""
    with atomic_folder(folder) as tmp:
        save_file({k: v.detach().float().cpu().clone() for k, v in head.state_dict().items()},
                  os.path.join(tmp, HEAD_FILE))
        meta = {"head": dataclasses.asdict(head.cfg), "model": dataclasses.asdict(model),
                "base": list(grounding.base), "novel": list(grounding.novel),
                "synthesis_steps": grounding.synthesis_steps,
                "text_embedding": "EOS-pooled hidden state of the pipeline's text encoder, one per category name"}
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2)
    return folder


def load_grounding_head(folder: str, device: Optional[str] = None) -> tuple[GroundingHead, dict]:
    """(the head in eval mode, its grounding.json) from a folder written by save_grounding_head."""
    cfg_path, weights = os.path.join(folder, CONFIG_FILE), os.path.join(folder, HEAD_FILE)
    if not (os.path.isfile(cfg_path) and os.path.isfile(weights)):
        raise GroundingTrainError(f"{folder!r} is not a grounding-head folder (it needs {CONFIG_FILE} and "
                                  f"{HEAD_FILE}); train one with `python jobs/train_grounding.py`")
    with open(cfg_path) as f:
        meta = json.load(f)
    head = GroundingHead(from_dict(GroundingConfig, meta["head"]))
    head.load_state_dict(load_file(weights))
    return head.to(device or "cpu").eval(), meta
