"""`pliant` command line."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pliant.planner.errors import InputError, PlanningError

DEFAULT_CONFIG = "configs/flexsp-7b-64gpu.yaml"
LOCAL_CONFIG = "configs/local-cpu.yaml"


def add_config_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--config", action="append", default=None, metavar="CFG",
                   help=f"job config (path or bundled name; default {default}); give it again to overlay "
                        f"more files, e.g. the coefficients from `pliant profile`")
    p.set_defaults(config_default=default)


def _add_length_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--lengths", metavar="FILE", help="length file: one token count per line")
    src.add_argument("--dist", metavar="NAME", help="named length distribution (see `pliant dists`)")
    p.add_argument("--batch-tokens", type=int, required=True, metavar="T", help="tokens per global batch")
    p.add_argument("--max-len", type=int, default=None, metavar="L", help="truncate sequences to L tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--solver", choices=["auto", "highs", "cbc", "heuristic"], default=None,
                   help="override planner.solver")
    p.add_argument("--time-limit", type=float, default=None, metavar="S", help="override planner.time_limit_s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pliant", description="pliant: adaptive sequence-parallel training runtime")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="plan one global batch and print the plan")
    add_config_arg(p, DEFAULT_CONFIG)
    _add_length_args(p)
    p.add_argument("--batch-index", type=int, default=0, help="which batch of the seeded stream to plan")
    p.add_argument("--out", default="plan.json", help="where to write the plan as JSON")
    p.add_argument("--no-baselines", action="store_true", help="skip pricing the static/BatchAda baselines")

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    bp = bsub.add_parser("planner", help="adaptive plans vs static, fixed-degree and BatchAda baselines")
    add_config_arg(bp, DEFAULT_CONFIG)
    _add_length_args(bp)
    bp.add_argument("--batches", type=int, default=20, metavar="K")
    bp.add_argument("--out", default="bench-planner.json")
    bp.add_argument("--plot", default=None, help="PNG path (default: next to --out)")
    bp.add_argument("--reference", default=None, metavar="JSON",
                    help="an earlier `bench planner` result on the same batches (same lengths, tokens, seed): "
                         "each plan is set against its plan")

    bc = bsub.add_parser("comm", help="LASP-2, ring, Ulysses, LASP-2H, DeepSpeed-Ulysses and the gated delta rule "
                                       "(gather, ring, heads) on local ranks")
    bc.add_argument("--world", type=int, default=4)
    bc.add_argument("--lengths", default="4096,16384,65536", help="comma-separated sequence lengths")
    bc.add_argument("--out", default="bench-comm.json")
    bc.add_argument("--heads", type=int, default=4)
    bc.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    bc.add_argument("--head-dim", type=int, default=32)
    bc.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    bc.add_argument("--repeats", type=int, default=3)
    bc.add_argument("--methods", default="lasp2,ring,ulysses,lasp2h,deepspeed,gdn_gather,gdn_ring,gdn_heads")
    bc.add_argument("--short", type=int, default=64,
                    help="every length also runs as sequences of this many tokens (0: one sequence only)")
    bc.add_argument("--softmax-max-len", type=int, default=None,
                    help="skip the softmax methods above this length (they are quadratic)")

    bt = bsub.add_parser("train", help="measured step time: adaptive vs every static degree vs data parallel")
    add_config_arg(bt, LOCAL_CONFIG)
    bt.add_argument("--out", default="bench-train.json")
    bt.add_argument("--rounds", type=int, default=3, help="round-robin rounds over the modes")
    bt.add_argument("--steps-per-round", type=int, default=8)
    bt.add_argument("--warmup", type=int, default=2, help="first steps of each mode left out of the medians")
    bt.add_argument("--batchada", action="store_true", help="add BatchAda: the best uniform degree per batch")
    bt.add_argument("--print-commands", action="store_true", help="print the torchrun command for every node")
    bt.add_argument("--node-rank", type=int, default=None, metavar="I",
                    help="multi-node configs: this node's index in cluster.hosts (default: SLURM_NODEID)")
    bt.add_argument("--run-dir", default="runs/bench-train",
                    help="multi-node configs: the fault supervisor's and monitor's files go here")

    bf = bsub.add_parser("faults", help="every fault class injected into a supervised job: detection, "
                                        "localisation, recovery, overhead, false alarms")
    add_config_arg(bf, "configs/faults-cpu.yaml")
    bf.add_argument("--out", default="faults.json")
    bf.add_argument("--repeats", type=int, default=3)
    bf.add_argument("--classes", default=None, help="comma-separated subset of the fault classes; 'none': only "
                                                    "the overhead and false-alarm runs")
    bf.add_argument("--overhead-steps", type=int, default=30)
    bf.add_argument("--jitter-steps", type=int, default=40)
    bf.add_argument("--overhead-repeats", type=int, default=None,
                    help="monitor off/on run pairs, interleaved (default: 16)")
    bf.add_argument("--torchft-repeats", type=int, default=None,
                    help="repeats of the torchft side-by-side runs (default: --repeats; 0 leaves them out)")
    bf.add_argument("--torchft-faults", default="crash,hang", help="torchft faults to run: crash, hang")
    bf.add_argument("--stress", type=int, default=0, metavar="N",
                    help="add a busy-machine phase: clean jobs and one injected non-communication hang beside N "
                         "CPU-burning processes and a disk hammer (write + fsync) in the run directory (default 0: "
                         "no such phase)")
    bf.add_argument("--stress-repeats", type=int, default=1, metavar="K", help="clean jobs under stress")
    bf.add_argument("--stress-only", action="store_true", help="run the busy-machine phase only (needs --stress)")
    bf.add_argument("--stress-no-disk", action="store_true", help="CPU burners only, no disk hammer")
    bf.add_argument("--multinode", action="store_true",
                    help="add the 2-node phase: faults on node 1 of a real 2-node job (needs root: network namespaces)")
    bf.add_argument("--multinode-only", action="store_true", help="run the 2-node phase only")
    bf.add_argument("--rl", action="store_true",
                    help="add the RL learner phase: a crash, a hang and a SIGSTOP on a rank of pliant rl's 2-rank "
                         "learner (configs/rl-local.yaml, made small)")
    bf.add_argument("--rl-only", action="store_true", help="run the RL learner phase only")

    bk = bsub.add_parser("cluster", help="adaptive SP on an emulated multi-node cluster: network namespaces "
                                         "joined by rate-limited links (root, ip, tc), profiled, every mode, a "
                                         "sweep of link rates")
    add_config_arg(bk, "configs/emulated-cluster.yaml")
    bk.add_argument("--out", default="bench-cluster.json", help="the JSON (a PNG of the sweep beside it)")
    bk.add_argument("--link-mbit", default=None,
                    help="the link rate, Mbit/s each way (default: derived from configs/flexsp-7b-64gpu.yaml)")
    bk.add_argument("--sweep", default="0.0625,0.25,4,16",
                    help="other link rates, as factors of the first (comma-separated; '' for none)")
    bk.add_argument("--rounds", type=int, default=6, help="round-robin rounds over the modes")
    bk.add_argument("--steps-per-round", type=int, default=8)
    bk.add_argument("--warmup", type=int, default=2, help="first steps of each mode left out of the medians")
    bk.add_argument("--timeout", type=float, default=1800, help="seconds for each profile and each bench")

    bg = bsub.add_parser("gpu-step", help="one GPU: a few steps of the job under torch.profiler: the GPU's busy "
                                          "fraction and kernel launches per pass (scripts/gpu-check.sh runs it)")
    add_config_arg(bg, "configs/faults-1gpu.yaml")
    bg.add_argument("--out", default="gpu-step.json")
    bg.add_argument("--warmup", type=int, default=3)
    bg.add_argument("--steps", type=int, default=5)

    bs = bsub.add_parser("startup", help="a one-step job from the command to its exit, and a crashed rank's job "
                                         "from the crash to the first step after the restart (medians)")
    add_config_arg(bs, "configs/local-cpu.yaml")
    bs.add_argument("--fault-config", default="configs/faults-cpu.yaml", help="the job whose rank 1 is crashed")
    bs.add_argument("--out", default="startup.json")
    bs.add_argument("--repeats", type=int, default=3)

    from pliant.launch.rl import RL_CONFIG, add_rl_args

    br = bsub.add_parser("rl", help="sync vs async RL (k = 1, 2) at the same resources: throughput, idle, "
                                    "staleness, reward")
    add_config_arg(br, RL_CONFIG)
    br.add_argument("--out", default="rl.json")
    br.add_argument("--seeds", type=int, default=3)
    br.add_argument("--modes", default=None, help="from sync, async_k1, async_k2 (default: all three; with "
                                                  "--learner-plan, the config's mode)")
    br.add_argument("--learner-plan", default=None, metavar="P[,P...]",
                    help="run every mode with each learner plan (adaptive, static, uniform, dp) on the same seeds: "
                         "the learner's step time, trained tokens/s, idle fractions, which samples went where")
    br.add_argument("--steps", type=int, default=None, help="override rl.steps")
    br.add_argument("--learner-world", default=None, metavar="W[,W...]",
                    help="run every mode with each learner world (e.g. 1,2) at the same total learner CPUs")
    br.add_argument("--learner-cpus", type=float, default=None,
                    help="learner CPUs in all, shared by its ranks (default: the config's world x num_cpus)")

    bw = bsub.add_parser("weights", help="the policy's weights from the learner to a rollout worker: publish-to-"
                                         "loaded time and the learner's time blocked, against model size (1M, 10M, "
                                         "100M parameters), bucketed and overlapped against packed on the learner's "
                                         "thread")
    bw.add_argument("--out", default="weights.json")
    bw.add_argument("--sizes", default="1000000,10000000,100000000")
    bw.add_argument("--repeats", type=int, default=5)

    r = sub.add_parser("rl", help="RL post-training (GRPO) on Ray: sync, or async streaming with a staleness bound")
    add_config_arg(r, RL_CONFIG)
    add_rl_args(r)
    r.add_argument("--run-dir", default="runs/rl", help="metrics, summary, checkpoints and the warm-start weights go "
                                                        "here")
    r.add_argument("--resume", action="store_true",
                   help="go on from the newest complete checkpoint in --run-dir (same config; any learner world)")

    t = sub.add_parser("train", help="train the config's model with adaptive sequence parallelism")
    add_config_arg(t, LOCAL_CONFIG)
    t.add_argument("--steps", type=int, default=None, help="override train.steps")
    t.add_argument("--run-dir", default="runs/latest", help="metrics (and checkpoints) go here")
    t.add_argument("--plan", choices=["adaptive", "static", "dp", "batchada"], default=None, help="override train.plan")
    t.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --run-dir")
    t.add_argument("--save-params", action="store_true", help="write the final parameters to RUN_DIR/final_params.pt")
    t.add_argument("--print-commands", action="store_true",
                   help="print the torchrun command for every node of the cluster instead of running")
    t.add_argument("--node-rank", type=int, default=None, metavar="I",
                   help="multi-node jobs: this node's index in cluster.hosts (default: SLURM_NODEID)")

    pf = sub.add_parser("profile", help="measure the cost-model coefficients on this machine (writes a config overlay)")
    add_config_arg(pf, LOCAL_CONFIG)
    pf.add_argument("--out", default="coeffs.yaml", help="YAML overlay with the measured cluster.bandwidth and cost")
    pf.add_argument("--report", default=None, help="JSON with every timing and fit (default: --out with .json)")
    pf.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (after one warm-up)")
    pf.add_argument("--calibration-steps", type=int, default=8, help="training steps that measure the per-step overhead")
    pf.add_argument("--quick", action="store_true", help="short sequences and one repeat (a smoke test)")
    pf.add_argument("--print-commands", action="store_true", help="print the torchrun command for every node")
    pf.add_argument("--node-rank", type=int, default=None, metavar="I",
                    help="multi-node configs: this node's index in cluster.hosts (default: SLURM_NODEID)")

    rp = sub.add_parser("report", help="PNG plots of a training run (loss, step time, group sizes), or the reward "
                                       "of RL runs against wall time and samples")
    rp.add_argument("run_dir", nargs="+", help="a run directory; several for RL runs (e.g. sync and async)")
    rp.add_argument("--out", default=None, help="PNG path (default: the first RUN_DIR/report.png)")

    sub.add_parser("dists", help="list the named length distributions")
    from pliant.launch.model_cmds import add_model_commands

    add_model_commands(sub)
    _add_data_parsers(sub, bsub)
    return parser


def _add_data_parsers(sub, bsub) -> None:
    """`pliant data prepare`, `pliant data sample-corpus` and `pliant bench prepare`."""
    d = sub.add_parser("data", help="corpora: tokenize JSONL / Parquet into Megatron's indexed dataset format")
    dsub = d.add_subparsers(dest="data", required=True)
    dp = dsub.add_parser("prepare", help="tokenize JSONL, JSONL.gz or Parquet files into PREFIX.bin + PREFIX.idx")
    dp.add_argument("--input", nargs="+", required=True, metavar="FILE", help="JSONL / JSONL.gz / Parquet files")
    dp.add_argument("--tokenizer", required=True, metavar="DIR", help="a Hugging Face tokenizer (or model) directory")
    dp.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.bin, PREFIX.idx, PREFIX.summary.json")
    dp.add_argument("--text-key", default="text", help="the JSON key / Parquet column holding the text")
    dp.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizer processes")
    dp.add_argument("--batch-size", type=int, default=1024, metavar="B", help="documents per encode_batch call")
    ds = dsub.add_parser("sample-corpus", help="a generated English JSONL corpus (standard-library docstrings, "
                                               "long-tailed document lengths; no downloads)")
    ds.add_argument("--out", required=True, metavar="FILE")
    ds.add_argument("--mb", type=float, default=10.0)
    ds.add_argument("--seed", type=int, default=0)

    da = dsub.add_parser("arithmetic", help="the RL arithmetic task: train.jsonl and test.jsonl of small sums and "
                                            "differences, and a tiny Llama policy directory with a tokenizer "
                                            "trained on them (no downloads; configs/rl-dataset.yaml uses it)")
    da.add_argument("--out", default="data/arithmetic", metavar="DIR")
    da.add_argument("--train", type=int, default=1000, help="training problems")
    da.add_argument("--test", type=int, default=200, help="held-out problems (none of them in train.jsonl)")
    da.add_argument("--seed", type=int, default=0)
    da.add_argument("--family", default="llama", help="the policy's model family, as `pliant model init --family` "
                                                      "(qwen3_5, qwen3_next: Gated DeltaNet hybrids, 4 layers)")
    da.add_argument("--overwrite", action="store_true", help="replace DIR/policy if it exists")

    dl = dsub.add_parser("long-context", help="the RL long-context task: train.jsonl and test.jsonl of retrieval "
                                              "questions over generated contexts of long-tailed length (most a few "
                                              "hundred tokens, a few several thousand), and a tiny Llama policy "
                                              "directory (no downloads; configs/rl-long.yaml uses it)")
    dl.add_argument("--out", default="data/long-context", metavar="DIR")
    dl.add_argument("--train", type=int, default=2000, help="training prompts")
    dl.add_argument("--test", type=int, default=200, help="held-out prompts")
    dl.add_argument("--seed", type=int, default=0)
    dl.add_argument("--overwrite", action="store_true", help="replace DIR/policy if it exists")

    bpp = bsub.add_parser("prepare", help="pliant data prepare vs the tokenizer's own encode_batch, tokens/s")
    bpp.add_argument("--out", default="bench-prepare.json")
    bpp.add_argument("--mb", type=float, default=50.0, help="size of the generated JSONL corpus")
    bpp.add_argument("--workers", default="1,2", metavar="N[,N...]", help="worker counts to measure prepare at")
    bpp.add_argument("--repeats", type=int, default=3)
    bpp.add_argument("--vocab-size", type=int, default=8192)


def cmd_data(args: argparse.Namespace) -> int:
    if args.data == "arithmetic":
        from pliant.rl.arithmetic import prepare_arithmetic

        out = Path(args.out)
        if (out / "policy").exists() and not args.overwrite:
            print(f"{out / 'policy'} exists: keeping it and its dataset (--overwrite makes them again)")
            return 0
        from pliant.runtime.scaffold import FAMILIES, HYBRID_FAMILIES

        if args.family not in FAMILIES + HYBRID_FAMILIES:
            raise ValueError(f"--family {args.family!r}: choose from {', '.join(FAMILIES + HYBRID_FAMILIES)}")
        layers = 4 if args.family in HYBRID_FAMILIES else 2  # three Gated DeltaNet layers and a softmax one
        files = prepare_arithmetic(out, train=args.train, test=args.test, seed=args.seed, overwrite=args.overwrite,
                                   family=args.family, layers=layers)
        print(f"wrote {files.train} ({args.train} problems), {files.test} ({args.test}) and the policy {files.policy}")
        return 0
    if args.data == "long-context":
        from pliant.rl.long_context import prepare_long_context

        out = Path(args.out)
        if (out / "policy").exists() and not args.overwrite:
            print(f"{out / 'policy'} exists: keeping it and its dataset (--overwrite makes them again)")
            return 0
        if args.train < 1 or args.test < 1:
            raise PlanningError(f"--train {args.train} and --test {args.test} must be >= 1")
        files = prepare_long_context(out, train=args.train, test=args.test, seed=args.seed, overwrite=args.overwrite)
        print(f"wrote {files.train} ({args.train} prompts), {files.test} ({args.test}) and the policy {files.policy}")
        return 0
    if args.data == "sample-corpus":
        from pliant.bench.prepare_bench import make_corpus

        if args.mb <= 0:
            raise PlanningError(f"--mb must be positive, got {args.mb}")
        c = make_corpus(Path(args.out), args.mb, args.seed)
        print(f"wrote {args.out}: {c['documents']:,} documents, {c['bytes'] / 1e6:.1f} MB")
        return 0
    from pliant.runtime.prepare import prepare, print_summary

    summary = prepare(args.input, args.tokenizer, args.out, text_key=args.text_key, workers=args.workers,
                      batch_size=args.batch_size)
    print_summary(summary)
    print(f"wrote {args.out}.bin, {args.out}.idx and {args.out}.summary.json")
    return 0


def cmd_bench_prepare(args: argparse.Namespace) -> int:
    from pliant.bench.prepare_bench import run

    try:
        workers = tuple(int(w) for w in args.workers.split(","))
    except ValueError:
        workers = ()
    if not workers or min(workers) < 1 or args.repeats < 1 or args.mb <= 0:
        raise PlanningError(f"--workers {args.workers!r} must be positive integers, --repeats >= 1 and --mb > 0")
    run(Path(args.out), mb=args.mb, workers=workers, repeats=args.repeats, vocab_size=args.vocab_size)
    print(f"wrote {args.out}")
    return 0


def load_planner(args: argparse.Namespace):
    """The job config and its planner, with the command line's overrides of the planner section."""
    from pliant.config import load_config, with_overrides
    from pliant.planner import Planner

    cfg = load_config(args.config)
    cfg = with_overrides(cfg, "planner", solver=args.solver, time_limit_s=args.time_limit)
    return cfg, Planner.from_specs(cfg.cluster, cfg.model, cfg.cost, cfg.planner)


