"""Content digests of tensor rows: the identity of a sample, whoever copied it.

Streams copy their samples per experience (a hierarchy's levels test the same images; a
recurring task brings its test set back), so identity by storage says nothing. A row's
bytes say everything: two rows with equal bytes are the same model input, and anything
computed from one (a prediction, a frozen encoder's features) holds for the other.
BLAKE2b at 16 bytes makes an accidental collision as unlikely as a hardware fault.
"""

from __future__ import annotations

import hashlib

import torch

DIGEST_BYTES = 16


def row_digests(x: torch.Tensor) -> list[bytes]:
    """One digest per row of ``x`` (any dtype and shape, any device), of its dtype, shape
    and bytes; a zero-row ``x`` gives an empty list."""
    if len(x) == 0:
        return []
    rows = x.detach().to("cpu").contiguous().reshape(len(x), -1)
    if rows.dtype == torch.bool:
        rows = rows.to(torch.uint8)
    header = f"{x.dtype}{tuple(x.shape[1:])}".encode()
    raw = rows.view(torch.uint8).numpy() if rows.element_size() > 1 else rows.numpy()
    digests = []
    for row in raw:
        h = hashlib.blake2b(header, digest_size=DIGEST_BYTES)
        h.update(row.data)
        digests.append(h.digest())
    return digests
