"""Counting the operations that make the host wait for the device.

On an accelerator, reading a value back (``.item()``, ``float(t)``, ``.tolist()``, a copy to the
CPU) or running an op whose output shape depends on the data (``nonzero``, boolean-mask
indexing, ``unique``, ``bincount``, ``repeat_interleave`` without ``output_size``) blocks the host
until the queued kernels have run, and the launch pipeline drains. :class:`HostSyncCounter`
records every such operation while it is active, on any device, so a test on CPU can show that a
code path would not sync on a GPU. On CUDA, ``torch.cuda.set_sync_debug_mode("error")`` checks
the same thing at the driver level (``benchmarks/gpu_check.py`` uses both).

One CPU-only read is not counted: ``F.one_hot(x, num_classes)`` checks ``x.min()`` and
``x.max()`` on the host for CPU tensors, while on CUDA it relies on a device-side assert of the
scatter it runs and reads nothing back (``aten/src/ATen/native/Onehot.cpp``).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that always read device memory on the host or size their output from the data.
_SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), float(t), int(t), bool(t)
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.bincount.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default,
}
# Methods that copy a whole tensor to host memory without going through an aten op on CPU.
_SYNC_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy}


def _has_bool_index(indices) -> bool:
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()
    )


def _is_sync(func, args, kwargs) -> bool:
    if func in _SYNC_OPS:
        return True
    packet = func.overloadpacket
    if packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
        return _has_bool_index(args[1])
    if packet in (aten._to_copy, aten.copy_):
        source = args[1] if packet is aten.copy_ else args[0]
        target = args[0].device if packet is aten.copy_ else kwargs.get("device")
        return (
            isinstance(source, torch.Tensor)
            and source.device.type != "cpu"
            and target is not None
            and torch.device(target).type == "cpu"
        )
    return False


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, owner: HostSyncCounter):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        cpu_only_check = self.owner.in_one_hot and func is aten._local_scalar_dense.default
        if not cpu_only_check and _is_sync(func, args, kwargs):
            self.owner.counts[str(func)] += 1
        return func(*args, **kwargs)


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, owner: HostSyncCounter):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNC_METHODS:
            self.owner.counts[f"Tensor.{func.__name__}"] += 1
        if func is torch.nn.functional.one_hot:
            num_classes = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
            if num_classes > 0:  # with -1 the class count is read back on every device
                self.owner.in_one_hot = True
                try:
                    return func(*args, **kwargs)
                finally:
                    self.owner.in_one_hot = False
        return func(*args, **kwargs)


class HostSyncCounter:
    """Context manager counting host syncs; ``counts`` maps op name -> calls, ``total`` sums them.

    Example::

        with HostSyncCounter() as syncs:
            metrics = train_step_on_device(...)
        assert syncs.total == 0, syncs.counts
    """

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.in_one_hot = False
        self._modes = (_FunctionCounter(self), _DispatchCounter(self))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> HostSyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
