"""Where a fit's linear algebra runs: ``device=`` of :meth:`SharedSubspace.from_adapters`,
:func:`vlora.compress.compress`, the streaming fit and ``vlora compress --device``.

Precision is float64 on every device (docs/DESIGN.md, "Devices"): the stacked SVDs,
QRs and eigendecompositions of :mod:`vlora.linalg` run in float64 on the CPU or on the
GPU alike, and what a fit stores comes back to the CPU (bases float32, Grams float64).
A CUDA fit agrees with a CPU fit to rounding (``benchmarks/gpu_check.py`` measures it),
but is not bit-identical to it: byte-identical saved files hold per device.
"""

from __future__ import annotations

import torch

from vlora.errors import DeviceError


def fit_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` checked for a fit: None stays None (compute where the adapters are, the
    CPU, as before ``device=`` existed); ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` become a
    :class:`torch.device`.

    Raises:
        DeviceError: (a ValueError) an unknown device, a device type other than CPU or
            CUDA, or CUDA on a machine where ``torch.cuda.is_available()`` is False (or
            ``cuda:N`` past the GPUs there are).
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {device!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeviceError(f"fits run on 'cpu' or 'cuda', not {str(dev)!r}")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {str(dev)!r} was asked for, but CUDA is not available here "
            "(torch.cuda.is_available() is False: a CPU-only torch build, or no GPU visible); "
            "leave device out or pass 'cpu'")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {str(dev)!r}: this machine has {torch.cuda.device_count()} "
                          "CUDA device(s)")
    return dev
