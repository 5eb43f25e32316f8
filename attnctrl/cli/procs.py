"""The processes of a run launched with ``accelerate launch`` or ``torchrun`` (one when run plainly):
accelerate's `PartialState`, and a map that splits work items between the processes."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any


def state():
    """This process's `PartialState`; several launched processes without CUDA use CPUs and gloo."""
    import torch
    from accelerate import PartialState

    launched = "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=launched and not torch.cuda.is_available(), timeout=timedelta(days=7))


def spreader(st) -> Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]:
    """``spread(fn, items)``: each process applies `fn` to its share of `items` (contiguous, in
    rank order); every process returns all the results, in the items' order."""
    from accelerate.utils import gather_object

    def spread(fn, items):
        with st.split_between_processes(list(items)) as mine:
            results = [fn(item) for item in mine]
        return gather_object(results) if st.num_processes > 1 else results

    return spread
