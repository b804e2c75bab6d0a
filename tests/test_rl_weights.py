"""Weights packed into one byte array for the weight store, and loaded back: exact, for any
dtype mix, and a mismatch is an error that names the sizes."""
import pytest
import torch

from pliant.rl.weights import load_weights, pack_weights


class Mixed(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(3, 5, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(7, generator=g).to(torch.bfloat16))  # 14 bytes: padded
        self.c = torch.nn.Parameter(torch.randn(2, 3, generator=g))
        self.register_buffer("steps", torch.tensor([seed, seed + 1], dtype=torch.int64))
        self.register_buffer("mask", torch.tensor([True, False, bool(seed % 2)]))


def test_packed_weights_load_back_exactly():
    src, dst = Mixed(1), Mixed(2)
    packed = pack_weights(src)
    assert packed.dtype.name == "uint8" and packed.size % 8 == 0
    load_weights(dst, packed)
    for (name, x), y in zip(src.state_dict().items(), dst.state_dict().values()):
        assert x.dtype == y.dtype and torch.equal(x, y), name


def test_packed_weights_of_another_model_are_refused():
    with pytest.raises(ValueError, match="bytes"):
        load_weights(torch.nn.Linear(4, 4), pack_weights(Mixed(1)))
