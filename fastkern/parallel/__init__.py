"""Parallelism beyond data parallel: sequence parallelism (DeepSpeed-Ulysses style) on torch.distributed.

See fastkern/parallel/sequence.py for the recipe and why it is exact, docs/multi_gpu.md for the guide.
"""

from .collectives import all_to_all, sum_over_ranks
from .sequence import (
    SequenceParallel,
    SequenceShard,
    enable_sequence_parallel,
    kv_repeat_factor,
    sequence_parallel_loss,
    shard_sequence,
    sync_gradients,
)

__all__ = [
    "SequenceParallel", "SequenceShard", "all_to_all", "enable_sequence_parallel", "kv_repeat_factor",
    "sequence_parallel_loss", "shard_sequence", "sum_over_ranks", "sync_gradients",
]
