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


def test_buckets_hold_whole_tensors_and_load_back_exactly():
    """Buckets of at most N bytes of whole tensors (a larger tensor alone), loaded tensor by
    tensor from the bucket it was packed into; buckets that cut a tensor are refused."""
    import numpy as np

    from pliant.rl.weights import buckets_of, pack_tensors

    src, dst = Mixed(3), Mixed(4)
    tensors = list(src.state_dict().values())
    for size in (1, 16, 64, 1 << 20):
        groups = buckets_of(tensors, size)
        assert [i for g in groups for i in g] == list(range(len(tensors)))
        for g in groups:
            nbytes = sum(-(-tensors[i].numel() * tensors[i].element_size() // 8) * 8 for i in g)
            assert len(g) == 1 or nbytes <= size
        load_weights(dst, [pack_tensors([tensors[i] for i in g]) for g in groups])
        for (name, x), y in zip(src.state_dict().items(), dst.state_dict().values()):
            assert torch.equal(x, y), (size, name)
    whole = pack_weights(src)
    with pytest.raises(ValueError, match="bucket 0 ends inside a tensor"):
        load_weights(dst, [whole[:16], whole[16:]])  # a's 120 bytes cut after 16
    with pytest.raises(ValueError, match=r"in 2 bucket\(s\)"):
        load_weights(dst, [whole, np.zeros(8, dtype=np.uint8)])


def test_the_publisher_copies_in_the_background_and_the_store_keeps_the_newest(tmp_path):
    """WeightPublisher on a local Ray: the buckets it puts load into another model as the
    weights were when published, though the weights change right after before_update."""
    import ray

    from pliant.rl.weights import WeightPublisher, WeightStore, fetch

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        model, other = Mixed(5), Mixed(6)
        store = WeightStore.remote()
        pub = WeightPublisher(model, store, generation=0, bucket_bytes=32)
        snapshot = {k: v.clone() for k, v in model.state_dict().items()}
        assert pub.publish(1) >= 0.0
        assert pub.before_update() >= 0.0
        with torch.no_grad():
            model.a.add_(1.0)  # the update after the copies: the published version must not see it
        ray.get(pub.last)
        key, published = ray.get(store.latest.remote((-1, -1), 5.0))
        assert key == (0, 1) and len(published.refs) > 1 and published.nbytes == pack_weights(model).size
        load_weights(other, fetch(published))
        for (name, x), y in zip(snapshot.items(), other.state_dict().values()):
            assert torch.equal(x, y), name
        pub.publish(0)  # an older version does not replace the newer one
        pub.before_update()
        ray.get(pub.last)
        assert ray.get(store.latest.remote((-1, -1), 5.0))[0] == (0, 1)
    finally:
        ray.shutdown()


def test_bench_weights_writes_both_ways_and_checks_the_loaded_weights(tmp_path, capsys):
    import json

    from pliant.bench.weights_bench import main

    out = tmp_path / "w.json"
    assert main(["--sizes", "1000000", "--repeats", "1", "--out", str(out)]) == 0
    (size,) = json.loads(out.read_text())["sizes"]
    assert 0.9e6 < size["params"] < 1.2e6 and size["bytes"] >= 4 * size["params"]
    for way in ("bucketed", "blocking"):
        w = size["ways"][way]
        assert w["publish_to_loaded_s"] > 0 and w["learner_blocked_s"] >= 0 and w["per_byte_vs_smallest"] == 1.0
    assert "publish-to-loaded" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--sizes: 5 is not one of 1000000, 10000000, 100000000"):
        main(["--sizes", "5", "--out", str(out)])
