"""Layer-level math of adapter composition: a weighted sum of deltas, and a batch split by adapter.

Used by [`LoRALayer`][convlora.LoRALayer]; the model-level operations built on them are in
[convlora.composition][].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .errors import ConvLoRAError
from .functional import compute_dtype

__all__ = ["grouped_forward", "weighted_weight"]


def weighted_weight(weight: Tensor, deltas: Sequence[tuple[float, Tensor]]) -> Tensor:
    """``W + sum_i w_i * delta_i``, summed in the compute dtype (at least float32), cast to ``W``'s dtype.

    The unmerged forward and the merge of a composition both call this function, so they agree
    bit for bit.
    """
    dtype = compute_dtype(weight, *(d for _, d in deltas))
    out = weight.to(dtype)
    for w, delta in deltas:
        out = out + delta.to(dtype) * w
    return out.to(weight.dtype)


def grouped_forward(x: Tensor, names: Sequence[str | None],
                    run: Callable[[Tensor, str | None], Tensor]) -> Tensor:
    """Run ``run(x[rows], name)`` once per distinct ``name`` of ``names`` (one per sample) and reassemble.

    Samples keep their order; each group is one batched call with that adapter's weight.

    Raises:
        ConvLoRAError: ``len(names)`` differs from the batch size ``x.shape[0]``.
    """
    if x.dim() == 0 or x.shape[0] != len(names):
        raise ConvLoRAError(f"per_sample(): {len(names)} adapter names for a batch of "
                            f"{x.shape[0] if x.dim() else 0} samples; pass one name per sample.")
    rows: dict[str | None, list[int]] = {}
    for i, name in enumerate(names):
        rows.setdefault(name, []).append(i)
    if len(rows) == 1:
        return run(x, names[0] if names else None)
    out: Tensor | None = None
    for name, idx in rows.items():
        contiguous = idx == list(range(idx[0], idx[-1] + 1))  # a slice: a view, no gather
        index = torch.tensor(idx, device=x.device)
        y = run(x[idx[0]:idx[-1] + 1] if contiguous else x.index_select(0, index), name)
        if out is None:
            out = y.new_empty((x.shape[0], *y.shape[1:]))
        if contiguous:
            out[idx[0]:idx[-1] + 1] = y
        else:
            out.index_copy_(0, index, y)
    assert out is not None
    return out
