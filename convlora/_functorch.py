"""Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev`` ...) is running the current call.

convlora's own autograd functions (DoRA's and LoKr's weight backward, the activation-space
backward of [convlora.lowrank_conv][]) have no functorch rules; under a transform the same
forward runs with plain autograd instead, as these transforms expect.
"""

from __future__ import annotations

import torch

__all__ = ["functorch_transform_active"]


def functorch_transform_active() -> bool:
    """``True`` inside ``torch.func.grad``, ``vmap`` and the other function transforms.

    torch has no public query for this; the check is functorch's interpreter stack, and it is
    ``False`` where that private API does not exist.

    Returns:
        Whether a transform is active.
    """
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return peek is not None and peek() is not None
