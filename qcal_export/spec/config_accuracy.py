"""The accuracy steps' group of the run's config (``CalibrationConfig.accuracy``): the per-layer
view, a precision target, the mixed-format list, method auto's samples and smoothing; each field
declares its command-line flag as the other groups do (``config_groups.cli``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qcal_export.spec.checks import check_accuracy, check_formats, check_targets
from qcal_export.spec.config_groups import cli
from qcal_export.spec.formats import FORMATS as FORMAT_REGISTRY


@dataclass(frozen=True)
class AccuracyConfig:
    """The steps beyond calibrating: the per-layer view, the precision search for a target on
    held-out batches, and smoothing first."""

    layer_view: bool = field(
        default=False,
        metadata=cli(
            "--layer-view",
            action="store_true",
            help="report each quantized node's SQNR and its output error when quantized alone",
        ),
    )
    target_cosine: float | None = field(
        default=None,
        metadata=cli(
            "--target-cosine",
            type="float",
            metavar="C",
            exclusive="target",
            help="leave the fewest nodes float so that held-out batches reach this output cosine",
        ),
    )
    target_rel_l2: float | None = field(
        default=None,
        metadata=cli(
            "--target-rel-l2",
            type="float",
            metavar="E",
            exclusive="target",
            help="the same for a relative L2 error",
        ),
    )
    formats: tuple[str, ...] | None = field(
        default=None,
        metadata=cli(
            "--formats",
            type="format_list",
            metavar="F1,F2,..",
            help="with a target: each node gets the cheapest of these formats (cheapest first, "
            "e.g. nvfp4,fp8,int8; float is always last) that keeps the target",
        ),
    )
    holdout_every: int = field(
        default=5,
        metadata=cli(
            "--holdout-every",
            type="int",
            metavar="N",
            help="every Nth batch is held out from calibration, for validation and targets "
            "(default 5; with fewer batches, validation uses the calibration batches)",
        ),
    )
    view_batches: int = field(
        default=4,
        metadata=cli(
            "--view-batches", type="int", metavar="N", help="batches of the view (default 4)"
        ),
    )
    auto_samples: int = field(
        default=4,
        metadata=cli(
            "--auto-samples",
            type="int",
            metavar="N",
            help="method auto scores its candidates on the first N samples (default 4)",
        ),
    )
    smooth: float | None = field(
        default=None,
        metadata=cli(
            "--smooth",
            type="float",
            metavar="ALPHA",
            help="migrate activation outliers into the weights first (SmoothQuant alpha, e.g. 0.5)",
        ),
    )

    def __post_init__(self) -> None:
        check_targets(self.target_cosine, self.target_rel_l2)
        object.__setattr__(self, "formats", check_formats(self.formats, FORMAT_REGISTRY))
        check_accuracy(self.holdout_every, self.view_batches, self.smooth, self.auto_samples)
