"""The markdown report of bench_llm_gpu.py from its JSON: header, rows, ours/ORT ratios, the
phase table of our rows, the files written and the failures. Imported as a sibling module."""

from __future__ import annotations

from typing import Any

import llm_rows
import phase_timers


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def header(results: dict[str, Any]) -> list[str]:
    s, env, model = results["settings"], results["environment"], results["model"]
    build = results.get("build", {})
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    hist = s["hist_sequences"]
    return [
        f"# LLM calibration, whole call: qcal_export vs ORT quantize_static ({s['provider']})",
        "",
        f"- date: {env['date']}; device: {env['device']}; host: {env['host']}",
        f"- versions: {versions}",
        f"- ORT providers available: {', '.join(env['ort_providers'])}",
        f"- model: `benchmarks/llm_model.py --size {s['size']}` (seeded Llama), "
        f"{model['parameters'] / 1e6:,.0f}M parameters, {s['dtype']}, "
        f"{model['bytes'] / 2**20:,.0f} MiB on disk (external data); exported in "
        f"{build.get('seconds', float('nan')):.0f} s (peak RSS "
        f"{_mib(build.get('peak_rss_mib'))} MiB), outside the comparison",
        f"- data: {s['sequences']} sequences of {s['seq']} tokens in batches of {s['batch']} "
        f"(random token ids, seeded; every other batch's last row half padding); "
        f"histogram rows (`data` = hist): the first {hist} sequences ({hist_reason(results)})",
        "",
    ]


def hist_reason(results: dict[str, Any]) -> str:
    s = results["settings"]
    estimate = s.get("ort_hist_bytes_per_sequence")
    if not estimate:
        return "as given"
    return (
        f"ORT's Percentile/Entropy hold every calibrated tensor of every batch in host memory, "
        f"about {estimate / 2**30:.2f} GiB a sequence here; {s['hist_sequences_source']}"
    )


