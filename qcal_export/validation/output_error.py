"""The one definition of a model's output error against a reference model, accumulated in
float64 over batches: what validation, the verdict, the per-layer view, the precision search
and the held-out report all measure.

Per graph output, over every finite element of every batch (the output flattened, batches
concatenated), with ``r`` the reference's values and ``c`` the candidate's:

- ``rel_l2 = ‖c - r‖ / ‖r‖`` (``‖c - r‖`` where ``‖r‖ = 0``);
- ``cosine = ⟨r, c⟩ / (‖r‖ ‖c‖)`` (1 where a norm is 0 and ``c = r``, else 0 there);
- ``max_abs = max |c - r|``.

Elements where either model gives NaN or an infinity are left out of the sums and counted:
``nonfinite_float`` where the reference's own value is not finite (data with inf, say),
``nonfinite_quantized`` where only the candidate's is (an overflow quantization introduced).
A configuration's error (``worst``) is that of its worst output: the least cosine and the largest
rel_l2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Errors = dict[str, dict[str, float]]
"""Per graph output, its ``max_abs``, ``rel_l2``, ``cosine`` and non-finite counts."""


@dataclass
class _Sums:
    """The float64 sums behind one output's error."""

    max_abs: float = 0.0
    diff_sq: float = 0.0
    ref_sq: float = 0.0
    cand_sq: float = 0.0
    dot: float = 0.0
    nonfinite_float: int = 0
    nonfinite_quantized: int = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        ref = np.asarray(reference).astype(np.float64).ravel()
        cand = np.asarray(candidate).astype(np.float64).ravel()
        finite_ref = np.isfinite(ref)
        finite = finite_ref & np.isfinite(cand)
        if not finite.all():
            self.nonfinite_float += int((~finite_ref).sum())
            self.nonfinite_quantized += int((finite_ref & ~finite).sum())
            ref, cand = ref[finite], cand[finite]
        diff = cand - ref
        self.max_abs = max(self.max_abs, float(np.abs(diff).max(initial=0.0)))
        self.diff_sq += float(diff @ diff)
        self.ref_sq += float(ref @ ref)
        self.cand_sq += float(cand @ cand)
        self.dot += float(ref @ cand)

    def summary(self) -> dict[str, float]:
        norms = math.sqrt(self.ref_sq * self.cand_sq)
        return {
            "max_abs": self.max_abs,
            "rel_l2": math.sqrt(self.diff_sq / self.ref_sq)
            if self.ref_sq
            else math.sqrt(self.diff_sq),
            "cosine": self.dot / norms if norms else float(self.diff_sq == 0.0),
            "nonfinite_float": self.nonfinite_float,
            "nonfinite_quantized": self.nonfinite_quantized,
        }


class ErrorTally:
    """Running output error of a candidate model against a reference, per graph output, over
    batches (see the module docstring for the definitions).

    ``add`` takes one batch's outputs of both models, in ``outputs`` order; ``sums[name]`` holds
    one output's float64 sums (``diff_sq``, ``ref_sq``, ``cand_sq``, ``dot``).
    """

    def __init__(self, outputs: Sequence[str]):
        self.outputs = list(outputs)
        self.sums = {name: _Sums() for name in self.outputs}
        self.batches = 0

    def add(self, references: Sequence[np.ndarray], candidates: Sequence[np.ndarray]) -> None:
        """Accumulate one batch: the reference's and the candidate's outputs, in order."""
        for name, ref, cand in zip(self.outputs, references, candidates, strict=True):
            self.sums[name].add(ref, cand)
        self.batches += 1

    def per_output(self) -> Errors:
        """Each output's ``max_abs``, ``rel_l2``, ``cosine`` and non-finite counts."""
        return {name: sums.summary() for name, sums in self.sums.items()}

    def worst(self) -> dict[str, float]:
        """The worst output's error: the least cosine and the largest rel_l2 (1 and 0 with no
        output)."""
        errors = self.per_output().values()
        return {
            "cosine": min((e["cosine"] for e in errors), default=1.0),
            "rel_l2": max((e["rel_l2"] for e in errors), default=0.0),
        }
