"""Many small tensors as a few large ones: the data files of format version 5.

A subspace holds, per task and module, up to four small matrices (``L_B``, ``L_A``, ``P``,
``Q``). Written one safetensors entry each, their headers alone outweighed the numbers
(14 MiniLM adapters: 94 KB of headers in a 158 KB file). Version 5 concatenates them:
float ones into ``numbers`` (float32), quantized ones into ``codes`` (uint8) and
``scales`` (float32), in a fixed order, and reads them back in that order with the shapes
and number formats the manifest gives. docs/FORMAT.md is the specification.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlora.errors import SubspaceError
from vlora.quantize import QuantizedTensor, dequantize

Quant = tuple[int, str, int, "str | None"]  # bits, method, block, transform


def code_bytes(numel: int, quant: Quant) -> tuple[int, int]:
    """``(code bytes, scales)`` of a quantized tensor of ``numel`` numbers."""
    bits, _, block, _ = quant
    blocks = -(-numel // block)
    return blocks * block * bits // 8, blocks


@dataclass
class Packer:
    """Collects tensors in order; :meth:`tensors` gives the packed ones."""

    numbers: list[torch.Tensor] = field(default_factory=list)
    codes: list[torch.Tensor] = field(default_factory=list)
    scales: list[torch.Tensor] = field(default_factory=list)

    def put(self, x: torch.Tensor, q: QuantizedTensor | None, quant: Quant | None, what: str) -> None:
        """Append ``x`` (as float32) or, when ``quant`` says the slot is quantized, its codes
        ``q``, which must be of exactly that format (else the file could not be read)."""
        if quant is None:
            if q is not None:
                raise SubspaceError(f"{what}: quantized, where the file stores float numbers")
            self.numbers.append(x.detach().to("cpu", torch.float32).reshape(-1))
            return
        if q is None or (q.bits, q.method, q.block, q.transform) != quant \
                or tuple(q.shape) != tuple(x.shape):
            raise SubspaceError(f"{what}: not stored as {quant} (bits, method, block, transform)")
        self.codes.append(q.codes.reshape(-1))
        self.scales.append(q.scales.reshape(-1))

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}numbers": _cat(self.numbers, torch.float32),
                f"{prefix}codes": _cat(self.codes, torch.uint8),
                f"{prefix}scales": _cat(self.scales, torch.float32)}


def _cat(xs: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(xs) if xs else torch.zeros(0, dtype=dtype)


class Unpacker:
    """Reads tensors back in the order a :class:`Packer` wrote them; :meth:`done` checks
    that nothing is left over (a file and its manifest that disagree)."""

    def __init__(self, tensors: dict[str, torch.Tensor], prefix: str, what: str):
        try:
            self.numbers = tensors[f"{prefix}numbers"]
            self.codes = tensors[f"{prefix}codes"]
            self.scales = tensors[f"{prefix}scales"]
        except KeyError as e:
            raise SubspaceError(f"{what}: no tensor {e}") from None
        if self.numbers.dtype != torch.float32 or self.codes.dtype != torch.uint8 \
                or self.scales.dtype != torch.float32 \
                or any(x.ndim != 1 for x in (self.numbers, self.codes, self.scales)):
            raise SubspaceError(f"{what}: packed tensors of the wrong kind")
        self.at = [0, 0, 0]
        self.what = what

    def _take(self, i: int, src: torch.Tensor, n: int, name: str) -> torch.Tensor:
        if self.at[i] + n > src.numel():
            raise SubspaceError(f"{self.what}: {name} ends before the manifest's last tensor")
        out = src[self.at[i]:self.at[i] + n]
        self.at[i] += n
        return out

    def get(self, shape: tuple[int, int], quant: Quant | None
            ) -> tuple[torch.Tensor, QuantizedTensor | None]:
        numel = shape[0] * shape[1]
        if quant is None:
            x = self._take(0, self.numbers, numel, "numbers").reshape(shape).clone()
            if numel and not bool(torch.isfinite(x).all()):
                raise SubspaceError(f"{self.what}: contains NaN or Inf")
            return x, None
        nbytes, blocks = code_bytes(numel, quant)
        q = QuantizedTensor(self._take(1, self.codes, nbytes, "codes").clone(),
                            self._take(2, self.scales, blocks, "scales").clone(),
                            tuple(shape), quant[0], quant[1], quant[2], quant[3])
        if blocks and not bool(torch.isfinite(q.scales).all()):
            raise SubspaceError(f"{self.what}: scales contain NaN or Inf")
        return dequantize(q).float(), q

    def done(self) -> None:
        if self.at != [self.numbers.numel(), self.codes.numel(), self.scales.numel()]:
            raise SubspaceError(f"{self.what}: packed tensors are longer than the manifest says")
