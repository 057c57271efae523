"""benchmarks/bench_llm_gpu.py end to end on the tiny LLM with the CPU provider: its rows run in
child processes and land in the JSON and the table, ours' max scales equal ORT MinMax's on the
tensors both quantize; and its helpers: the phase timers, the child watcher, ORT's histogram
memory estimate."""

from __future__ import annotations

import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import bench_llm_gpu  # noqa: E402
import llm_model  # noqa: E402
import llm_rows  # noqa: E402
import phase_timers  # noqa: E402
import row_process  # noqa: E402


def quantize_scales(path: Path) -> dict[str, np.ndarray]:
    """{tensor: scale} of every QuantizeLinear of a QDQ model (activations: weights are
    stored quantized, behind a DequantizeLinear alone)."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {
        n.input[0]: inits[n.input[1]] for n in model.graph.node if n.op_type == "QuantizeLinear"
    }


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory) -> tuple[Path, Path]:
    """The script's ours-max and ort-minmax rows on the tiny model (CPU): (results, work)."""
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    argv = ["--provider", "cpu", "--size", "tiny", "--sequences", "6", "--seq", "16"]
    argv += ["--batch", "4", "--rows", "ours-max,ort-minmax", "--keep-outputs"]
    argv += ["--work", str(work), "--out-dir", str(out), "--budget-s", "0"]
    assert bench_llm_gpu.main(argv) == 0
    return out, work


def test_rows_land_in_the_json_and_the_table(bench_run):
    out, _ = bench_run
    results = json.loads((out / "llm_cpu_tiny.json").read_text())
    assert set(results["rows"]) == {"ours-max", "ort-minmax"}
    for row in results["rows"].values():
        assert "error" not in row, row
        assert row["sequences"] == 6 and row["batches"] == 2  # 4 + the 2 left over
        assert row["peak_rss_mib"] > 0 and row["samples_per_s"] > 0
        assert row["files"]["q.onnx"] > 0
    ours = results["rows"]["ours-max"]
    phases = ours["phases"]
    assert phases["capture passes"]["calls"] == 1
    timed = sum(p["seconds"] for name, p in phases.items() if name != phase_timers.OTHER)
    assert timed <= ours["call_s"]  # exclusive times add up to at most the call
    assert phases[phase_timers.OTHER]["seconds"] == pytest.approx(ours["call_s"] - timed)
    table = (out / "llm_cpu_tiny.md").read_text()
    assert "| ours-max | ort-minmax | 6 |" in table
    assert "| capture passes |" in table


def test_ours_max_scales_equal_ort_minmax_scales(bench_run):
    _, work = bench_run
    ours = quantize_scales(work / "rows" / "ours-max" / "q.onnx")
    theirs = quantize_scales(work / "rows" / "ort-minmax" / "q.onnx")
    shared = sorted(set(ours) & set(theirs))
    # every projection's input (4 a layer, 2 layers) and the LM head's at least
    assert len(shared) >= 9, (sorted(ours), sorted(theirs))
    for tensor in shared:
        np.testing.assert_allclose(ours[tensor], theirs[tensor], rtol=1e-6, err_msg=tensor)


def test_a_second_call_keeps_the_rows_it_has(bench_run):
    out, work = bench_run
    before = json.loads((out / "llm_cpu_tiny.json").read_text())["rows"]
    argv = ["--provider", "cpu", "--size", "tiny", "--sequences", "6", "--seq", "16"]
    argv += ["--batch", "4", "--rows", "ours-max", "--work", str(work), "--out-dir", str(out)]
    assert bench_llm_gpu.main(argv) == 0
    after = json.loads((out / "llm_cpu_tiny.json").read_text())["rows"]
    assert after == before


def test_ort_histogram_memory_estimate_is_what_ort_fetches(bench_run):
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    _, work = bench_run
    model = work / "tiny-float32" / "model.onnx"
    for seq in (8, 24):
        with tempfile.TemporaryDirectory() as tmp:
            calibrator = create_calibrator(
                str(model),
                ["MatMul", "Gemm"],
                augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                calibrate_method=CalibrationMethod.Percentile,
                use_external_data_format=True,
                providers=["CPUExecutionProvider"],
            )
            batch = llm_model.calibration_batches("tiny", count=1, batch=1, seq=seq)[0]
            held = sum(o.nbytes for o in calibrator.infer_session.run(None, batch))
        assert llm_rows.ort_histogram_bytes_per_sequence("tiny", seq, "float32") == held


def test_phase_times_exclude_the_phases_inside(monkeypatch):
    module = types.ModuleType("qcal_export_fake_phases")

    def inner() -> None:
        pass

    def outer() -> None:
        module.inner()

    module.inner, module.outer = inner, outer
    monkeypatch.setitem(sys.modules, module.__name__, module)
    clock = iter([0.0, 1.0, 3.0, 6.0])  # outer opens, inner opens, inner closes, outer closes
    monkeypatch.setattr(phase_timers.time, "perf_counter", lambda: next(clock))
    timers = phase_timers.PhaseTimers()
    phases = {
        "outer": (f"{module.__name__}.outer",),
        "inner": (f"{module.__name__}.inner",),
        "gone": (f"{module.__name__}.moved_away", "no_such_package.function"),
    }
    phase_timers.install(timers, phases)
    module.outer()
    assert timers.seconds == {"inner": 2.0, "outer": 4.0}
    assert timers.calls == {"inner": 1, "outer": 1}
    assert timers.missing == list(phases["gone"])
    assert timers.table(10.0)[phase_timers.OTHER]["seconds"] == 4.0


def test_watch_tells_timeout_gpu_oom_and_exit(tmp_path):
    gpu = row_process.GpuMemory()
    slow = row_process.watch(
        [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "a.log", 1.0, gpu
    )
    assert slow.timed_out and slow.failure(1.0) == "timeout after 1 s"
    oom = "import sys; print('CUDA error: out of memory'); sys.exit(1)"
    assert (
        row_process.watch([sys.executable, "-c", oom], tmp_path / "b.log", 60, gpu).failure(60)
        == "GPU out of memory (exit 1)"
    )
    big = "import numpy as np; a = np.ones(300 * 2**20, np.uint8); raise SystemExit(3)"
    done = row_process.watch([sys.executable, "-c", big], tmp_path / "c.log", 60, gpu)
    assert done.failure(60) == "exit 3" and done.peak_rss_mib >= 300
