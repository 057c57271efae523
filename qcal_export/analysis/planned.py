"""What the accuracy steps work on, handed to them by the orchestrator as one read-only value:
the float model and its plan, the recipe, the model's file and where ONNX Runtime runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from qcal_export.spec.plan import Plan
from qcal_export.spec.recipe import Recipe


@dataclass(frozen=True)
class PlannedModel:
    """The float model (smoothed, if asked) and the plan of what is quantized of it, how
    (``recipe``), its file ``path`` (the float reference; never written) and the ONNX Runtime
    ``providers`` (and CUDA ``device_id``) that run it.

    A step reads these and returns what it found or built; it never edits ``model`` or ``plan``.
    """

    model: onnx.ModelProto
    plan: Plan
    recipe: Recipe
    path: Path
    providers: list[str]
    device_id: int = 0

    @property
    def name(self) -> str:
        """The model's file, as messages name it."""
        return str(self.path)