def cmd_plan(args: argparse.Namespace) -> int:
    import itertools

    from pliant.launch.render import print_plan
    from pliant.planner import baselines, resolve_source, token_batches

    _, planner = load_planner(args)
    source = resolve_source(args.lengths, args.dist)
    stream = token_batches(source, args.batch_tokens, args.max_len, args.seed)
    lengths = next(itertools.islice(stream, args.batch_index, None))
    plan = planner.plan(lengths)
    base = None if args.no_baselines else baselines(planner, lengths, args.max_len)
    print_plan(plan, base)
    plan.to_json(Path(args.out))
    print(f"wrote {args.out}")
    return 0


def cmd_bench_planner(args: argparse.Namespace) -> int:
    from pliant.bench.planner_bench import run

    out = Path(args.out)
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    cfg, planner = load_planner(args)
    run(planner, cfg.cluster, cfg.model, " + ".join(args.config), args.lengths, args.dist, args.batch_tokens, args.max_len,
        args.batches, args.seed, out, plot, reference=args.reference)
    print(f"wrote {out} and {plot}")
    return 0


def cmd_bench_comm(args: argparse.Namespace) -> int:
    from pliant.bench.comm_bench import METHODS, launch

    if args.world < 1:
        raise PlanningError(f"--world must be >= 1, got {args.world}")
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise PlanningError(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    worker = ["--lengths", args.lengths, "--out", str(Path(args.out).resolve()), "--heads", str(args.heads),
              "--kv-heads", str(args.kv_heads or args.heads), "--head-dim", str(args.head_dim), "--dtype", args.dtype,
              "--repeats", str(args.repeats), "--methods", ",".join(methods)]
    if args.softmax_max_len is not None:
        worker += ["--softmax-max-len", str(args.softmax_max_len)]
    if args.short < 0:
        raise PlanningError(f"--short must be >= 0 (0: one sequence per length only), got {args.short}")
    worker += ["--short", str(args.short)]
    rc = launch(args.world, worker)
    if rc == 0:
        print(f"wrote {args.out}")
    return rc


def cmd_profile(args: argparse.Namespace) -> int:
    from pliant.config import load_config
    from pliant.launch.launcher import launch
    from pliant.launch.torchrun import config_args
    from pliant.launch.profile import main as profile_main

    if args.repeats < 1 or args.calibration_steps < 3:
        raise PlanningError(f"--repeats must be >= 1 and --calibration-steps >= 3, got {args.repeats} and "
                            f"{args.calibration_steps}")
    rank_args = config_args(args.config)
    rank_args += ["--out", str(Path(args.out).resolve()), "--repeats", str(args.repeats),
                  "--calibration-steps", str(args.calibration_steps)]
    if args.report:
        rank_args += ["--report", str(Path(args.report).resolve())]
    if args.quick:
        rank_args.append("--quick")
    return launch(load_config(args.config), "pliant.launch.profile", rank_args, profile_main, args.print_commands,
                  node_rank=args.node_rank)


def check_rounds(args: argparse.Namespace) -> None:
    """The round-robin benches' --rounds, --steps-per-round and --warmup."""
    if args.rounds < 1 or args.steps_per_round < 1 or not 0 <= args.warmup < args.rounds * args.steps_per_round:
        raise PlanningError(f"--rounds and --steps-per-round must be >= 1 and --warmup below their product, got "
                            f"{args.rounds}, {args.steps_per_round}, {args.warmup}")


def cmd_bench_gpu_step(args: argparse.Namespace) -> int:
    from pliant.bench.gpu_check import main as gpu_main
    from pliant.config import load_config
    from pliant.launch.launcher import launch
    from pliant.launch.torchrun import config_args

    rank_args = config_args(args.config) + ["--out", str(Path(args.out).resolve()), "--warmup", str(args.warmup),
                                            "--steps", str(args.steps)]
    return launch(load_config(args.config), "pliant.bench.gpu_check", rank_args, gpu_main)


def cmd_bench_cluster(args: argparse.Namespace) -> int:
    from pliant.bench.cluster_net import ClusterNetError, parse_link_mbit
    from pliant.launch.cluster_bench import run

    try:
        link = parse_link_mbit(args.link_mbit) if args.link_mbit is not None else None
        factors = tuple(float(parse_link_mbit(f)) for f in args.sweep.split(",") if f.strip())
        check_rounds(args)
        return run(args.config, Path(args.out), link, factors, args.rounds, args.steps_per_round, args.warmup,
                   args.timeout)
    except ClusterNetError as e:
        print(f"pliant: error: {e}", file=sys.stderr)
        return 2


def cmd_bench_train(args: argparse.Namespace) -> int:
    from pliant.bench.train_bench import main as bench_main
    from pliant.config import load_config
    from pliant.launch.launcher import launch
    from pliant.launch.torchrun import config_args

    check_rounds(args)
    bench_args = ["--out", str(Path(args.out).resolve()), "--rounds", str(args.rounds), "--steps-per-round",
                  str(args.steps_per_round), "--warmup", str(args.warmup)] + (["--batchada"] if args.batchada else [])
    cfg = load_config(args.config)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if cfg.cluster.nodes > 1 and not (launched or args.print_commands):
        # several nodes: this node's part, as `pliant train --node-rank I` runs it (under the
        # fault supervisor and its monitor when faults.enabled)
        from pliant.launch.launcher import run_node

        return run_node(cfg, args.config, "pliant.bench.train_bench", bench_args, Path(args.run_dir), args.node_rank)
    return launch(cfg, "pliant.bench.train_bench", config_args(args.config) + bench_args, bench_main,
                  args.print_commands)


def cmd_bench_startup(args: argparse.Namespace) -> int:
    from pliant.bench.startup_bench import run
    from pliant.config import resolve_config_path

    if args.repeats < 1:
        raise PlanningError(f"--repeats must be >= 1, got {args.repeats}")
    run(str(resolve_config_path(args.config[0])), str(resolve_config_path(args.fault_config)), Path(args.out),
        args.repeats)
    return 0


def cmd_bench_faults(args: argparse.Namespace) -> int:
    from pliant.bench.faults_bench import CLASSES, run
    from pliant.bench.torchft_compare import FAULTS
    from pliant.config import resolve_config_path

    classes = [] if args.classes == "none" else args.classes.split(",") if args.classes else list(CLASSES)
    unknown = [c for c in classes if c not in CLASSES]
    if unknown or args.repeats < 1 or args.overhead_steps < 4 or args.jitter_steps < 4 or \
            (args.overhead_repeats is not None and args.overhead_repeats < 1):
        raise PlanningError(f"--classes: unknown {unknown} (known: {', '.join(CLASSES)}); --repeats and "
                            f"--overhead-repeats >= 1, --overhead-steps and --jitter-steps >= 4")
    if len(args.config) != 1:
        raise PlanningError("bench faults takes one --config")
    torchft_faults = tuple(args.torchft_faults.split(",")) if args.torchft_faults else ()
    if any(f not in FAULTS for f in torchft_faults):
        raise PlanningError(f"--torchft-faults: {args.torchft_faults!r}; known: {', '.join(FAULTS)}")
    torchft_repeats = args.repeats if args.torchft_repeats is None else args.torchft_repeats
    if args.stress < 0 or args.stress_repeats < 1 or (args.stress_only and args.stress < 1):
        raise PlanningError(f"--stress must be >= 0 (>= 1 with --stress-only) and --stress-repeats >= 1, got "
                            f"{args.stress} and {args.stress_repeats}")
    run(resolve_config_path(args.config[0]), Path(args.out), args.repeats, classes, args.overhead_steps,
        args.jitter_steps, torchft_repeats, torchft_faults, args.overhead_repeats, stress_cpu=args.stress,
        stress_repeats=args.stress_repeats, stress_only=args.stress_only, stress_disk=not args.stress_no_disk,
        multinode=args.multinode, multinode_only=args.multinode_only,
        rl_config=resolve_config_path("configs/rl-local.yaml") if args.rl or args.rl_only else None,
        rl_only=args.rl_only)
    print(f"wrote {args.out}")
    return 0


def cmd_bench_rl(args: argparse.Namespace) -> int:
    from pliant.bench.rl_bench import MODES, run
    from pliant.launch.rl import rl_config

    from pliant.bench.rl_bench import LEARNER_PLANS

    cfg = rl_config(args.config, steps=args.steps)
    plans = args.learner_plan.split(",") if args.learner_plan else None
    if plans is not None and (not plans or any(p not in LEARNER_PLANS for p in plans) or len(set(plans)) != len(plans)):
        raise PlanningError(f"--learner-plan {args.learner_plan!r} must be distinct plans from "
                            f"{', '.join(LEARNER_PLANS)}")
    if args.modes is not None:
        modes = args.modes.split(",")
    elif plans:  # the config's mode
        modes = ["sync" if cfg.rl.mode == "sync" else f"async_k{cfg.rl.staleness}"]
    else:
        modes = list(MODES)
    if args.seeds < 1 or not modes or any(m not in MODES for m in modes) or ("sync" not in modes and not plans):
        raise PlanningError(f"--seeds {args.seeds} must be >= 1; --modes {args.modes!r} must be from "
                            f"{', '.join(MODES)} and include sync (unless --learner-plan compares plans)")
    try:
        worlds = [int(w) for w in args.learner_world.split(",")] if args.learner_world else None
    except ValueError:
        worlds = [0]
    if worlds is not None and (not worlds or min(worlds) < 1 or len(set(worlds)) != len(worlds)):
        raise PlanningError(f"--learner-world {args.learner_world!r} must be distinct positive integers, e.g. 1,2")
    if args.learner_cpus is not None and args.learner_cpus <= 0:
        raise PlanningError(f"--learner-cpus {args.learner_cpus} must be positive")
    run(cfg, Path(args.out), args.seeds, modes, worlds=worlds, learner_cpus=args.learner_cpus, plans=plans)
    print(f"wrote {args.out}")
    return 0


def cmd_dists(_: argparse.Namespace) -> int:
    import numpy as np

    from pliant.planner.lengths import describe, presets

    for name, dist in sorted(presets().items()):
        d = describe(dist.sample(200_000, np.random.default_rng(0)))
        print(f"{name:16s} {type(dist).__name__:22s} median {d['median']:7.0f}  mean {d['mean']:7.0f}  "
              f"p99 {d['p99']:8.0f}  p99.9 {d['p999']:9.0f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from pliant.launch.model_cmds import run_model_command
    from pliant.runtime.errors import ExportError

    args = build_parser().parse_args(argv)
    if hasattr(args, "config_default"):
        args.config = args.config or [args.config_default]
    try:
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "dists":
            return cmd_dists(args)
        rc = run_model_command(args)
        if rc is not None:
            return rc
        if args.command == "report":
            from pliant.bench.report import render_any

            print(f"wrote {render_any([Path(d) for d in args.run_dir], args.out)}")
            return 0
        if args.command == "train":
            from pliant.launch.launcher import cmd_train

            return cmd_train(args)
        if args.command == "profile":
            return cmd_profile(args)
        if args.command == "rl":
            from pliant.launch.rl import cmd_rl

            return cmd_rl(args)
        if args.command == "bench" and args.bench == "planner":
            return cmd_bench_planner(args)
        if args.command == "bench" and args.bench == "train":
            return cmd_bench_train(args)
        if args.command == "bench" and args.bench == "gpu-step":
            return cmd_bench_gpu_step(args)
        if args.command == "bench" and args.bench == "cluster":
            return cmd_bench_cluster(args)
        if args.command == "bench" and args.bench == "startup":
            return cmd_bench_startup(args)
        if args.command == "bench" and args.bench == "faults":
            return cmd_bench_faults(args)
        if args.command == "bench" and args.bench == "rl":
            return cmd_bench_rl(args)
        if args.command == "bench" and args.bench == "weights":
            from pliant.bench.weights_bench import main as weights_main

            return weights_main(["--out", args.out, "--sizes", args.sizes, "--repeats", str(args.repeats)])
        if args.command == "bench" and args.bench == "comm":
            return cmd_bench_comm(args)
        if args.command == "bench" and args.bench == "prepare":
            return cmd_bench_prepare(args)
        if args.command == "data":
            return cmd_data(args)
    except (InputError, ExportError) as e:  # bad input: config, data, model, checkpoint (pliant.planner.errors)
        print(f"pliant: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
