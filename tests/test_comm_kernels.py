"""The fused-kernel paths of the SP operators.

On CPU: which path runs (the torch one, whatever is installed), and the glue around the
kernels, run through every operator at worlds 1, 2 and 4 with pure-torch implementations of
the kernels' contracts (tests/kernel_references.py: fla's own naive recurrence for
`chunk_simple_gla`, a per-sequence bottom-right-causal softmax for `flash_attn_varlen_func`),
against the float64 single-process oracle. On CUDA with the kernels installed: the kernels
themselves against the torch path, and their launches per forward + backward."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import pliant.comm as C
from pliant.comm import kernels

import kernel_references as R
from comm_check import check
from dist_jobs import make_inputs
from oracle import linear_attention_quadratic

WORLDS = (1, 2, 4)
GLUE_TOL = 1e-4  # fla's naive reference computes in float32


def test_cpu_runs_the_torch_path():
    q = torch.zeros(4, 2, 8, dtype=torch.bfloat16)
    assert C.kernel_names(q) == {"linear": "torch", "gated_delta": "torch", "softmax": "torch"}
    with C.use_kernels(linear=print):
        assert kernels.linear_kernel(q) is print and kernels.softmax_kernel(q) is None
        with C.torch_kernels():
            assert kernels.linear_kernel(q) is None
        assert kernels.linear_kernel(q) is print
    assert kernels.linear_kernel(q) is None


def test_environment_forces_the_torch_path(monkeypatch):
    q = torch.zeros(4, 2, 8)
    with C.use_kernels(linear=print, softmax=print, gated_delta=print):
        assert C.kernel_names(q) == {"linear": "fla.chunk_simple_gla", "gated_delta": "fla.chunk_gated_delta_rule",
                                     "softmax": "flash_attn_varlen_func"}
        monkeypatch.setenv("PLIANT_KERNELS", "torch")
        assert C.kernel_names(q) == {"linear": "torch", "gated_delta": "torch", "softmax": "torch"}


def test_cumulative_lengths():
    cu = kernels.cumulative((3, 1, 5), "cpu", torch.int32)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 4, 9]


@pytest.mark.parametrize("method", ["lasp2", "ring"])
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("decay", [False, True])
def test_fused_linear_glue(pools, method, world, decay):
    # many sequences, one shorter than the group, lengths not multiples of the group or the block
    check(pools[world], method, [13, 1, 30, 7, 64, 3], 0, world, decay=decay, options={"kernels": "reference"},
          tol=GLUE_TOL)


@pytest.mark.parametrize("method", ["ulysses", "lasp2h"])
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kv_heads", [1, 4])
def test_fused_softmax_glue(pools, method, world, kv_heads):
    check(pools[world], method, [13, 1, 30, 7, 64, 3], 0, world, heads=4, kv_heads=kv_heads,
          options={"kernels": "reference"})


def test_glue_check_can_fail():
    """The reference kernel agrees with the oracle; one that drops the decay does not: the
    glue checks are not vacuous."""
    def no_decay(*a, g_gamma=None, **kw):
        return R.fla_simple_gla_varlen(*a, g_gamma=None, **kw)

    q, k, v, _ = make_inputs([20], 2, 2, 3, 4, seed=0)[0]
    lay = C.PackLayout.from_lengths([20], 1)
    rates = C.default_decay_rates(2)
    want = linear_attention_quadratic(q, k, v, rates)
    for kernel, agrees in ((R.fla_simple_gla_varlen, True), (no_decay, False)):
        with C.use_kernels(linear=kernel):
            got = C.lasp2_attention(q, k, v, lay, C.SOLO, rates)
        assert ((got - want).abs().max().item() <= GLUE_TOL) == agrees


# ----- on a GPU, with the kernels installed -----

CUDA = torch.cuda.is_available()
HAS_FLA = CUDA and kernels._fla_chunk_simple_gla() is not None
HAS_FLASH = CUDA and importlib.util.find_spec("flash_attn") is not None and kernels._flash_attn_varlen() is not None
TOLERANCES = {torch.float32: 2e-3, torch.bfloat16: 3e-2}  # max error / max |torch path|


def _fwd_bwd(op, lengths, dtype, heads=4, head_dim=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    T = sum(lengths)
    q, k, v, w = (torch.randn(T, heads, head_dim, device="cuda", generator=g, dtype=dtype) * 0.3 for _ in range(4))
    lay = C.PackLayout.from_lengths(lengths, 1)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    if op == "lasp2":
        out = C.lasp2_attention(q, k, v, lay, C.SOLO, C.default_decay_rates(heads).cuda())
    else:
        out = C.ulysses_attention(q, k, v, lay, C.SOLO)
    (out.float() * w.float()).sum().backward()
    return [t.float() for t in (out.detach(), q.grad, k.grad, v.grad)]


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()


@pytest.mark.skipif(not HAS_FLA, reason="needs CUDA and flash-linear-attention")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_kernel_against_torch_path_cuda(dtype):
    lengths = [700, 64, 1, 333, 2048]
    fused = _fwd_bwd("lasp2", lengths, dtype)
    with C.torch_kernels():
        ref = _fwd_bwd("lasp2", lengths, dtype)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fused, ref):
        assert _rel(a, b) <= TOLERANCES[dtype], (name, dtype, _rel(a, b))


@pytest.mark.skipif(not HAS_FLASH, reason="needs CUDA and flash-attn")
def test_flash_kernel_against_torch_path_cuda():
    lengths = [700, 64, 1, 333, 2048]
    fused = _fwd_bwd("ulysses", lengths, torch.bfloat16)
    with C.torch_kernels():
        ref = _fwd_bwd("ulysses", lengths, torch.bfloat16)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fused, ref):
        assert _rel(a, b) <= TOLERANCES[torch.bfloat16], (name, _rel(a, b))


@pytest.mark.skipif(not (HAS_FLA and HAS_FLASH), reason="needs CUDA, flash-linear-attention and flash-attn")
@pytest.mark.parametrize("op", ["lasp2", "ulysses"])
def test_kernel_launches_do_not_grow_with_sequences_cuda(op):
    from torch.profiler import ProfilerActivity, profile

    def launches(lengths):
        _fwd_bwd(op, lengths, torch.bfloat16)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _fwd_bwd(op, lengths, torch.bfloat16)
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)

    one, many = launches([16384]), launches([64] * 256)
    assert max(one, many) <= 400 and many <= 1.5 * one, (one, many)
