"""Length sources, the length-file loader and the token-budget batcher."""
from __future__ import annotations

import numpy as np
import pytest

from pliant.planner import PlanningError, get_distribution, load_length_file, presets, resolve_source, token_batches
from pliant.planner.lengths import LongTailDistribution, describe, fit_long_tail

from conftest import SHARED_LENGTHS


def test_wikipedia_presets_reproduce_published_shape():
    # docs/architecture.md: median 347, mean 1014, p90 2112, p99 10.9K, p99.9 37.4K; >1K: 21% of seqs, 75% of tokens
    for name in ("wikipedia", "wikipedia-synth"):
        x = get_distribution(name).sample(400_000, np.random.default_rng(1))
        d = describe(x)
        assert 320 <= d["median"] <= 375, (name, d)
        assert 880 <= d["mean"] <= 1150, (name, d)
        assert 9_500 <= d["p99"] <= 12_500, (name, d)
        assert 30_000 <= d["p999"] <= 46_000, (name, d)
        assert 0.19 <= (x > 1024).mean() <= 0.23
        assert 0.70 <= x[x > 1024].sum() / x.sum() <= 0.80


def test_pareto_tail_is_heavier_than_lognormal():
    dist = get_distribution("wikipedia-synth")
    assert isinstance(dist, LongTailDistribution) and 1.5 <= dist.tail_alpha <= 2.5
    x = dist.sample(1_000_000, np.random.default_rng(2))
    # a pure lognormal with the same body would put ~0 mass above 64K; the tail keeps ~0.03%
    assert (x > 65536).mean() > 1e-4
    heavier = get_distribution("github").sample(200_000, np.random.default_rng(3))
    assert np.quantile(heavier, 0.999) > np.quantile(x, 0.999)


def test_fit_recovers_parameters():
    true = LongTailDistribution("t", body_median=500, body_sigma=1.0, tail_start=8000, tail_alpha=1.8,
                                tail_fraction=0.02, min_len=1)
    x = true.sample(400_000, np.random.default_rng(4))
    fit = fit_long_tail(x, "fit", tail_quantile=0.98)
    assert fit.tail_alpha == pytest.approx(1.8, rel=0.05)
    assert fit.body_median == pytest.approx(500, rel=0.05)
    assert fit.tail_start == pytest.approx(8000, rel=0.05)


def test_unknown_distribution_lists_known():
    with pytest.raises(PlanningError, match="unknown length distribution 'zipf'.*wikipedia"):
        get_distribution("zipf")
    assert {"wikipedia", "wikipedia-synth", "github", "commoncrawl"} <= set(presets())


@pytest.mark.parametrize("text, match", [
    ("", "holds no lengths"),
    ("12\nabc\n7\n", r"line 2: 'abc' is not an integer"),
    ("12\n3 4\n", "line 2: expected one integer"),
    ("12\n0\n", "line 2: length 0 is not positive"),
    ("5\n-3\n", "line 2: length -3 is not positive"),
    ("1.5\n", "line 1: '1.5' is not an integer"),
])
def test_malformed_length_files(tmp_path, text, match):
    f = tmp_path / "lengths.txt"
    f.write_text(text)
    with pytest.raises(PlanningError, match=match):
        load_length_file(f)


def test_missing_file_and_source_choice(tmp_path):
    with pytest.raises(PlanningError, match="does not exist"):
        load_length_file(tmp_path / "nope.txt")
    with pytest.raises(PlanningError, match="exactly one"):
        resolve_source(None, None)
    with pytest.raises(PlanningError, match="exactly one"):
        resolve_source(tmp_path / "x", "wikipedia")


def test_token_batches_budget_truncation_determinism(tmp_path):
    f = tmp_path / "lengths.txt"
    f.write_text("\n".join(str(x) for x in [100, 5000, 300, 70000, 20, 900, 4000, 1] * 50))
    src = load_length_file(f)
    a = [b for _, b in zip(range(20), token_batches(src, 8192, 6000, seed=7))]
    b = [b for _, b in zip(range(20), token_batches(src, 8192, 6000, seed=7))]
    c = [b for _, b in zip(range(20), token_batches(src, 8192, 6000, seed=8))]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    for batch in a:
        assert batch.max() <= 6000  # truncated
        assert batch.sum() <= 8192
    # a document that overflows starts the next batch: batches are full up to one document
    assert all(x.sum() + 6000 > 8192 for x in a[:-1])
    with pytest.raises(PlanningError, match="batch_tokens"):
        next(token_batches(src, 0, None, 0))


@pytest.mark.skipif(not SHARED_LENGTHS.is_file(), reason="../shared/data is not beside this checkout")
def test_real_wikipedia_file():
    src = load_length_file(SHARED_LENGTHS)
    assert len(src.lengths) == 1_000_000
    assert int(np.median(src.lengths)) == 347 and src.lengths.max() == 1_823_777
    batch = next(token_batches(src, 524_288, 196_608, seed=0))
    assert 400 <= len(batch) <= 800 and batch.sum() <= 524_288
