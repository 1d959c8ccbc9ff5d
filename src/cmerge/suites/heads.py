"""Frozen zero-shot classification heads, as in the OPCM paper's Appendix B.

There, each task's head is the pre-trained CLIP text encoder's embedding of the class
names; it never changes, so the pre-trained model has a real zero-shot accuracy and
every fine-tuned or merged encoder is scored against the same head. Here the text
encoder and the "class name" encoder are the same sentence encoder: a head row is the
pre-trained encoder's normalised embedding of one label description, and

    logits = LOGIT_SCALE · cos(embedding(text), row)

``LOGIT_SCALE`` is 20 (temperature 0.05), the default scale of sentence-transformers'
in-batch contrastive loss, the objective all-MiniLM-L6-v2 was trained with; CLIP's
learned scale, 100, is the same idea for an encoder trained at that temperature. The
scale changes the losses, not the zero-shot accuracy (the arg-max is the same).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from cmerge.suites.backbone import embed, tokenize

LOGIT_SCALE = 20.0


@torch.no_grad()  # not inference_mode: the head must be usable in training graphs
def zero_shot_head(model: torch.nn.Module, tokenizer, descriptions: Sequence[str], max_len: int = 64) -> torch.Tensor:
    """The head (C × d, unit rows): the encoder's embeddings of the C label descriptions.

    Call it with the pre-trained encoder; the result is a plain tensor, detached from
    the model, so later fine-tuning cannot move it.
    """
    if len(descriptions) < 2:
        raise ValueError(f"a classification head needs at least two label descriptions, got {len(descriptions)}")
    was_training = model.training
    model.eval()
    try:
        batch = tokenize(tokenizer, descriptions, max_len)
        rows = embed(model, batch["input_ids"], batch["attention_mask"])
    finally:
        model.train(was_training)
    return F.normalize(rows.float(), dim=-1)


def cosine_logits(features: torch.Tensor, head: torch.Tensor, scale: float = LOGIT_SCALE) -> torch.Tensor:
    """``scale · cos(features, head rows)``: B × C logits from B × d features and a C × d unit head
    (moved to the features' device)."""
    return scale * F.normalize(features, dim=-1) @ head.to(features.device).t()
