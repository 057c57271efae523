"""Capture activations with ONNX Runtime: planned tensors become extra graph outputs.

Batches stream through one session; each captured tensor goes straight to its sink (a
calibrator) and is dropped, so memory is one batch plus calibrator state. Under the CUDA EP the
captured tensors stay on the GPU (IOBinding and DLPack: see ``iobinding``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
from onnx import helper

from qcal_export.calibrators.threads import sharing_pool
from qcal_export.capture.data import Batch, DataSource, InputSpec, as_feed, model_inputs
from qcal_export.capture.iobinding import (
    BoundRunError,
    BoundRunner,
    ProviderEntry,
    bind_device_id,
    binding_problem,
    session_device,
)
from qcal_export.errors import DataError, ModelError
from qcal_export.onnx_io.weight_sessions import paging_out, session_initializers
from qcal_export.onnx_io.weights import file_model

log = logging.getLogger(__name__)

ORT_ERRORS = (
    ort.capi.onnxruntime_pybind11_state.Fail,
    ort.capi.onnxruntime_pybind11_state.InvalidArgument,
    ort.capi.onnxruntime_pybind11_state.InvalidGraph,
    ort.capi.onnxruntime_pybind11_state.NotImplemented,
    ort.capi.onnxruntime_pybind11_state.RuntimeException,
)
Sink = Callable[[str, torch.Tensor], None]
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def select_providers(provider: str) -> list[str]:
    """ORT providers for ``auto`` / ``cpu`` / ``cuda``; auto falls back to CPU with a log line."""
    available = ort.get_available_providers()
    if PROVIDERS["cuda"] in available and provider in ("auto", "cuda"):
        _preload_cuda_libraries()
    if provider == "auto":
        if PROVIDERS["cuda"] in available:
            return [PROVIDERS["cuda"], PROVIDERS["cpu"]]
        log.info("CUDAExecutionProvider not available: capturing with CPUExecutionProvider")
        return [PROVIDERS["cpu"]]
    if provider not in PROVIDERS:
        raise DataError(f"unknown provider {provider!r}: choose auto, cpu or cuda")
    if PROVIDERS[provider] not in available:
        raise DataError(
            f"provider {provider!r} requested but this onnxruntime offers {available}: install "
            "onnxruntime-gpu for cuda, or use --provider auto"
        )
    return [PROVIDERS[provider]] + ([PROVIDERS["cpu"]] if provider != "cpu" else [])


@functools.cache
def _preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of the nvidia-* wheels (those torch also uses) before
    the CUDA EP looks for them, where onnxruntime can (>= 1.21); else the system's are used."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except OSError as e:  # a missing library: the session falls back to CPU and says so
            log.warning("onnxruntime.preload_dlls: %s", e)


def open_session(
    model: onnx.ModelProto | Path,
    providers: Sequence[ProviderEntry],
    name: str,
    *,
    extra_outputs: dict[str, int | None] | None = None,
    threads: int | None = None,
) -> ort.InferenceSession:
    """An ORT session over ``model``, optionally exposing ``extra_outputs`` (name -> elem type,
    None where ONNX Runtime is to infer it); ``threads``: its intra-op threads (None: ONNX
    Runtime's default, one per core).

    ``model`` is a proto or a file. The outputs are added to a proto only while it is
    serialized; its stored weights are handed to ONNX Runtime as external initializers, not
    serialized. Worker threads do not spin-wait after a run: between runs the calibrators need
    the same cores.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    if isinstance(model, Path):
        light = file_model(model)
        try:
            if light is not None:
                return stored_session(light, options, providers)
            return ort.InferenceSession(str(model), options, providers=list(providers))
        except ORT_ERRORS as e:
            raise load_error(name, e, providers) from None
    added = _append_outputs(model, extra_outputs or {})
    try:
        return stored_session(model, options, providers)
    except ORT_ERRORS as e:
        raise load_error(name, e, providers) from None
    finally:
        for _ in range(added):
            model.graph.output.pop()


def stored_session(
    model: onnx.ModelProto, options: ort.SessionOptions, providers: Sequence[ProviderEntry]
) -> ort.InferenceSession:
    """An ORT session over ``model``'s serialized graph, its stored weights given as external
    initializers (kept alive with the session: ORT reads them where they are).

    A model file loaded into a store (``weights.file_model``) is opened over that store's
    weights: one copy of them in memory, whichever session reads them."""
    names, values = session_initializers(model)
    if names:
        options.add_external_initializers(names, values)
    with paging_out(model):
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=list(providers)
        )
    session.qcal_weights = values
    return session


