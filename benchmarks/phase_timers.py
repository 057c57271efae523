"""Per-phase wall times of one run: named functions wrapped by dotted path with perf_counter.

Each wrapped function's time is counted exclusive of the wrapped functions it calls (a stack of
open timers), so the phases add up to at most the wall time and "other" is the rest. A path
that no longer resolves (a function moved or renamed) is reported as not found, never an error.
Imported by the benchmark scripts as a sibling module, like ``harness``.
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

# phase -> dotted paths of the functions whose time it is (module.function or module.Class.method)
PHASES: dict[str, tuple[str, ...]] = {
    "load model": ("qcal_export.onnx_io.model_io.load_model",),
    "hash model file": ("qcal_export.onnx_io.model_io.file_sha256",),
    "check model (onnx checker)": ("qcal_export.onnx_io.model_io.check_model",),
    "pre-process": ("qcal_export.graphs.preprocess.preprocess",),
    "plan targets": ("qcal_export.graphs.targets.find_targets",),
    "tensor types (shape inference)": ("qcal_export.onnx_io.tensor_types.tensor_types",),
    "capture session": (
        "qcal_export.capture.onnxruntime.OrtCapture.__init__",
        "qcal_export.capture.onnxruntime.open_session",
    ),
    "capture passes": ("qcal_export.capture.onnxruntime.OrtCapture.run",),
    "activation scales": ("qcal_export.calibrate.activations.calibrate_activations",),
    "weight calibration": ("qcal_export.calibrate.tensor.calibrate_weights",),
    "weight errors": ("qcal_export.calibrate.tensor.relative_weight_errors",),
    "checkpoints": ("qcal_export.artifacts.onnx_layers.write_checkpoints",),
    "export QDQ": ("qcal_export.graphs.export.export_qdq",),
    "save model": ("qcal_export.onnx_io.model_io.save_model",),
    "validation": ("qcal_export.validation.validate.validate_outputs",),
    "report": ("qcal_export.pipeline.report.build_report",),
}
OTHER = "other (wall - phases)"


@dataclass
class _Open:
    start: float
    inner: float = 0.0


@dataclass
class PhaseTimers:
    """Exclusive seconds and call counts per phase, filled by the wrapped functions."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    found: dict[str, list[str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    profile: bool = False
    sync: Callable[[], None] | None = None
    _local: threading.local = field(default_factory=threading.local)

    @contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        """Count the block's time, less the phases opened inside it, into ``phase``."""
        stack = self._local.__dict__.setdefault("stack", [])
        frame = _Open(time.perf_counter())
        stack.append(frame)
        label = _record_function(phase) if self.profile else nullcontext()
        try:
            with label:
                yield
        finally:
            if self.sync is not None:
                self.sync()
            elapsed = time.perf_counter() - frame.start
            stack.pop()
            if stack:
                stack[-1].inner += elapsed
            self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed - frame.inner
            self.calls[phase] = self.calls.get(phase, 0) + 1

    def table(self, wall: float) -> dict[str, dict[str, float]]:
        """{phase: {seconds, calls}} with "other" = ``wall`` - the phases' sum."""
        rows = {p: {"seconds": s, "calls": self.calls[p]} for p, s in self.seconds.items()}
        rows[OTHER] = {"seconds": wall - sum(self.seconds.values()), "calls": 0}
        return rows


def _record_function(name: str) -> Any:
    from torch.profiler import record_function

    return record_function(name)


def resolve(path: str) -> tuple[Any, str, Any] | None:
    """(owner, attribute, value) of a dotted path: the longest importable module prefix, then
    attributes; None where any part is missing."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:-1]:
            owner = getattr(owner, name, None)
            if owner is None:
                return None
        value = getattr(owner, parts[-1], None)
        return None if value is None else (owner, parts[-1], value)
    return None


def install(timers: PhaseTimers, phases: dict[str, tuple[str, ...]] = PHASES) -> None:
    """Wrap every resolvable function of ``phases``: on its owner (module or class) and in every
    loaded qcal_export module that imported it by name. Unresolved paths go to ``missing``."""
    for phase, paths in phases.items():
        for path in paths:
            found = resolve(path)
            if found is None:
                timers.missing.append(path)
                continue
            owner, name, original = found
            wrapped = _wrap(timers, phase, original)
            setattr(owner, name, wrapped)
            if not isinstance(owner, type):
                _rebind(original, wrapped)
            timers.found.setdefault(phase, []).append(path)


def _wrap(timers: PhaseTimers, phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        with timers.timing(phase):
            return function(*args, **kwargs)

    return timed


def _rebind(original: Any, wrapped: Any) -> None:
    """Point every ``from module import function`` copy in qcal_export's modules at ``wrapped``."""
    for name, module in list(sys.modules.items()):
        if not name.startswith("qcal_export") or module is None:
            continue
        for attribute, value in list(vars(module).items()):
            if value is original:
                setattr(module, attribute, wrapped)
