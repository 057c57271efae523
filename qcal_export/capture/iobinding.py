"""Device-resident capture: ORT writes each captured tensor where the session runs, and DLPack
hands that memory to torch, so activations captured under the CUDA EP never visit the host.

Each batch's inputs are copied to the device once (ORT's own copy); every captured output is
bound to the device, so ORT allocates it there, and comes back as a torch tensor sharing ORT's
buffer. The same path runs on the CPU (outputs bound to ``cpu``), where tests compare it with
a plain ``session.run``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

CUDA_PROVIDER = "CUDAExecutionProvider"
ProviderEntry = str | tuple[str, dict[str, Any]]


class BoundRunError(RuntimeError):
    """ONNX Runtime failed to run a batch through the binding (its message says why)."""


def bind_device_id(providers: Sequence[ProviderEntry], device_id: int) -> list[ProviderEntry]:
    """``providers`` as ORT takes them, the CUDA EP bound to GPU ``device_id``.

    An entry that already carries options keeps them, ``device_id`` added where it has none.
    """
    bound: list[ProviderEntry] = []
    for entry in providers:
        name, options = (entry, {}) if isinstance(entry, str) else entry
        if name == CUDA_PROVIDER:
            options = {"device_id": str(device_id), **options}
        bound.append((name, options) if options else name)
    return bound


def session_device(session: ort.InferenceSession) -> torch.device:
    """Where the session computes: ``cuda:N`` under the CUDA EP (N from its options), else the
    CPU. Read from what the session really got: ORT falls back to the CPU when the CUDA EP fails
    to load."""
    if session.get_providers()[0] != CUDA_PROVIDER:
        return torch.device("cpu")
    options = session.get_provider_options().get(CUDA_PROVIDER, {})
    return torch.device("cuda", int(options.get("device_id", 0)))


def binding_problem(device: torch.device) -> str | None:
    """Why captured tensors on ``device`` cannot reach torch without a host copy, or None."""
    c_value = ort.capi.onnxruntime_pybind11_state.OrtValue
    if not any(hasattr(c, "__dlpack__") for c in (ort.OrtValue, c_value)) and not hasattr(
        c_value, "to_dlpack"
    ):
        return f"onnxruntime {ort.__version__} offers no DLPack export of its tensors"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"ONNX Runtime runs on {device} but this torch has no CUDA to take its tensors"
    return None


def to_torch(value: ort.OrtValue) -> torch.Tensor:
    """The tensor an OrtValue holds, as a torch tensor on its device sharing its memory.

    onnxruntime >= 1.32 exposes ``__dlpack__`` on the public OrtValue; from 1.21 its C value
    does. The torch tensor keeps ORT's buffer alive; nothing is copied.
    """
    if hasattr(value, "__dlpack__"):
        return torch.from_dlpack(value)
    inner = value._ortvalue
    if hasattr(inner, "__dlpack__"):
        return torch.from_dlpack(inner)
    return torch.from_dlpack(inner.to_dlpack())


class BoundRunner:
    """Runs one session with IOBinding, its outputs allocated on ``device``.

    ``run`` returns torch tensors on ``device``: the captured outputs and the fed inputs.
    """

    def __init__(self, session: ort.InferenceSession, device: torch.device):
        self.session = session
        self.device = device
        self._ort_device = (device.type, device.index or 0)

    def run(
        self, outputs: Sequence[str], feed: Mapping[str, np.ndarray]
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Run one batch; ``outputs`` in order, and ``feed``'s arrays as seen by the session.

        With no output asked for the session does not run, and only the inputs come back.
        """
        binding = self.session.io_binding()
        bound_inputs = {}
        for name, array in feed.items():
            value = ort.OrtValue.ortvalue_from_numpy(array, *self._ort_device)
            binding.bind_ortvalue_input(name, value)
            bound_inputs[name] = value
        values: list[torch.Tensor] = []
        if outputs:
            for name in outputs:
                binding.bind_output(name, *self._ort_device)
            binding.synchronize_inputs()
            try:
                self.session.run_with_iobinding(binding)
            except RuntimeError as e:  # what run_with_iobinding raises on a failed run
                raise BoundRunError(str(e)) from None
            binding.synchronize_outputs()
            values = [to_torch(v) for v in binding.get_outputs()]
        if self.device.type == "cpu":
            inputs = {name: torch.from_numpy(array) for name, array in feed.items()}
        else:
            inputs = {name: to_torch(v) for name, v in bound_inputs.items()}
        return values, inputs

    def release(self) -> None:
        """Wait for the device work queued on the batch's tensors before ORT may reuse them.

        The tensors live in ORT's memory arena, which knows nothing of torch's streams: once
        they are dropped, the next run may overwrite memory that a calibrator kernel still reads.
        """
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
