"""The samples method ``auto`` scores its candidates on: the first ones of the data, in stages
that double the samples scored, so that a candidate clearly worse on the first samples is not
scored on the others.
"""

from __future__ import annotations

import numpy as np

from qcal_export.capture.data import DataSource, feeds
from qcal_export.capture.source import Batch, InputSpec


def first_samples(source: DataSource, inputs: list[InputSpec], samples: int) -> list[Batch]:
    """The batches of ``source`` that hold its first ``samples`` samples, the last one cut
    along the leading axis where every input's leading dim is free (else kept whole)."""
    views: list[Batch] = []
    taken = 0
    for feed in feeds(source, inputs):
        if taken >= samples:
            break
        size = sample_count(feed)
        if _free(feed, inputs) and size > samples - taken:
            feed = {name: value[: samples - taken] for name, value in feed.items()}
            size = samples - taken
        views.append(feed)
        taken += size
    return views


def sample_stages(views: list[Batch], inputs: list[InputSpec]) -> list[list[Batch]]:
    """``views`` as stages that double the samples scored so far: the first holds one sample,
    the next one more, then 2, 4, ... (the last what is left), so that the candidates clearly
    worse on the first samples are dropped after few runs (``method_choice``). A view is cut
    along its leading axis where every input's is free, else kept whole in the stage it starts
    (which then holds more); the views as one stage where they hold one sample."""
    stages: list[list[Batch]] = [[]]
    bound, taken = 1, 0
    for view in views:
        rest: Batch | None = view
        while rest is not None:
            if taken >= bound:
                stages.append([])
                while taken >= bound:
                    bound *= 2
            size, room = sample_count(rest), bound - taken
            if size > room and _free(rest, inputs):
                stages[-1].append({name: value[:room] for name, value in rest.items()})
                rest, taken = {name: value[room:] for name, value in rest.items()}, bound
            else:
                stages[-1].append(rest)
                rest, taken = None, taken + size
    return stages


def sample_count(feed: Batch) -> int:
    """Samples in ``feed``: its inputs' common leading dim (1 where there is none)."""
    return shared_leading_dim(feed) or 1


def shared_leading_dim(feed: Batch) -> int | None:
    """The leading dim every input of ``feed`` has; None where they differ or one is a
    scalar."""
    sizes = {np.shape(v)[0] if np.ndim(v) else None for v in feed.values()}
    return sizes.pop() if len(sizes) == 1 else None


def _free(feed: Batch, inputs: list[InputSpec]) -> bool:
    """Whether every input of ``feed`` has a free leading dim (the model takes any batch)."""
    return all(i.dims and i.dims[0] is None for i in inputs if i.name in feed)