def load_error(name: str, error: Exception, providers: Sequence[ProviderEntry]) -> ModelError:
    """ModelError for a session ONNX Runtime refused, in one line; where no provider has a
    kernel for an op on its types (bfloat16 on the CPU, say), what to do instead."""
    message = " ".join(str(error).split())
    if "Could not find an implementation" in message:
        message += (
            f": the providers {[p if isinstance(p, str) else p[0] for p in providers]} have no "
            "kernel for that op on its input types (the CPU provider has none for bfloat16 "
            "MatMul, Gemm, Conv or QuantizeLinear): calibrate a float32 or float16 copy of the "
            "model, or capture on CUDA (--provider cuda)"
        )
    return ModelError(f"ONNX Runtime cannot load {name}: {message}")


def _append_outputs(model: onnx.ModelProto, tensors: dict[str, int | None]) -> int:
    present = {o.name for o in model.graph.output}
    new = [
        helper.make_tensor_value_info(n, t, None) if t is not None else onnx.ValueInfoProto(name=n)
        for n, t in tensors.items()
        if n not in present
    ]
    model.graph.output.extend(new)
    return len(new)


class OrtCapture:
    """One ORT session that feeds the values of ``tensors`` to a sink, batch by batch.

    ``device_id``: the GPU the CUDA EP runs on, unless its providers entry names one (ignored
    on the CPU). ``iobinding``: None runs with IOBinding where the session computes on CUDA, so
    the sink gets CUDA tensors with no host copy; True also on the CPU (outputs bound to
    ``cpu``); False always through a plain ``session.run`` (numpy outputs, on the host).
    ``device`` says where the sink's tensors are. ``sink_workers``: on the host, the tensors
    of a batch go to the sink from this many threads at once (sharing the cores among their
    torch operations), each name from one thread; a sink must then take different names
    concurrently.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        tensors: dict[str, int],
        *,
        providers: Sequence[ProviderEntry],
        name: str = "model",
        device_id: int = 0,
        iobinding: bool | None = None,
        sink_workers: int = 1,
    ):
        if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
            raise DataError(f"device_id must be a GPU index >= 0, not {device_id!r}")
        self.inputs: list[InputSpec] = model_inputs(model, name)
        input_names = {spec.name for spec in self.inputs}
        self.fed = [t for t in tensors if t in input_names]
        self.fetched = [t for t in tensors if t not in input_names]
        self._session = open_session(
            model,
            bind_device_id(providers, device_id),
            name,
            extra_outputs={t: tensors[t] for t in self.fetched},
        )
        device = session_device(self._session)
        use_binding = device.type == "cuda" if iobinding is None else iobinding
        problem = binding_problem(device) if use_binding else None
        if problem and iobinding:
            raise DataError(f"iobinding=True: {problem}; use iobinding=None or False")
        if problem:
            log.warning("%s: captured tensors are copied to the host", problem)
            use_binding = False
        self._bound = BoundRunner(self._session, device) if use_binding else None
        self.device = device if use_binding else torch.device("cpu")
        self._sink_workers = sink_workers if self.device.type == "cpu" else 1

    def run(
        self,
        source: DataSource,
        sink: Sink,
        *,
        tensors: Sequence[str] | None = None,
        max_batches: int | None = None,
        on_batch: Callable[[], None] | None = None,
        skip: int = 0,
        after_batch: Callable[[int], None] | None = None,
        allow_empty: bool = False,
    ) -> int:
        """Stream one pass over ``source``; returns the number of batches (none is an error
        unless ``allow_empty``: one rank's share of a distributed run may be empty).

        The first ``skip`` batches are counted but not run (a resumed calibration holds them);
        ``after_batch(count)`` follows every batch that ran.
        """
        wanted = set(self.fed + self.fetched) if tensors is None else set(tensors)
        fetched = [t for t in self.fetched if t in wanted]
        fed = [t for t in self.fed if t in wanted]
        count = 0
        with _sink_pool(self._sink_workers) as pool:
            feed_all = functools.partial(_feed, sink, pool)
            for index, (batch, item) in enumerate(source.pairs()):
                if max_batches is not None and index >= max_batches:
                    break
                if index < skip:
                    count += 1
                    continue
                self._capture_batch(batch, item, fetched, fed, feed_all)
                count += 1
                if on_batch is not None:
                    on_batch()
                if after_batch is not None:
                    after_batch(count)
        _check_count(count, skip, source, allow_empty=allow_empty)
        return count

    def _capture_batch(
        self,
        batch: int,
        item: Any,
        fetched: list[str],
        fed: list[str],
        feed_all: Callable[[list[tuple[str, torch.Tensor]]], None],
    ) -> None:
        """Run one batch and hand ``feed_all`` its ``fetched`` outputs and its ``fed`` inputs;
        a bound run's device buffers are released once the sink is done with them."""
        feed = as_feed(item, self.inputs, batch)
        try:
            values, inputs = self._run_batch(fetched, feed)
        except (*ORT_ERRORS, BoundRunError) as e:
            raise DataError(f"batch {batch}: ONNX Runtime failed on it: {e}") from None
        feed_all([*zip(fetched, values, strict=True), *((n, inputs[n]) for n in fed)])
        del values, inputs, feed
        if self._bound is not None:
            self._bound.release()

    def _run_batch(
        self, fetched: list[str], feed: Batch
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """The ``fetched`` outputs and the inputs of one batch, as tensors on ``self.device``."""
        if self._bound is not None:
            return self._bound.run(fetched, feed)
        values = self._session.run(fetched, feed) if fetched else []
        inputs = {name: torch.from_numpy(array) for name, array in feed.items()}
        return [torch.from_numpy(v) for v in values], inputs


@contextmanager
def _sink_pool(workers: int) -> Iterator[ThreadPoolExecutor | None]:
    """Threads that feed a sink for one pass, the cores shared among their torch operations
    meanwhile; None for one."""
    if workers <= 1:
        yield None
        return
    with sharing_pool(workers, "qcal-sink") as pool:
        yield pool


def _feed(
    sink: Sink, pool: ThreadPoolExecutor | None, pairs: list[tuple[str, torch.Tensor]]
) -> None:
    """Every (name, value) to ``sink``: in order without ``pool``, else the largest first
    across its threads, returning once every call has (then raising the first failure)."""
    if pool is None:
        for name, value in pairs:
            sink(name, value)
        return
    largest = sorted(pairs, key=lambda pair: pair[1].numel(), reverse=True)
    futures = [pool.submit(sink, name, value) for name, value in largest]
    wait(futures)
    for future in futures:
        future.result()


def _check_count(count: int, skip: int, source: DataSource, *, allow_empty: bool) -> None:
    """A pass saw at least one batch (unless ``allow_empty``) and every batch a resumed state
    says it had done."""
    if count == 0 and not allow_empty:
        raise DataError(f"calibration data {source.description} yielded no batch")
    if count < skip:
        raise DataError(
            f"the resumed state has {skip} batches of this pass done, but calibration data "
            f"{source.description} has only {count}: resume with the same data"
        )
