"""The race method ``auto`` runs among each activation's candidates on the CPU: all are scored on
the first sample, and after each stage of samples (``auto_samples.sample_stages``) only those
still near the best go on, until one is left, the samples run out, or those left differ too
little to matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SCREEN_MARGIN = 0.4
"""After one sample, a candidate whose squared output error exceeds the best candidate's by more
than this fraction is not scored on further samples; after ``n`` samples, by more than
``SCREEN_MARGIN / sqrt(n)``, as the noise of an error summed over samples shrinks."""
INDIFFERENCE = 0.03
"""An activation is decided once the candidates left in its race differ in squared output error
by at most this fraction of a typical activation's error (``Race.typical``) over the samples
scored (at least ``MIN_TIED``): whichever of them is picked then moves the model's output error
by a small share of what each activation adds to it, and more samples would only refine a
choice that does not matter."""
MIN_TIED = 2
"""Samples an activation is scored on before its candidates may tie: on one sample a range that
clips the rare large values can look as good as a wider one because that sample holds none."""


@dataclass
class Score:
    """A candidate's squared output error, the float outputs' squared norm, over the samples
    it was scored on."""

    error: float = 0.0
    norm: float = 0.0
    samples: int = 0

    def add(self, error: float, norm: float, samples: int) -> None:
        self.error += error
        self.norm += norm
        self.samples += samples

    @property
    def relative(self) -> float:
        return math.sqrt(self.error / (self.norm or 1.0))


@dataclass
class Race:
    """The races of the activations scored so far, one session of gates after another: each
    finished activation's least error per sample, the scale of ``INDIFFERENCE``."""

    finished: list[float] = field(default_factory=list)

    def typical(self, running: dict[str, dict[str, Score]]) -> float:
        """The mean, over the finished activations and those of ``running`` (activation ->
        method -> score), of an activation's least squared error per sample."""
        least = self.finished + [_least(scores) for scores in running.values()]
        return sum(least) / len(least) if least else 0.0

    def finish(self, scores: dict[str, dict[str, Score]]) -> None:
        """Count the activations of ``scores`` (activation -> method -> score) as finished."""
        self.finished += [_least(methods) for methods in scores.values()]


def screened(scores: dict[str, Score], methods: list[str], typical: float) -> list[str]:
    """Of ``methods`` (each scored on the same samples), those to score on the next stage:
    within the margin (``SCREEN_MARGIN``) of the best; none where one is left, or where those
    left tie: after ``MIN_TIED`` samples or more, they differ by at most ``INDIFFERENCE`` of
    ``typical`` per sample scored."""
    if not methods:
        return []
    samples = max(scores[m].samples for m in methods)
    best = min(scores[m].error for m in methods)
    bound = (1 + SCREEN_MARGIN / math.sqrt(samples)) * best
    kept = [m for m in methods if scores[m].error <= bound]
    spread = max(scores[m].error for m in kept) - best
    if len(kept) < 2 or (samples >= MIN_TIED and spread <= INDIFFERENCE * typical * samples):
        return []
    return kept


def _least(scores: dict[str, Score]) -> float:
    """The least squared error per sample among ``scores`` that were scored."""
    return min((s.error / s.samples for s in scores.values() if s.samples), default=0.0)
