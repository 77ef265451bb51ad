"""Distillation: one student 2D network trained on the full ensemble's per-slice probabilities.

``ichd train PARAMS --stage distill`` (:mod:`ichdlib.distill.train`) trains the student of ``distill.backbone``
(default: the first 2D backbone) once per patient fold on the other folds' training slices, with the
blend of notebook 05 (OOF rows) as soft targets, so the student has honest out-of-fold predictions; the
fold student with the best held-out loss relative to the label-frequency prior is the one deployed
(``ichd export --profile student``: one network, one view, no sequence model). Outputs, under
``work/<run>/distill/<key>/``: ``fold<k>.pt`` (the 2D checkpoint format), ``oof.parquet``, ``test.parquet``
(the deployed student) and ``done.json`` (deployed fold, scores, seconds).

This package's top level holds only the output layout, so inference code can find a student without
importing the training loop.
"""

from __future__ import annotations

from typing import Any

from ichdlib.layout import ModelDir


def student_cfg(P: Any) -> Any:
    """The student's :class:`ichdlib.config.BackboneCfg` (``distill.backbone`` or the first 2D backbone)."""
    return P.distill.backbone or P.cnn.backbones[0]


def student_dir(P: Any) -> ModelDir:
    """The student's folder ``work/<run>/distill/<key>`` (:meth:`ichdlib.layout.RunLayout.distill`)."""
    return P.layout.distill(student_cfg(P).key)
