"""`pliant bench weights`: the policy's weights from the learner to a rollout worker, against
model size (issue 32).

For each size (pliant's own model, shaped to about 1M, 10M and 100M parameters, float32), on a
local Ray cluster: the learner side (this process) publishes a new version through
rl/weights.py's `WeightPublisher`, then trains a step (a forward and backward of the model on
a short sequence) while the publish travels, waits for the copies before its update
(`before_update`) and changes every weight; a loader actor, a rollout worker's stand-in,
waits on the weight store, fetches each version's buckets and loads them into its own copy of
the model. Per publish:

    publish-to-loaded   from the learner's publish call to the loader's last copy (wall clock,
                        one machine)
    learner blocked     the publish call's own time plus the wait in before_update: the time
                        the learner's thread did not train because of the publish

Two ways, alternating: `bucketed` (the runtime's: buckets of rl/weights.py's BUCKET_BYTES,
copied by a background thread while the step trains) and `blocking` (the way before buckets:
one array, packed and put on the learner's thread), so the ratio is measured, not assumed.
Medians over repeats; seconds per GB show whether the time grows faster than the bytes.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from pliant.io import atomic_write_text, strict_dumps

# (hidden, layers) of pliant's own softmax model with a 1,024-token vocabulary: about 1M, 10M, 100M parameters
SHAPES = {1_000_000: (128, 3), 10_000_000: (256, 9), 100_000_000: (640, 15)}
WAYS = ("bucketed", "blocking")


def model_spec(params: int):
    from pliant.planner.spec import ModelSpec

    if params not in SHAPES:
        raise ValueError(f"--sizes: {params} is not one of {', '.join(map(str, SHAPES))}")
    hidden, layers = SHAPES[params]
    heads = hidden // 64
    return ModelSpec(name=f"weights-{params}", layers=layers, hidden=hidden, heads=heads, kv_heads=heads,
                     head_dim=64, ffn_hidden=4 * hidden, vocab_size=1024, attention=["softmax"], dtype="fp32",
                     zero_stage=0)


def loader_class():
    import ray

    @ray.remote(num_cpus=0)
    class Loader:
        """A rollout worker's stand-in: loads every version the store gets, at once."""

        def __init__(self, spec):
            import torch

            from pliant.runtime.hf import build_model

            torch.set_num_threads(1)
            self.model = build_model(spec, "cpu")
            self.seen = (-1, -1)

        def wait_and_load(self, store) -> dict[str, float]:
            import ray

            from pliant.rl.weights import fetch, load_weights

            key, published = ray.get(store.latest.remote(self.seen, None))
            t0 = time.perf_counter()
            load_weights(self.model, fetch(published))
            done = time.time()
            self.seen = tuple(key)
            return {"version": key[1], "publish_to_loaded_s": done - published.published_at,
                    "load_s": time.perf_counter() - t0, "bytes": published.nbytes}

        def checksum(self) -> float:
            return float(sum(p.double().sum() for p in self.model.parameters()))

    return Loader


