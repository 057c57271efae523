"""What AWQ's search keeps of a layer input during a capture pass: the mean ``|x|`` per input
channel, and a bounded, evenly spaced sample of its rows to measure the layer's output error on.

The sample holds the rows whose index (counted over every row collected) is a multiple of a
stride, the stride doubling whenever more than ``limit`` rows are held; the state merges across
ranks (sums added, samples joined at the larger stride).
"""

from __future__ import annotations

import torch


class InputSample:
    """Per-channel sum of ``|x|`` (float64) and a sample of at most ``limit`` rows (float32) of
    a layer input ``[..., K]``; rows holding a NaN or an infinity are left out of both."""

    def __init__(self, limit: int):
        self.limit = limit
        self.reset()

    def reset(self) -> None:
        self.abs_sum: torch.Tensor | None = None
        self.count = 0
        self.rows: torch.Tensor | None = None
        self.stride = 1

    @property
    def mean_abs(self) -> torch.Tensor | None:
        """The mean ``|x|`` per channel ``[K]`` (float64), None before any row."""
        return None if self.abs_sum is None or not self.count else self.abs_sum / self.count

    def collect(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        rows = x.detach().reshape(-1, x.shape[-1])
        rows = rows[torch.isfinite(rows).all(dim=1)]
        total = rows.abs().sum(dim=0, dtype=torch.float64).cpu()
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        first = -self.count % self.stride
        self.count += rows.shape[0]
        self._keep(rows[first :: self.stride].float().cpu(), self.stride)

    def _keep(self, rows: torch.Tensor, stride: int) -> None:
        """Join ``rows`` (taken every ``stride`` rows) to the sample, at the larger stride."""
        while stride < self.stride:
            rows, stride = rows[::2], stride * 2
        held = self.rows
        while held is not None and self.stride < stride:
            held, self.stride = held[::2], self.stride * 2
        held = rows if held is None else torch.cat([held, rows])
        while held.shape[0] > self.limit:
            held, self.stride = held[::2], self.stride * 2
        self.rows = held

    def snapshot(self) -> dict[str, torch.Tensor]:
        if self.abs_sum is None or self.rows is None:
            return {}
        return {
            "abs_sum": self.abs_sum.clone(),
            "rows": self.rows.clone(),
            "count": torch.tensor(self.count),
            "stride": torch.tensor(self.stride),
        }

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        self.reset()
        if snapshot:
            self.abs_sum = snapshot["abs_sum"].to(torch.float64).clone()
            self.rows = snapshot["rows"].float().clone()
            self.count = int(snapshot["count"])
            self.stride = int(snapshot["stride"])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Merges (``merge_``) as the sums of both and their samples joined."""
        return self.snapshot()

    def merge_(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        theirs = state["abs_sum"].to(torch.float64)
        self.abs_sum = theirs if self.abs_sum is None else self.abs_sum + theirs
        self.count += int(state["count"])
        self._keep(state["rows"].float(), int(state["stride"]))
