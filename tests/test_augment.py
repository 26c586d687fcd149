"""Batched crop-and-flip: each image equals its own padded slice, drawn from the caller's
generator."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clsim.augment import crop_flip, random_crop, random_flip


def images(n: int = 6) -> torch.Tensor:
    return torch.arange(n * 3 * 5 * 7, dtype=torch.float32).view(n, 3, 5, 7)


def test_each_crop_is_the_padded_image_sliced_at_its_own_offset():
    x = images()
    out = random_crop(x, 2, torch.Generator().manual_seed(3))
    offsets = torch.randint(0, 5, (2, len(x)), generator=torch.Generator().manual_seed(3))
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        top, left = offsets[:, i].tolist()
        assert torch.equal(out[i], padded[i, :, top : top + 5, left : left + 7])


def test_flip_mirrors_exactly_the_drawn_images():
    x = images(50)
    out = random_flip(x, torch.Generator().manual_seed(1))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 40


def test_same_generator_same_batch_and_zero_padding_is_identity():
    x = images()
    a = crop_flip(x, torch.Generator().manual_seed(7))
    b = crop_flip(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert random_crop(x, 0, torch.Generator()) is x