def measure(params: int, repeats: int) -> dict[str, Any]:
    import ray
    import torch

    from pliant.rl.weights import WeightPublisher, WeightStore
    from pliant.runtime.hf import build_model
    from pliant.comm import SOLO
    from pliant.runtime.model import SeqContext

    spec = model_spec(params)
    torch.manual_seed(0)
    model = build_model(spec, "cpu")
    n_params = sum(p.numel() for p in model.parameters())
    store = WeightStore.remote()
    loader = loader_class().remote(spec)
    tokens = torch.randint(0, spec.vocab_size, (256,))
    ctx = SeqContext.build(SOLO, [len(tokens)], "cpu")
    rows: list[dict[str, Any]] = []
    version = 0
    try:
        for rep in range(repeats + 1):  # the first round warms both ways up and is left out
            for way in (WAYS if rep % 2 == 0 else WAYS[::-1]):
                pub = WeightPublisher(model, store, 0, background=way == "bucketed")
                version += 1
                loaded = loader.wait_and_load.remote(store)
                blocked = pub.publish(version)
                loss = model(tokens, ctx).float().logsumexp(-1).mean()  # the next step trains meanwhile
                loss.backward()
                blocked += pub.before_update()
                with torch.no_grad():  # the update: every weight changes
                    for p in model.parameters():
                        p.add_(p.grad, alpha=-1e-6)
                        p.grad = None
                got = ray.get(loaded)
                if rep:
                    rows.append({"way": way, "blocked_s": blocked, **got})
        # the last version is loaded whole: the loader's weights are the learner's before its update
        # (checked by a publish of the current weights)
        pub = WeightPublisher(model, store, 0)
        loaded = loader.wait_and_load.remote(store)
        pub.publish(version + 1)
        pub.before_update()
        ray.get(loaded)
        want = float(sum(p.detach().double().sum() for p in model.parameters()))
        if ray.get(loader.checksum.remote()) != want:
            raise RuntimeError("the loader's weights differ from the learner's after a publish")
    finally:
        ray.kill(loader)
        ray.kill(store)
    out: dict[str, Any] = {"params": n_params, "bytes": rows[0]["bytes"], "ways": {}}
    for way in WAYS:
        mine = [r for r in rows if r["way"] == way]
        lat = statistics.median(r["publish_to_loaded_s"] for r in mine)
        out["ways"][way] = {"publish_to_loaded_s": lat, "learner_blocked_s": statistics.median(r["blocked_s"] for r in mine),
                            "load_s": statistics.median(r["load_s"] for r in mine),
                            "s_per_gb": lat / (out["bytes"] / 1e9), "repeats": len(mine)}
    out["blocked_ratio_blocking_over_bucketed"] = (out["ways"]["blocking"]["learner_blocked_s"]
                                                   / max(out["ways"]["bucketed"]["learner_blocked_s"], 1e-9))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("pliant-bench-weights")
    p.add_argument("--out", default="weights.json")
    p.add_argument("--sizes", default="1000000,10000000,100000000", help="parameters, from " +
                   ", ".join(map(str, SHAPES)))
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    import ray

    try:
        sizes = [int(float(s)) for s in args.sizes.split(",")]
    except ValueError:
        raise SystemExit(f"--sizes {args.sizes!r}: comma-separated parameter counts from {', '.join(map(str, SHAPES))}")
    for s in sizes:
        model_spec(s)
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats} must be >= 1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        results = [measure(s, args.repeats) for s in sizes]
    finally:
        ray.shutdown()
    small = results[0]
    for r in results:  # the time per byte against the smallest size's: above 1 grows faster than the bytes
        for way in WAYS:
            r["ways"][way]["per_byte_vs_smallest"] = r["ways"][way]["s_per_gb"] / small["ways"][way]["s_per_gb"]
    doc = {"benchmark": "weights", "host": platform.node(), "machine": platform.machine(), "repeats": args.repeats,
           "bucket_bytes": __import__("pliant.rl.weights", fromlist=["BUCKET_BYTES"]).BUCKET_BYTES,
           "sizes": results}
    atomic_write_text(Path(args.out), strict_dumps(doc, indent=1))
    print_table(doc)
    print(f"wrote {args.out}")
    return 0


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"weights, learner -> rollout (medians of {doc['repeats']} publishes)")
    for col in ("params", "MB", "way", "publish-to-loaded s", "s per GB", "per byte vs smallest", "learner blocked s",
                "blocked: blocking / bucketed"):
        t.add_column(col, justify="right")
    for r in doc["sizes"]:
        for way in WAYS:
            w = r["ways"][way]
            t.add_row(f"{r['params']:,}", f"{r['bytes'] / 1e6:.1f}", way, f"{w['publish_to_loaded_s']:.4f}",
                      f"{w['s_per_gb']:.3f}", f"{w['per_byte_vs_smallest']:.2f}", f"{w['learner_blocked_s']:.4f}",
                      f"{r['blocked_ratio_blocking_over_bucketed']:.1f}x" if way == "bucketed" else "")
    Console(width=160).print(t)


if __name__ == "__main__":
    raise SystemExit(main())