def rows_table(results: dict[str, Any]) -> list[str]:
    model_mib = results["model"]["bytes"] / 2**20
    lines = [
        "| row | format | method | data | sequences | call (s) | process (s) | samples/s "
        "| peak RSS (MiB) | RSS / model | GPU used, peak - baseline (MiB) "
        "| torch CUDA peak (MiB) | status |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results["rows"].items():
        row = llm_rows.ROWS.get(name, llm_rows.ROWS["ours-max"])
        status = r.get("error", "ok")
        if "error" in r:
            lines.append(
                f"| {name} | {row.format} | {row.method} | {row.data} | | | "
                f"{r.get('process_s', 0):.0f} | | {_mib(r.get('peak_rss_mib'))} | "
                f"{_ratio(r.get('peak_rss_mib'), model_mib)} | {_mib(r.get('gpu_peak_mib'))} "
                f"| | {status} |"
            )
            continue
        lines.append(
            f"| {name} | {r['format']} | {r['method']} | {row.data} | {r['sequences']} "
            f"| {r['call_s']:.1f} | {r['process_s']:.1f} | {r['samples_per_s']:.2f} "
            f"| {_mib(r['peak_rss_mib'])} | {_ratio(r['peak_rss_mib'], model_mib)} "
            f"| {_mib(r['gpu_peak_mib'])} | {_mib(r.get('torch_peak_cuda_mib'))} | ok |"
        )
    return lines


def ratio_table(results: dict[str, Any]) -> list[str]:
    ok = {n: r for n, r in results["rows"].items() if "error" not in r}
    pairs = [(a, b) for a, b in llm_rows.PAIRS if a in ok and b in ok]
    if not pairs:
        return ["(no ours/ORT pair measured yet)"]
    lines = [
        "Ours vs ORT on the same batches (samples/s ratio > 1: ours is faster; RSS ratio < 1: "
        "ours holds less):",
        "",
        "| ours | ORT | sequences | ours samples/s | ORT samples/s | samples/s ours / ORT "
        "| peak RSS ours / ORT | GPU peak ours / ORT |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for a, b in pairs:
        x, y = ok[a], ok[b]
        lines.append(
            f"| {a} | {b} | {x['sequences']} | {x['samples_per_s']:.2f} | "
            f"{y['samples_per_s']:.2f} | {_ratio(x['samples_per_s'], y['samples_per_s'])} | "
            f"{_ratio(x['peak_rss_mib'], y['peak_rss_mib'])} | "
            f"{_ratio(x['gpu_peak_mib'], y['gpu_peak_mib'])} |"
        )
    return lines


def phase_table(results: dict[str, Any]) -> list[str]:
    ours = {n: r for n, r in results["rows"].items() if "phases" in r}
    if not ours:
        return []
    names = list(ours)
    order = [*phase_timers.PHASES, phase_timers.OTHER]
    lines = [
        "Per phase, seconds (calls), exclusive of the phases inside it (perf_counter around the "
        "named functions, CUDA synchronised at each phase's end on CUDA rows):",
        "",
        "| phase | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for phase in order:
        cells = []
        for name in names:
            entry = ours[name]["phases"].get(phase)
            if entry is None:
                cells.append("")
            elif phase == phase_timers.OTHER:
                cells.append(f"{entry['seconds']:.2f}")
            else:
                cells.append(f"{entry['seconds']:.2f} ({entry['calls']})")
        if any(cells):
            lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lines.append("| whole call | " + " | ".join(f"{ours[n]['call_s']:.2f}" for n in names) + " |")
    missing = sorted({m for r in ours.values() for m in r.get("phases_missing", [])})
    if missing:
        lines += ["", "Not found (moved or renamed; not timed): " + ", ".join(missing)]
    timings = {n: r.get("library_timings", {}) for n, r in ours.items()}
    lines += ["", "The library's own `result.timings` (s):", ""]
    lines += [
        f"- {n}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()) for n, t in timings.items()
    ]
    return lines


def files_table(results: dict[str, Any]) -> list[str]:
    lines = ["| row | files written (MiB) |", "|---|---|"]
    for name, r in results["rows"].items():
        if "files" in r:
            listed = ", ".join(f"`{f}` ({b / 2**20:,.1f})" for f, b in r["files"].items())
            lines.append(f"| {name} | {listed} |")
    return lines


def notes(results: dict[str, Any]) -> list[str]:
    s = results["settings"]
    return [
        "Notes:",
        "- Every row is a fresh process (`bench_llm_gpu.py --row`); call = the one "
        "`calibrate_onnx` / `quantize_static` call (samples/s = sequences / call); process = "
        "the child's whole life (imports, data, call, file listing). Peak RSS: the child's "
        "`ru_maxrss` (wait4). GPU: device-wide used memory polled by the parent every 0.1 s "
        "(NVML or nvidia-smi), minus its value before the row: it covers ORT's CUDA arena, "
        "which torch's `max_memory_allocated` (the torch column) does not see.",
        "- Ours: `calibrate_onnx(model, batches, format=..., method=..., provider="
        f"'{s['provider']}', validate_batches=0, output=...)`; int8 rows with "
        "`weight_method='max', per_channel_weights=True`; ours-nvfp4 with "
        "`method='nvfp4-mse', hessian=True, checkpoint=..., checkpoint_layouts=('modelopt', "
        "'compressed-tensors')`; ours-fp8 `format='fp8'` (method max, per-channel weights) "
        "with `checkpoint_layouts=('compressed-tensors',)`. Validation is off on "
        "every row (ORT has none; an NVFP4 model of this size has no fast ORT-runnable "
        "validation yet).",
        "- ORT: `quantize_static(QuantFormat.QDQ, activation_type=QUInt8, weight_type=QInt8, "
        "per_channel=True, op_types_to_quantize=['MatMul', 'Gemm'], "
        "use_external_data_format=True, calibration_providers=[...], "
        "extra_options={'ActivationSymmetric': False, "
        "'OpTypesToExcludeOutputQuantization': ['MatMul', 'Gemm']})`, the same batches "
        "through a CalibrationDataReader, no `quant_pre_process`: uint8 asymmetric "
        "activations and int8 per-channel weights, as ours' int8 under its default ort target, "
        "so both quantize the same tensors the same way (max and MinMax give equal scales: "
        "tests/test_bench_llm_gpu.py).",
        "- Failed rows (OOM, timeout) are rows of the table, with the reason in `status`.",
    ]


def render(results: dict[str, Any]) -> str:
    lines = [*header(results), *rows_table(results), "", *ratio_table(results), ""]
    lines += [*phase_table(results), "", *files_table(results), "", *notes(results)]
    failed = [(n, r) for n, r in results["rows"].items() if "error" in r]
    for name, r in failed:
        lines += ["", f"{name} failed: {r['error']}", "", "```", r.get("log_tail", ""), "```"]
    if results.get("profile_table"):
        lines += ["", f"torch.profiler table of one ours-max run: `{results['profile_table']}`"]
    return "\n".join(lines) + "\n"
