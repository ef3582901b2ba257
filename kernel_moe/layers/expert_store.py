"""The slow tier of offloaded experts and the copies from it into the fast slots.

- :class:`HostStore`: every expert in host memory (page-locked when the slots are on a GPU, so
  host-to-device copies are asynchronous).
- :class:`DiskStore`: every expert in a file in the safetensors layout, written once at optimize
  time (tensor ``e{expert}.{name}``, one expert's tensors adjacent). A step's copies are
  positional reads (``os.preadv``) straight into the slot's memory: the file's pages live in the
  kernel's page cache, which is not the process's resident memory (pages of a memory map that
  a read touches would count in RSS until the process unmapped them).
- :class:`SlotMover`: copies one expert into one slot: synchronously into CPU slots, on a side
  CUDA stream into GPU slots, with events so that the compute waits only for the slots it
  reads and a copy waits for the compute that last read its slot.

Tensor names of an expert: ``up`` [N, H], ``down`` [H, I] and, where the experts have them,
``up_bias`` [N] and ``down_bias`` [H].
"""

from __future__ import annotations

import json
import os
import struct
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from kernel_moe.errors import KernelMoEError

_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.int8: "I8", torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3"}

ExpertGetter = Callable[[str, int], Tensor]
"""(tensor name, expert) -> that expert's tensor (any strides, CPU or GPU)."""


def _bytes_of(t: Tensor) -> Tensor:
    """The bytes of a contiguous CPU tensor as uint8 [nbytes]."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


class HostStore:
    """Experts in host memory: one [E, ...] tensor per name."""

    path = None

    def __init__(self, names: dict[str, tuple[tuple[int, ...], torch.dtype]], num_experts: int,
                 get: ExpertGetter, pin: bool) -> None:
        self.names, self.num_experts = names, num_experts
        self.tensors = {}
        for name, (shape, dtype) in names.items():
            t = torch.empty((num_experts, *shape), dtype=dtype, pin_memory=pin)
            for e in range(num_experts):
                t[e].copy_(get(name, e))
            self.tensors[name] = t
        self.expert_bytes = sum(t[0].numel() * t.element_size() for t in self.tensors.values())

    def read_into(self, expert: int, targets: dict[str, Tensor]) -> None:
        """Copy ``expert`` into CPU tensors ``targets`` (name -> the slot's tensor)."""
        for name, t in targets.items():
            t.copy_(self.tensors[name][expert])

    def host(self, expert: int) -> dict[str, Tensor]:
        """``expert``'s tensors in host memory (views of the store)."""
        return {name: t[expert] for name, t in self.tensors.items()}

    def write(self, name: str, expert: int, value: Tensor) -> None:
        self.tensors[name][expert].copy_(value)

    def close(self) -> None:
        """Nothing to release beyond the tensors."""


class DiskStore:
    """Experts in a safetensors-layout file read with positional reads (see the module docstring)."""

    def __init__(self, path: str, names: dict[str, tuple[tuple[int, ...], torch.dtype]], num_experts: int,
                 get: ExpertGetter) -> None:
        self.path, self.names, self.num_experts = path, names, num_experts
        self.sizes = {n: torch.Size(s).numel() * torch.empty(0, dtype=d).element_size() for n, (s, d) in names.items()}
        self.expert_bytes = sum(self.sizes.values())
        header, offsets, start = {}, {}, 0
        for e in range(num_experts):
            for name, (shape, dtype) in names.items():
                end = start + self.sizes[name]
                header[f"e{e}.{name}"] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [start, end]}
                offsets[(e, name)] = start
                start = end
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-(8 + len(blob)) % 8)  # the data starts 8-byte aligned
        self.data_start = 8 + len(blob)
        self.offsets = offsets
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for e in range(num_experts):
                for name in names:
                    f.write(_bytes_of(get(name, e)).numpy().tobytes())
        self.fd = os.open(path, os.O_RDWR)
        self._close = weakref.finalize(self, os.close, self.fd)
        self._staging: dict[str, Tensor] | None = None

    def read_into(self, expert: int, targets: dict[str, Tensor]) -> None:
        """Read ``expert`` into contiguous CPU tensors ``targets`` (name -> the slot's tensor): one
        positional read of the expert's adjacent tensors."""
        buffers = [memoryview(targets[name].view(torch.uint8).reshape(-1).numpy()) for name in self.names]
        first = next(iter(self.names))
        offset = self.data_start + self.offsets[(expert, first)]
        done = os.preadv(self.fd, buffers, offset)
        if done != self.expert_bytes:
            raise KernelMoEError(f"offloaded experts file {self.path} is truncated: read {done} of "
                                 f"{self.expert_bytes} bytes of expert {expert}")

    def host(self, expert: int) -> dict[str, Tensor]:
        """``expert``'s tensors read into one page-locked staging buffer (reused: the caller copies
        out of it before the next call)."""
        if self._staging is None:
            self._staging = {n: torch.empty(s, dtype=d, pin_memory=torch.cuda.is_available())
                             for n, (s, d) in self.names.items()}
        self.read_into(expert, self._staging)
        return self._staging

    def write(self, name: str, expert: int, value: Tensor) -> None:
        data = _bytes_of(value.to(self.names[name][1])).numpy().tobytes()
        os.pwrite(self.fd, data, self.data_start + self.offsets[(expert, name)])

    def close(self) -> None:
        """Close the file (an unlinked temporary file disappears with it); also done when the store is freed."""
        self._close()
        self.fd = -1


Store = HostStore | DiskStore


class SlotMover:
    """Copies experts from ``store`` into slot tensors (name -> [S, ...]) given with each call (the
    mover holds no reference to the module that owns them)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._stream = None
        self._ready: dict[int, object] = {}  # slot -> CUDA event of its copy
        self._free: dict[int, object] = {}  # slot -> CUDA event of the compute that last read it
        self._staged = None  # CUDA event of the copy out of the disk store's staging buffer

    @staticmethod
    def asynchronous(slots: dict[str, Tensor]) -> bool:
        """True for GPU slots: copies are queued on a side stream (no thread needed to overlap them)."""
        return next(iter(slots.values())).device.type == "cuda"

    def load(self, expert: int, slot: int, slots: dict[str, Tensor]) -> None:
        """Copy ``expert`` into ``slot`` of ``slots`` (queued on the side stream on a GPU)."""
        targets = {name: t[slot] for name, t in slots.items()}
        if not self.asynchronous(slots):
            self.store.read_into(expert, targets)
            return
        device = next(iter(targets.values())).device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        if isinstance(self.store, DiskStore) and self._staged is not None:
            self._staged.synchronize()  # the staging buffer is free again
        source = self.store.host(expert)
        with torch.cuda.stream(self._stream):
            if slot in self._free:
                self._stream.wait_event(self._free.pop(slot))
            for name, t in targets.items():
                t.copy_(source[name], non_blocking=True)
            self._ready[slot] = self._staged = self._stream.record_event()

    def ready(self, slots: list[int]) -> None:
        """Make the compute stream wait for the copies into ``slots`` (GPU only)."""
        if self._stream is None:
            return
        current = torch.cuda.current_stream(self._stream.device)
        for slot in slots:
            event = self._ready.pop(slot, None)
            if event is not None:
                current.wait_event(event)

    def used(self, slots: list[int]) -> None:
        """The compute queued so far reads ``slots``: a later copy into them waits for it (GPU only)."""
        if self._stream is None:
            return
        event = torch.cuda.current_stream(self._stream.device).record_event()
        for slot in slots:
            self._free[slot] = event


__all__ = ["DiskStore", "HostStore", "SlotMover", "Store"]
