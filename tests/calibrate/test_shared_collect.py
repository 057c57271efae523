"""Under method ``auto`` a tensor's candidates that keep the same state collect it once.

Percentile, entropy and hist-mse decide from the same histogram, and max from the running range
that histogram's state holds: one calibrator collects, the others take its state. Each
candidate's range must then be the one its own calibrator finds collecting alone.
"""

from __future__ import annotations

import torch

from qcal_export.calibrate.activations import _collectors, _copy_shared, candidate_specs
from qcal_export.calibrate.tensor import first_pass_calibrator, make_calibrator
from qcal_export.spec.granularity import PerTensor
from qcal_export.spec.recipe import TensorSpec


def test_auto_candidates_collect_one_histogram_and_decide_as_if_alone():
    specs = dict(candidate_specs("x", TensorSpec(format="int8", method="auto")))
    cals = {key: make_calibrator(spec, PerTensor(), "skip") for key, spec in specs.items()}
    firsts = {key: first_pass_calibrator(cal) for key, cal in cals.items()}
    owners = {key: ("x", spec) for key, spec in specs.items()}
    collectors = _collectors(firsts, owners)
    assert len(collectors["x"]) == 1
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 96, generator=generator) * (1 + 5 * i) for i in range(3)]
    for batch in batches:
        collectors["x"][0](batch)
    _copy_shared(firsts, owners)
    for key, spec in specs.items():
        alone = make_calibrator(spec, PerTensor(), "skip")
        for batch in batches:
            alone.collect(batch)
        got, want = firsts[key].compute_range(), alone.compute_range()
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), key
