"""One benchmark row in a fresh process, watched from outside: wall time, the child's own peak
RSS (``wait4``'s ``ru_maxrss``, also when it fails), the GPU's peak used memory (NVML, else
``nvidia-smi``, polled while it runs), a timeout, and a failure told as OOM / timeout / exit.

ONNX Runtime's CUDA allocations do not show in ``torch.cuda.max_memory_allocated``, so the
device-wide used memory is the number that covers both; its baseline is taken just before.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POLL_S = 0.1
REPO = Path(__file__).resolve().parents[1]
GPU_OOM = ("out of memory", "CUDA_ERROR_OUT_OF_MEMORY", "Failed to allocate memory")


class GpuMemory:
    """Used memory of one GPU in MiB (``used()``), or None where there is no NVIDIA GPU."""

    def __init__(self, index: int = 0) -> None:
        self.index, self.source, self._handle = index, "none", None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.source = "nvml"
        except Exception:  # no nvidia-ml-py, no driver or no such GPU: try nvidia-smi
            if shutil.which("nvidia-smi") and self._smi() is not None:
                self.source = "nvidia-smi"

    def used(self) -> float | None:
        if self.source == "nvml":
            return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20
        if self.source == "nvidia-smi":
            return self._smi()
        return None

    def name(self) -> str:
        if self.source == "nvml":
            name = self._nvml.nvmlDeviceGetName(self._handle)
            return name.decode() if isinstance(name, bytes) else str(name)
        if self.source == "nvidia-smi":
            return self._query("name") or "unknown GPU"
        return "no GPU"

    def _smi(self) -> float | None:
        value = self._query("memory.used")
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    def _query(self, field: str) -> str | None:
        command = ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"]
        command.append(f"--id={self.index}")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None


@dataclass
class Watched:
    """What the parent saw of one child process."""

    returncode: int | None
    seconds: float
    peak_rss_mib: float
    gpu_baseline_mib: float | None
    gpu_peak_mib: float | None
    timed_out: bool
    log_tail: str

    def failure(self, timeout_s: float) -> str | None:
        """None if the child exited 0, else what went wrong in a few words and the log's tail."""
        if self.timed_out:
            return f"timeout after {timeout_s:.0f} s"
        if self.returncode == 0:
            return None
        if self.returncode == -signal.SIGKILL:
            return "killed (SIGKILL: host out of memory?)"
        if any(marker in self.log_tail for marker in GPU_OOM):
            return f"GPU out of memory (exit {self.returncode})"
        if "MemoryError" in self.log_tail:
            return f"host out of memory (exit {self.returncode})"
        return f"exit {self.returncode}"

    def to_dict(self) -> dict[str, Any]:
        gpu = None
        if self.gpu_peak_mib is not None and self.gpu_baseline_mib is not None:
            gpu = self.gpu_peak_mib - self.gpu_baseline_mib
        return {
            "process_s": self.seconds,
            "peak_rss_mib": self.peak_rss_mib,
            "gpu_baseline_mib": self.gpu_baseline_mib,
            "gpu_peak_used_mib": self.gpu_peak_mib,
            "gpu_peak_mib": gpu,
        }


def child_env(root: Path) -> dict[str, str]:
    """This environment with ``root`` first on PYTHONPATH (the checkout's qcal_export, not an
    installed copy; what the caller put on PYTHONPATH, onnxruntime-gpu say, follows)."""
    paths = [str(root), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def watch(command: list[str], log: Path, timeout_s: float, gpu: GpuMemory) -> Watched:
    """Run ``command`` (its output into ``log``) in its own session, with the repository first
    on PYTHONPATH; kill its process group after ``timeout_s``. Polls the GPU's used memory
    every ``POLL_S`` while it runs."""
    baseline = gpu.used()
    peak = baseline
    start = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=child_env(REPO),
        )
        timed_out, status, usage = False, 0, None
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            used = gpu.used()
            if used is not None:
                peak = used if peak is None else max(peak, used)
            if time.perf_counter() - start > timeout_s and not timed_out:
                timed_out = True
                os.killpg(child.pid, signal.SIGKILL)
            time.sleep(POLL_S)
        child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
    return Watched(
        child.returncode,
        seconds,
        usage.ru_maxrss / 1024 if usage else 0.0,
        baseline,
        peak,
        timed_out,
        tail,
    )
