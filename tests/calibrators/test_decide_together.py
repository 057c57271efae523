"""Histogram calibrators decided together give each its own decision.

``decide_together`` runs one ``_decide`` over several calibrators' histograms side by side (as
groups of one state); every decision is per group, so each calibrator's share must equal what
it decides alone, bit for bit, whatever its range (bin width) and format. A later collect
makes a calibrator decide anew. ``decide_apart`` (the host's way: one thread per calibrator)
must give the same decisions and keep them.
"""

from __future__ import annotations

import pytest
import torch

from qcal_export.calibrators.entropy import EntropyCalibrator
from qcal_export.calibrators.hist_mse import HistogramMseCalibrator
from qcal_export.calibrators.histogram import decide_apart, decide_together
from qcal_export.calibrators.percentile import PercentileCalibrator
from qcal_export.spec.formats import get_format
from qcal_export.spec.granularity import PerTensor


def tensors(seed: int) -> list[torch.Tensor]:
    """Heavy-tailed tensors of ranges far apart (different bin widths), one all zeros."""
    generator = torch.Generator().manual_seed(seed)
    made = [
        torch.distributions.StudentT(3.0).sample((6, 300)) * scale
        for scale in (1e-3, 0.5, 7.0, 300.0)
    ]
    made.append(torch.rand(6, 300, generator=generator) * 40 - 3)
    made.append(torch.zeros(6, 300))
    return made


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("fmt", ["int8", "uint8", "fp8"])
@pytest.mark.parametrize("kind", [PercentileCalibrator, EntropyCalibrator, HistogramMseCalibrator])
def test_decided_together_each_decides_as_alone(kind, fmt, device):
    torch.manual_seed(0)
    batches = [[x.to(device) for x in tensors(seed)] for seed in (1, 2)]
    together = [kind(get_format(fmt), PerTensor()) for _ in batches[0]]
    alone = [kind(get_format(fmt), PerTensor()) for _ in batches[0]]
    for batch in batches:
        for cal, twin, x in zip(together, alone, batch, strict=True):
            cal.collect(x)
            twin.collect(x)
    decide_together(together)
    for cal, twin in zip(together, alone, strict=True):
        got, want = cal.compute_range(), twin.compute_range()
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    together[2].collect(torch.full((4,), 1e4, device=device))  # a new state decides anew
    alone[2].collect(torch.full((4,), 1e4, device=device))
    assert torch.equal(together[2].compute_range()[1], alone[2].compute_range()[1])


def refuse_to_decide(self):
    raise AssertionError("decided again: the kept decision was not used")


@pytest.mark.parametrize("kind", [PercentileCalibrator, EntropyCalibrator, HistogramMseCalibrator])
def test_decided_apart_each_decides_as_alone_and_keeps_it(kind, monkeypatch):
    """``decide_apart``: the host's calibrators decided from threads, torch on one each."""
    data = tensors(4)
    apart = [kind(get_format("int8"), PerTensor()) for _ in data]
    alone = [kind(get_format("int8"), PerTensor()) for _ in data]
    for cal, twin, x in zip(apart, alone, data, strict=True):
        cal.collect(x)
        twin.collect(x)
    threads = torch.get_num_threads()
    decide_apart(apart, workers=3)
    assert torch.get_num_threads() == threads
    wanted = [twin.compute_range() for twin in alone]
    monkeypatch.setattr(kind, "_decide", refuse_to_decide)
    for cal, want in zip(apart, wanted, strict=True):
        assert all(torch.equal(g, w) for g, w in zip(cal.compute_range(), want, strict=True))
    assert len({float(w[1]) for w in wanted}) == len(wanted)  # ranges far apart: all differ
