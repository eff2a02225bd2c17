"""Pure loss functions of progressive distillation (UKMP Eq. 13).

* :func:`normalized_mse` — MSE between feature tensors each divided by the Frobenius norm of the *whole batch
  tensor* (``feature_norm=True`` in the reference); the tiny per-element scale is why the betas are huge.
* :func:`kl_teacher_student` — KL(teacher || student) on logits at temperature 1, averaged over every position
  (padded positions included), summed over the vocabulary.
* :func:`lpd_loss` — one sub-stage's total: ``Σ_g β_g Σ_l MSE_l`` (+ CE) (+ KL), with the parts for logging.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

# β per feature family (Eq. 13): ViT blocks, T5 encoder blocks, T5 decoder blocks
BETAS: dict[str, float] = {"vision": 1e6, "encoder": 1e9, "decoder": 1e8}
_EPS = 1e-12


def normalized_mse(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """``mean((fs/||fs||_F - ft/||ft||_F)^2)`` over all elements, computed in fp32; norms over the whole tensor."""
    if fs.shape != ft.shape:
        raise ValueError(f"normalized_mse: student features {tuple(fs.shape)} and teacher {tuple(ft.shape)} differ")
    fs = fs.float()
    ft = ft.float()
    a = fs / fs.norm().clamp_min(_EPS)
    b = ft / ft.norm().clamp_min(_EPS)
    return F.mse_loss(a, b, reduction="mean")


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``(1/N) Σ_positions Σ_v q (log q - log p)``; q = teacher softmax, p = student softmax, N = all positions."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kl_teacher_student: logits shapes {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)} differ")
    log_p = F.log_softmax(student_logits.float(), dim=-1)
    log_q = F.log_softmax(teacher_logits.float(), dim=-1)
    per_position = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    return per_position.mean()


def lpd_loss(
    student_feats: Mapping[str, torch.Tensor],
    teacher_feats: Mapping[str, torch.Tensor],
    mse_layers: Mapping[str, tuple[int, ...] | list[int]],
    *,
    use_task: bool,
    use_kl: bool,
    ce: torch.Tensor | None = None,
    student_logits: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    betas: Mapping[str, float] = BETAS,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of one sub-stage and its parts (floats, for logging).

    Features are keyed ``"{family}.{layer}"`` (``family`` in ``betas``: vision / encoder / decoder).
    """
    total: torch.Tensor | None = None
    parts: dict[str, float] = {}

    def add(term: torch.Tensor) -> None:
        nonlocal total
        total = term if total is None else total + term

    for family, layers in mse_layers.items():
        if not layers:
            continue
        if family not in betas:
            raise ValueError(f"mse_layers: unknown feature family {family!r} (choose from {sorted(betas)})")
        fam = None
        for i in layers:
            key = f"{family}.{i}"
            if key not in student_feats or key not in teacher_feats:
                raise ValueError(f"lpd_loss: feature {key!r} was not captured")
            m = normalized_mse(student_feats[key], teacher_feats[key])
            fam = m if fam is None else fam + m
        weighted = betas[family] * fam
        parts[f"mse_{family}"] = float(weighted.detach())
        add(weighted)
    if use_task:
        if ce is None:
            raise ValueError("lpd_loss: use_task needs the student's CE loss (pass labels to the model)")
        parts["ce"] = float(ce.detach())
        add(ce.float())
    if use_kl:
        if student_logits is None or teacher_logits is None:
            raise ValueError("lpd_loss: use_kl needs student and teacher logits")
        kl = kl_teacher_student(student_logits, teacher_logits)
        parts["kl"] = float(kl.detach())
        add(kl)
    if total is None:
        raise ValueError("lpd_loss: the sub-stage has no loss term (no MSE layers, no task, no KL)")
    parts["loss"] = float(total.detach())
    return total, parts
