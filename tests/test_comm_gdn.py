"""The gated delta rule's SP operators (comm/gated_delta.py) against an independent float64
recurrence written from the definition (tests/oracle.py), over real gloo ranks: outputs and
the gradients of q, k, v, g and beta, within 1e-9."""
from __future__ import annotations

import pytest
import torch

from pliant.comm import gated_delta as gd
from pliant.comm.pack import PackLayout

from dist_pool import DistPool
from gdn_jobs import gdn_inputs
from oracle import gated_delta_recurrent

TOL = 1e-9
H, DK, DV = 4, 4, 3


@pytest.fixture(scope="module")
def pool3():
    p = DistPool(3)
    yield p
    p.close()


def reference(lengths, seed, decay):
    outs, grads = [], []
    for q, k, v, g, beta, w in gdn_inputs(lengths, H, DK, DV, seed, decay):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, g, beta)]
        o, _ = gated_delta_recurrent(*leaves, DK ** -0.5)
        (o * w).sum().backward()
        outs.append(o.detach())
        grads.append([t.grad for t in leaves])
    return outs, grads


def compare(results, lengths, size, seed, decay, what="", tol=TOL):
    mine = sorted((r for r in results if r is not None), key=lambda r: r[0])
    assert [r[0] for r in mine] == list(range(size))
    layout = PackLayout.from_lengths(lengths, size)
    ref_out, ref_grads = reference(lengths, seed, decay)
    for i, name in enumerate(("out", "dq", "dk", "dv", "dg", "dbeta")):
        got = layout.unshard([r[1 + i] for r in mine])
        want = ref_out if i == 0 else [gr[i - 1] for gr in ref_grads]
        for j, (a, b) in enumerate(zip(got, want)):
            err = ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-300)).item()
            assert err <= tol, f"{what} {name} of sequence {j} (length {lengths[j]}): relative error {err:.2e}"
    return mine


@pytest.mark.parametrize("decay", ["mixed", "near0", "near1"])
@pytest.mark.parametrize("block", [64, 4])
def test_the_local_blocks_are_the_recurrence(monkeypatch, decay, block):
    """One rank, whole sequences (many short ones, one of 1 token), blocks smaller than a
    sequence: the block form (triangular solve + scan) is the token recurrence."""
    monkeypatch.setattr(gd, "BLOCK", block)
    lengths = [1, 9, 3, 17, 2, 6]
    seqs = gdn_inputs(lengths, H, DK, DV, 5, decay)
    cat = [torch.cat([s[i] for s in seqs]).requires_grad_(True) for i in range(5)]
    out, final = gd.chunk_gated_delta(*cat, tuple(lengths), DK ** -0.5)
    (out * torch.cat([s[5] for s in seqs])).sum().backward()
    ref_out, ref_grads = reference(lengths, 5, decay)
    assert (out.detach() - torch.cat(ref_out)).abs().max() / torch.cat(ref_out).abs().max() <= TOL
    for i, name in enumerate(("dq", "dk", "dv", "dg", "dbeta")):
        want = torch.cat([gr[i] for gr in ref_grads])
        err = ((cat[i].grad - want).abs().max() / want.abs().max()).item()
        assert err <= TOL, f"{name}: relative error {err:.2e}"
    for j, s in enumerate(seqs):  # final states, from the definition
        _, S = gated_delta_recurrent(*[t.detach() for t in s[:5]], DK ** -0.5)
        assert (final[j] - S).abs().max() <= TOL * S.abs().max()


