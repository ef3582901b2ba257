"""Scale-out of the expert computation over torch.distributed (expert parallelism)."""

from kernel_moe.parallel.expert_parallel import (
    MODES,
    ExpertParallelError,
    ExpertShard,
    exact_exchange,
    padded_exchange,
    shard_of,
)

__all__ = ["MODES", "ExpertParallelError", "ExpertShard", "exact_exchange", "padded_exchange", "shard_of"]
