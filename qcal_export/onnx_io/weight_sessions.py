"""Stored weights for ONNX Runtime: a session's external initializers, and their mapped
pages dropped while it packs them."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np
import onnx
import onnxruntime as ort

from qcal_export.onnx_io.weights import drop_pages, stored_key


def _main_stored(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, np.ndarray]]:
    for init in model.graph.initializer:
        found = stored_key(init)
        if found is not None:
            yield init, found[0].get(found[1])


def _ort_value(array: np.ndarray, elem_type: int) -> ort.OrtValue:
    if array.dtype.kind in "biuf" and array.dtype.type.__module__ == "numpy":
        return ort.OrtValue.ortvalue_from_numpy(array)
    bits = array.view(np.dtype(f"u{array.dtype.itemsize}"))
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, elem_type)


def session_initializers(model: onnx.ModelProto) -> tuple[list[str], list[ort.OrtValue]]:
    """Names and ONNX Runtime values of ``model``'s stored initializers, for
    ``SessionOptions.add_external_initializers`` (keep the values alive with the session)."""
    names, values = [], []
    for init, array in _main_stored(model):
        names.append(init.name)
        values.append(_ort_value(array, init.data_type))
    return names, values


@contextlib.contextmanager
def paging_out(model: onnx.ModelProto, every: float = 0.2) -> Iterator[None]:
    """Within, drop the mapped pages of ``model``'s stored weights every ``every`` seconds
    (``drop_pages``): while ONNX Runtime builds a session it reads each weight once to pack
    it, and the pages it read need not stay resident beside the packed copy."""
    done = threading.Event()

    def drop() -> None:
        while not done.wait(every):
            drop_pages(model)

    thread = threading.Thread(target=drop, name="qcal-paging-out", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        drop_pages(model)
