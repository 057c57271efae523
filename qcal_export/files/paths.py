"""No output lands on an input or on another output: the paths a run writes, checked against
the paths it reads and against each other before anything is written.

Two paths are the same file when they resolve alike (symlinks, ``..``, relative or absolute),
when both exist and ``os.path.samefile`` says so (hard links), or when the directory entry that
a write replaces (the last component not followed: an atomic rename replaces a link, not its
target) is the other. An output inside the data directory with a suffix the data readers take
(.npz, .npy, images, .txt) would become a batch of the next run, so it is refused too. The
files of a tokenizer directory and a data module are read as well.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from qcal_export.errors import OutputError
from qcal_export.files.atomic import check_writable

DATA_SUFFIXES = (".npz", ".npy", ".png", ".jpg", ".jpeg", ".txt")
"""What the data readers (``capture.data``, ``images``, ``texts``) read from a data directory."""

CHECKPOINT_FILES = ("model.safetensors", "config.json", "hf_quant_config.json")
"""What a serving checkpoint writes (or, for hf_quant_config.json, removes) in its directory."""


@dataclass(frozen=True)
class Place:
    """A file the run reads or writes, and how a message names it (``what``)."""

    what: str
    path: Path

    @cached_property
    def keys(self) -> frozenset[Path]:
        """The file ``path`` names and the directory entry a rename onto it would replace."""
        return frozenset({self.path.resolve(), self.path.parent.resolve() / self.path.name})

    @cached_property
    def inode(self) -> tuple[int, int] | None:
        """(device, inode) of an existing file: hard links share it."""
        try:
            found = self.path.stat()
        except OSError:
            return None
        return found.st_dev, found.st_ino

    def same(self, other: Place) -> bool:
        return bool(self.keys & other.keys) or (
            self.inode is not None and self.inode == other.inode
        )


def check_paths(
    *,
    model: str | Path,
    model_data: Sequence[Path],
    data: Any,
    scales_in: str | Path | None,
    recipe: str | Path | None,
    output: str | Path | None,
    scales: str | Path | None,
    report: str | Path | None,
    state: str | Path | None,
    checkpoint: str | Path | None,
    checkpoint_layouts: Sequence[str],
    data_options: Any = None,
    validate_data: Any = None,
    trt_calib_table: str | Path | None = None,
    html: str | Path | None = None,
) -> frozenset[Path]:
    """OutputError naming both options when an output would overwrite, remove or turn into an
    input (the model, its external data, the data and ``validate_data``, a data module or
    tokenizer directory, ``scales_in``, the recipe file) or another output. Returns the
    resolved files read, which no write may remove.
    """
    reads, data_dirs = _reads(model, model_data, data, scales_in, recipe)
    for source in (data, data_options):
        if hasattr(source, "files_read"):
            reads += [Place(what, path) for what, path in source.files_read()]
    more, more_dir = _data_reads(validate_data, "--validate-data", "validation data")
    reads += more
    data_dirs += [("--validate-data", more_dir)] if more_dir is not None else []
    writes = _writes(output, scales, report, state, checkpoint, checkpoint_layouts)
    if trt_calib_table is not None:
        writes.append(Place(f"--trt-calib-table {trt_calib_table}", Path(trt_calib_table)))
    writes += [Place(f"--html {html}", Path(html))] if html is not None else []
    for write in writes:
        for read in reads:
            if write.same(read):
                raise OutputError(f"{write.what} is {read.what}: give another path")
        for option, data_dir in data_dirs:
            if _becomes_data(write.path, data_dir):
                raise OutputError(
                    f"{write.what} lies in the data directory {data_dir} ({option}), whose "
                    ".npz/.npy, image and .txt files are read as batches: give another path"
                )
    _check_distinct(writes)
    return frozenset(read.path.resolve() for read in reads)


def check_outputs(named: Mapping[str, str | Path | None]) -> None:
    """Each output of ``named`` (option or argument name -> path, None where not written) in a
    writable directory, and no two on the same file; OutputError names them."""
    named = {what: Path(path) for what, path in named.items() if path is not None}
    for what, path in named.items():
        check_writable(path, what)
    _check_distinct([Place(f"{what} {path}", path) for what, path in named.items()])


def _check_distinct(writes: Sequence[Place]) -> None:
    for i, first in enumerate(writes):
        for second in writes[i + 1 :]:
            if first.same(second):
                raise OutputError(
                    f"{first.what} and {second.what} are the same file: give each output its "
                    "own path"
                )


def _reads(
    model: str | Path,
    model_data: Sequence[Path],
    data: Any,
    scales_in: str | Path | None,
    recipe: str | Path | None,
) -> tuple[list[Place], list[tuple[str, Path]]]:
    """Every file the run reads, and the data directory with its option (none for a file or
    in-memory data)."""
    reads = [Place("the input model (MODEL)", Path(model))]
    reads += [Place(f"external data of the input model {model} (MODEL)", f) for f in model_data]
    data_reads, data_dir = _data_reads(data, "--data", "calibration data")
    reads += data_reads
    if scales_in is not None:
        reads.append(Place("the scales file read (--scales-in)", Path(scales_in)))
    if recipe is not None:
        reads.append(Place("the recipe file (--recipe)", Path(recipe)))
    return reads, [("--data", data_dir)] if data_dir is not None else []


def _data_reads(data: Any, option: str, what: str) -> tuple[list[Place], Path | None]:
    """The files of data given as a path, and its directory (None for a file or in memory)."""
    if not isinstance(data, (str, Path)) or data == "random":
        return [], None
    data_dir = Path(data) if Path(data).is_dir() else None
    if data_dir is None:
        return [Place(f"the {what} ({option})", Path(data))], None
    places = [
        Place(f"a {what} file in {data_dir} ({option})", f)
        for f in sorted(data_dir.iterdir())
        if f.suffix.lower() in DATA_SUFFIXES
    ]
    return places, data_dir


def _writes(
    output: str | Path | None,
    scales: str | Path | None,
    report: str | Path | None,
    state: str | Path | None,
    checkpoint: str | Path | None,
    layouts: Sequence[str],
) -> list[Place]:
    """Every file the run writes, named by its option (a checkpoint's, by directory and file)."""
    named = (("-o", output), ("--scales", scales), ("--report", report), ("--state", state))
    writes = [Place(f"{option} {path}", Path(path)) for option, path in named if path is not None]
    if checkpoint is not None:
        folders = (
            [Path(checkpoint)] if len(layouts) == 1 else [Path(checkpoint) / x for x in layouts]
        )
        writes += [
            Place(f"--checkpoint {checkpoint} (its {where / name})", where / name)
            for where in folders
            for name in CHECKPOINT_FILES
        ]
    return writes


def _becomes_data(path: Path, data_dir: Path) -> bool:
    """Whether writing ``path`` puts a file the data reader takes into ``data_dir``."""
    for written in (path.parent.resolve() / path.name, path.resolve()):
        if written.suffix.lower() in DATA_SUFFIXES and _same_directory(written.parent, data_dir):
            return True
    return False


def _same_directory(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
