"""Resumable calibration: calibrator state saved every N batches, and a run that continues it.

The state file (``torch.save``, written atomically) holds the pass and the batches done in it,
every calibrator's raw ``snapshot`` for that pass (and the first pass's, once in the second),
and what the run was started with: the model's sha256, the recipe and the batch options (with
the whole config beside them, for the record). A resumed run checks those, restores the
calibrators, skips the batches already seen and goes on, so its scales equal those of a run
that was never interrupted (the data must come in the same order).
A sha256 of the whole state is saved with it: torch.load reads a file with flipped bytes without
complaint, so a damaged or edited state file is refused instead of resumed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from qcal_export.errors import DataError
from qcal_export.files.atomic import check_writable, write_file
from qcal_export.spec.checks import check_state_every

log = logging.getLogger(__name__)

SCHEMA = "qcal_export.state/2"
CONFIG = "config"
"""The identity's key that records the run's config (not compared on resume)."""
FIELDS = ("schema", "identity", "pass", "batches", "snapshots", "first_pass", "first_pass_batches")


class Stateful(Protocol):
    def snapshot(self) -> dict[str, torch.Tensor]: ...

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None: ...


@dataclass(frozen=True)
class Progress:
    """Where a saved run stopped: ``batches`` done in pass ``pass_number`` (1 or 2)."""

    pass_number: int
    batches: int
    snapshots: dict[str, dict[str, torch.Tensor]]
    first_pass: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    first_pass_batches: int = 0


class StateFile:
    """Saves calibrator state to ``path`` every ``every`` batches; ``resume`` reads it back.

    ``identity`` (model checksum, recipe, batch limit) must match for a resume: a state saved
    for another model or recipe is refused with the difference named. ``config``: the run's
    options as plain data, saved beside the identity for the record and never compared.
    """

    def __init__(
        self,
        path: str | Path,
        identity: Mapping[str, Any],
        *,
        every: int = 100,
        config: Mapping[str, Any] | None = None,
    ):
        check_state_every(every)
        self.path = check_writable(path, "state file")
        self.compared = tuple(identity)
        recorded = {**identity, CONFIG: dict(config or {})}
        self.identity = json.loads(json.dumps(recorded, default=str))
        self.every = every
        self._first_pass: dict[str, dict[str, torch.Tensor]] = {}
        self._first_pass_batches = 0

    def resume(self) -> Progress | None:
        """The saved progress, or None (and a log line) when there is no state file yet."""
        if not self.path.exists():
            log.info("no state file %s: starting from the first batch", self.path)
            return None
        if not self.path.is_file():
            raise DataError(f"state file {self.path} is not a regular file: give another --state")
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises anything from EOFError to UnpicklingError
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            raise DataError(f"state file {self.path} is damaged ({reason}): delete it") from None
        if not isinstance(saved, dict) or saved.get("schema") != SCHEMA:
            raise DataError(f"state file {self.path} is not a {SCHEMA} file: delete it")
        problem = _damage(saved)
        if problem:
            raise DataError(f"state file {self.path} is damaged ({problem}): delete it")
        for key in self.compared:
            if saved["identity"].get(key) != self.identity[key]:
                raise DataError(
                    f"state file {self.path} was saved with another {key} than this run's: "
                    "resume with the same model, recipe and options, or delete it"
                )
        progress = Progress(
            saved["pass"],
            saved["batches"],
            saved["snapshots"],
            saved["first_pass"],
            saved["first_pass_batches"],
        )
        self._first_pass = progress.first_pass
        self._first_pass_batches = progress.first_pass_batches
        log.info("resuming pass %d after batch %d", progress.pass_number, progress.batches)
        return progress

    def saver(self, pass_number: int, objects: Mapping[str, Stateful]) -> Any:
        """A callback for each finished batch of a pass: saves every ``every`` batches."""

        def after_batch(batches: int) -> None:
            if batches % self.every == 0:
                self.save(pass_number, batches, objects)

        return after_batch

    def end_first_pass(self, objects: Mapping[str, Stateful], batches: int) -> None:
        """Keep the first pass's final state; the second pass's saves carry it."""
        self._first_pass = _snapshots(objects)
        self._first_pass_batches = batches
        self.save(2, 0, {})

    def save(self, pass_number: int, batches: int, objects: Mapping[str, Stateful]) -> None:
        state = {
            "schema": SCHEMA,
            "identity": self.identity,
            "pass": pass_number,
            "batches": batches,
            "snapshots": _snapshots(objects),
            "first_pass": self._first_pass if pass_number == 2 else {},
            "first_pass_batches": self._first_pass_batches,
        }
        state["sha256"] = state_digest(state)
        buffer = io.BytesIO()  # torch.save reports a full disk as a bare RuntimeError
        torch.save(state, buffer)
        write_file(self.path, buffer.getvalue(), "state file")

    def finish(self) -> None:
        """The run completed: the state file is no longer needed."""
        self.path.unlink(missing_ok=True)


def _snapshots(objects: Mapping[str, Stateful]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: obj.snapshot() for name, obj in objects.items()}


def restore_all(objects: Mapping[str, Stateful], snapshots: Mapping[str, dict]) -> None:
    """Restore each object from its snapshot; DataError if the saved run had other tensors."""
    if set(snapshots) != set(objects):
        raise DataError(
            f"the state file holds tensors {sorted(set(snapshots) - set(objects))[:3]} this run "
            f"does not, or lacks {sorted(set(objects) - set(snapshots))[:3]}: delete it"
        )
    for name, obj in objects.items():
        obj.restore(snapshots[name])


def state_digest(state: Mapping[str, Any]) -> str:
    """sha256 of a state's ``FIELDS``: the scalars as JSON, every tensor's name, dtype, shape
    and bytes (CPU tensors, as ``snapshot`` gives and ``torch.load`` maps them)."""
    digest = hashlib.sha256()
    scalars = {k: state[k] for k in FIELDS if k not in ("snapshots", "first_pass")}
    digest.update(json.dumps(scalars, sort_keys=True).encode())
    for part in ("snapshots", "first_pass"):
        for name, snapshot in sorted(state[part].items()):
            for key, tensor in sorted(snapshot.items()):
                data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                where = [part, name, key, str(tensor.dtype), list(tensor.shape), data.size]
                digest.update(json.dumps(where).encode())
                digest.update(data.tobytes())
    return digest.hexdigest()


def _damage(saved: dict) -> str | None:
    """What is wrong with a loaded state's structure or checksum; None when it is intact."""
    if set(saved) != {*FIELDS, "sha256"}:
        return f"keys {sorted(map(str, saved))}, not {sorted([*FIELDS, 'sha256'])}"
    counts = (saved["pass"], saved["batches"], saved["first_pass_batches"])
    if not all(type(n) is int and n >= 0 for n in counts) or saved["pass"] not in (1, 2):
        return f"pass {counts[0]!r}, batches {counts[1]!r}, first pass {counts[2]!r}"
    if not isinstance(saved["identity"], dict):
        return f"identity {type(saved['identity']).__name__}, not a mapping"
    for part in ("snapshots", "first_pass"):
        if not _is_snapshots(saved[part]):
            return f"{part} are not tensors by name"
    try:
        intact = saved["sha256"] == state_digest(saved)
    except (TypeError, ValueError):  # an identity that JSON cannot hold
        intact = False
    return None if intact else "its contents do not match their sha256"


def _is_snapshots(value: object) -> bool:
    """``{name: {key: CPU strided tensor}}``, as ``_snapshots`` builds."""
    return isinstance(value, dict) and all(
        isinstance(name, str)
        and isinstance(snapshot, dict)
        and all(
            isinstance(key, str)
            and type(tensor) is torch.Tensor
            and tensor.layout == torch.strided
            and tensor.device.type == "cpu"
            and not tensor.is_quantized
            for key, tensor in snapshot.items()
        )
        for name, snapshot in value.items()
    )
