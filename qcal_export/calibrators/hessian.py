"""A layer input's ``Xᵀ X`` summed over batches, for Hessian-weighted weight calibration: whole
(``[K, K]``, GPTQ) or per block of input channels (``[ceil(K / b), b, b]``, nvfp4-mse)."""

from __future__ import annotations

import torch


class SummedHessian:
    """Accumulates products ``Xᵀ X`` of a layer's input ``[..., K]`` (which ones: a subclass's
    ``_products``) and the number of rows summed (``rows``: fewer than K leave the whole
    ``Xᵀ X`` singular).

    Float64: the sum runs over every token of the data, and a sum of per-rank or per-resume
    parts then equals one run's up to float64 rounding. Non-finite rows (a NaN or Inf anywhere
    in the row) are left out.
    """

    def __init__(self) -> None:
        self.hessian: torch.Tensor | None = None
        self.rows = 0

    def snapshot(self) -> dict[str, torch.Tensor]:
        """The accumulated ``H`` and row count for resumable runs (empty before the first
        collect)."""
        if self.hessian is None:
            return {}
        return {"hessian": self.hessian.cpu().clone(), "rows": torch.tensor(self.rows)}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        self.hessian = snapshot["hessian"].clone() if snapshot else None
        self.rows = int(snapshot["rows"]) if snapshot else 0

    def reset(self) -> None:
        self.hessian = None
        self.rows = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Merges by sum (``merge_``), as ``H`` of the union of the batches."""
        return self.snapshot()

    def merge_(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            theirs = state["hessian"].to(torch.float64)
            if self.hessian is not None:
                theirs = self.hessian + theirs.to(self.hessian.device)
            self.hessian = theirs
            self.rows += int(state["rows"])

    def collect(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        rows = x.reshape(-1, x.shape[-1]).to(torch.float64)
        rows = rows[torch.isfinite(rows).all(dim=1)]
        update = self._products(rows)
        self.hessian = update if self.hessian is None else self.hessian + update
        self.rows += rows.shape[0]

    def _products(self, rows: torch.Tensor) -> torch.Tensor:
        """This batch's part of ``H`` from its finite rows ``[n, K]`` (float64)."""
        raise NotImplementedError


class FullHessian(SummedHessian):
    """``H = Xᵀ X`` ``[K, K]`` of a layer's input (GPTQ)."""

    def _products(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.T @ rows


class BlockHessian(SummedHessian):
    """``H = Xᵀ X`` per block of ``block_size`` input channels: ``[ceil(K / b), b, b]``; a last
    partial block is padded with zero channels, as the weight's blocks are (nvfp4-mse)."""

    def __init__(self, block_size: int = 16):
        super().__init__()
        self.block_size = block_size

    def _products(self, rows: torch.Tensor) -> torch.Tensor:
        pad = -rows.shape[-1] % self.block_size
        if pad:
            rows = torch.nn.functional.pad(rows, (0, pad))
        blocks = rows.reshape(rows.shape[0], -1, self.block_size)
        return torch.einsum("nbi,nbj->bij", blocks, blocks)
