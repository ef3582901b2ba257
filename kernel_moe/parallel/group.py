"""Which process group an expert-parallel model is sharded over: a ProcessGroup, one dimension of
a DeviceMesh, or (default) the whole world; torch.distributed must be initialised first."""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


def expert_group(process_group: object = None) -> dist.ProcessGroup:
    """The group of ``process_group``: None (the default group, the whole world), a ProcessGroup, or
    a one-dimensional DeviceMesh (``mesh["ep"]`` selects a dimension of a larger one). Raises
    ValueError when torch.distributed is not initialised or the argument is none of these."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("KernelConfig.expert_parallel=True needs torch.distributed initialised first "
                         "(run under torchrun and call torch.distributed.init_process_group(), e.g. with backend "
                         "'gloo' on CPU or 'nccl' on GPU)")
    if process_group is None:
        return dist.group.WORLD
    if isinstance(process_group, DeviceMesh):
        if process_group.ndim != 1:
            raise ValueError(f"process_group is a DeviceMesh of {process_group.ndim} dimensions "
                             f"{process_group.mesh_dim_names}; allowed: a one-dimensional mesh (select the expert "
                             "dimension, e.g. mesh['ep'])")
        return process_group.get_group()
    if isinstance(process_group, dist.ProcessGroup):
        return process_group
    raise ValueError(f"process_group={process_group!r} is invalid; allowed: None (the whole world), a "
                     "torch.distributed ProcessGroup, or a one-dimensional DeviceMesh")


__all__ = ["expert_group"]
