"""The grounding loss (paper Eq. 2): each query is matched one-to-one to a target box or to
"no object" by the Hungarian algorithm on a focal + L1 + GIoU cost; matched queries pay focal
classification, L1 and GIoU box losses, unmatched ones pay only the focal "no object" term. The
same loss is applied to every decoder layer's output and to the query-selection proposals
(auxiliary losses), as in DINO / Grounding DINO.

Targets, per image: {"labels": (n,) long, index into that image's category list;
"boxes": (n, 4) cxcywh normalised to [0, 1]}.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from engine.config import LossConfig
from engine.models.boxes import cxcywh_to_xyxy, generalized_iou, xyxy_to_cxcywh


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss (Lin et al.): -alpha_t (1 - p_t)^gamma log p_t."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t) ** gamma * ce


@torch.no_grad()
def hungarian_match(logits: Tensor, boxes: Tensor, targets: list[dict], cfg: LossConfig) -> list[tuple[Tensor, Tensor]]:
    """Per image, (query indices, target indices) of the minimum-cost one-to-one assignment."""
    matches = []
    for b, tgt in enumerate(targets):
        n = len(tgt["labels"])
        if n == 0:
            empty = torch.zeros(0, dtype=torch.long)
            matches.append((empty, empty))
            continue
        p = logits[b].float().sigmoid()[:, tgt["labels"]]  # (Q, n)
        a, g = cfg.focal_alpha, cfg.focal_gamma
        pos = a * (1 - p) ** g * -(p + 1e-8).log()
        neg = (1 - a) * p ** g * -(1 - p + 1e-8).log()
        pred, true = boxes[b].float(), tgt["boxes"].float()
        cost = (cfg.cost_class * (pos - neg) + cfg.cost_l1 * torch.cdist(pred, true, p=1)
                - cfg.cost_giou * generalized_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(true)))
        q, t = linear_sum_assignment(cost.cpu().numpy())
        matches.append((torch.as_tensor(q, dtype=torch.long), torch.as_tensor(t, dtype=torch.long)))
    return matches


def set_loss(logits: Tensor, boxes: Tensor, text_mask: Tensor, targets: list[dict], cfg: LossConfig,
             num_boxes: float) -> dict[str, Tensor]:
    """Loss of one set of predictions (B, Q, T) / (B, Q, 4), normalised by the batch's box count."""
    matches = hungarian_match(logits, boxes, targets, cfg)
    onehot = torch.zeros_like(logits, dtype=torch.float32)
    for b, (q, t) in enumerate(matches):
        onehot[b, q.to(logits.device), targets[b]["labels"][t].to(logits.device)] = 1.0
    # Only real categories count: a padded text slot is no prediction at all.
    valid = text_mask[:, None, :].expand_as(onehot).float()
    focal = sigmoid_focal_loss(logits.float(), onehot, cfg.focal_alpha, cfg.focal_gamma)
    loss_class = (focal * valid).sum() / num_boxes
    pred = torch.cat([boxes[b, q.to(boxes.device)] for b, (q, _) in enumerate(matches)]).float()
    true = torch.cat([targets[b]["boxes"][t] for b, (_, t) in enumerate(matches)]).to(pred)
    if len(pred):
        loss_l1 = (pred - true).abs().sum() / num_boxes
        loss_giou = (1 - torch.diag(generalized_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(true)))).sum() / num_boxes
    else:  # no boxes in the batch: keep the graph connected so every rank runs the same backward
        loss_l1 = loss_giou = boxes.sum() * 0.0
    return {"class": loss_class, "l1": loss_l1, "giou": loss_giou}


def grounding_loss(out: dict, text_mask: Tensor, targets: list[dict],
                   cfg: LossConfig) -> tuple[Tensor, dict[str, float]]:
    """Eq. 2 summed over the final output and every auxiliary output; returns (loss, parts)."""
    num_boxes = max(1.0, float(sum(len(t["labels"]) for t in targets)))
    total = 0.0
    parts: dict[str, float] = {}
    for i, o in enumerate([{"logits": out["logits"], "boxes": out["boxes"]}] + out["aux"]):
        lo = set_loss(o["logits"], o["boxes"], text_mask, targets, cfg, num_boxes)
        weighted = cfg.weight_class * lo["class"] + cfg.weight_l1 * lo["l1"] + cfg.weight_giou * lo["giou"]
        total = total + weighted
        if i == 0:
            parts = {k: float(v.detach()) for k, v in lo.items()}
    return total, parts


def targets_from_boxes(labels: list[list[int]], boxes_xyxy: list[np.ndarray], device=None) -> list[dict]:
    """Build targets from per-image label indices and xyxy boxes normalised to [0, 1]."""
    out = []
    for lab, bx in zip(labels, boxes_xyxy):
        b = torch.as_tensor(np.asarray(bx, dtype=np.float32).reshape(-1, 4), device=device)
        out.append({"labels": torch.as_tensor(lab, dtype=torch.long, device=device), "boxes": xyxy_to_cxcywh(b)})
    return out