@pytest.mark.parametrize("form", ["gather", "ring", "heads"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_sp_forms_on_a_pack(pools, form, world):
    """Lengths not multiples of the group, sequences shorter than it, one of 1 token."""
    lengths = [13, 1, 30, 7, 2]
    compare(pools[world].run("gdn_jobs:run_gdn", form, lengths, 0, world, H, DK, DV, 3, "mixed"),
            lengths, world, 3, "mixed", f"{form} world {world}")


@pytest.mark.parametrize("form", ["gather", "ring", "heads"])
@pytest.mark.parametrize("world", [1, 4])
def test_fused_kernel_path(pools, form, world):
    """The fused path (FusedLocalGDN: fla's chunk_gated_delta_rule called twice per pack over
    cu_seqlens, from zero and from the identity with v = 0) with the kernel's contract computed
    by fla's own naive recurrence on CPU, float32: the glue (cu_seqlens, the maps, o0 + oA S_in,
    gradients through both calls) against the float64 definition, within float32's reach."""
    lengths = [13, 1, 30, 7, 2]
    compare(pools[world].run("gdn_jobs:run_gdn", form, lengths, 0, world, H, DK, DV, 3, "mixed", True),
            lengths, world, 3, "mixed", f"fused {form} world {world}", tol=1e-5)


@pytest.mark.parametrize("decay", ["near0", "near1"])
@pytest.mark.parametrize("form", ["gather", "ring"])
def test_world_of_three_and_extreme_decays(pool3, form, decay):
    lengths = [40, 3, 1, 11]
    compare(pool3.run("gdn_jobs:run_gdn", form, lengths, 0, 3, H, DK, DV, 4, decay), lengths, 3, 4, decay,
            f"{form} world 3 {decay}")


def test_subgroups_of_a_larger_world(pools):
    lengths = [9, 22, 5]
    compare(pools[4].run("gdn_jobs:run_gdn", "gather", lengths, 2, 2, H, DK, DV, 6, "mixed"), lengths, 2, 6,
            "mixed", "ranks 2-3 of 4")


def test_gathered_volume_is_independent_of_length(pools):
    """One AllGather of heads x dk x (dk + dv) per sequence forward and heads x dk x dv
    backward, whatever the length."""
    counts = []
    for L in (16, 400):
        res = pools[4].run("gdn_jobs:run_gdn", "gather", [L, 5], 0, 4, H, DK, DV, 1, "mixed")
        counts.append({r[0]: r[7] for r in res})
    assert counts[0] == counts[1]
    maps = 2 * H * DK * (DK + DV) * 8  # two sequences, float64
    states = 2 * H * DK * DV * 8
    assert counts[0][0]["gdn.maps@0-3"] == {"calls": 1, "bytes_sent": 3 * maps, "bytes_recv": 3 * maps}
    assert counts[0][0]["gdn.grad_states@0-3"] == {"calls": 1, "bytes_sent": 3 * states, "bytes_recv": 3 * states}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_convolution_halo(pools, world):
    """The short causal convolution over a pack with the halo from the ranks before: the
    per-sequence conv1d (zero history at each start), outputs and gradients."""
    lengths, channels, kernel = [13, 1, 2, 30, 7], 5, 4
    res = sorted((r for r in pools[world].run("gdn_jobs:run_halo_conv", lengths, 0, world, channels, kernel, 2)
                  if r is not None), key=lambda r: r[0])
    layout = PackLayout.from_lengths(lengths, world)
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(L, channels, generator=gen, dtype=torch.float64).requires_grad_(True) for L in lengths]
    ws = [torch.randn(L, channels, generator=gen, dtype=torch.float64) for L in lengths]
    weight = torch.randn(channels, kernel, generator=gen, dtype=torch.float64, requires_grad=True)
    outs = [torch.nn.functional.conv1d(x.T[None], weight[:, None], padding=kernel - 1, groups=channels)[0, :, :len(x)].T
            for x in xs]
    sum((o * w).sum() for o, w in zip(outs, ws)).backward()
    for name, got, want in (("out", layout.unshard([r[1] for r in res]), [o.detach() for o in outs]),
                            ("dx", layout.unshard([r[2] for r in res]), [x.grad for x in xs])):
        for j, (a, b) in enumerate(zip(got, want)):
            assert (a - b).abs().max() <= 1e-12, f"{name} of sequence {j}"
    assert (sum(r[3] for r in res) - weight.grad).abs().max() <= 1e-12


def test_heads_form_needs_divisible_heads(pools):
    with pytest.raises(AssertionError, match=r"3 heads do not divide over an SP group of 2"):
        pools[2].run("gdn_jobs:run_gdn", "heads", [8, 3], 0, 2, 3, DK, DV, 0, "mixed")
