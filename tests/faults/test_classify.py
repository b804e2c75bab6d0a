"""The master's rules on hand-made agent reports (the real JobPicture, no job)."""
import pytest

from pliant.comm.monitor.classify import JobPicture
from pliant.comm.monitor.spec import FaultSpec

GROUP = [0, 1, 2, 3]


def report(picture: JobPicture, rank: int, op: str, now: float) -> None:
    """Rank `rank` says it is inside collective 7 of the world group, calling `op`."""
    row = [GROUP, 7, op, now, None, 8, "float32", [2], None, 5, True, False]
    picture.ingest({"rank": rank, "pid": 100 + rank, "host": "h", "slot": rank, "type": "summary", "step": 5,
                    "in_checkpoint": False, "inflight": [row], "events": []}, now)


def test_a_desync_blames_the_odd_rank_only_once_a_majority_shows_it():
    picture = JobPicture(FaultSpec(), world=4)
    report(picture, 1, "all_reduce", 1.0)  # the desynced rank reports first
    report(picture, 3, "broadcast_object_list", 1.1)
    assert [i for i in picture.check(1.2) if i.kind == "desync"] == []  # one against one: not yet known which
    report(picture, 0, "broadcast_object_list", 1.3)
    found = [i for i in picture.check(1.4) if i.kind == "desync"]
    assert len(found) == 1 and found[0].ranks == [1] and found[0].exclude == [1]


def test_a_desync_in_a_group_that_has_all_reported_is_decided_even_on_a_tie():
    picture = JobPicture(FaultSpec(), world=4)
    for rank, op in ((1, "all_reduce"), (3, "broadcast_object_list"), (0, "all_reduce"), (2, "broadcast_object_list")):
        report(picture, rank, op, 1.0)
    found = [i for i in picture.check(1.1) if i.kind == "desync"]
    assert len(found) == 1 and len(found[0].ranks) == 2


# ----- progress evidence: a slow rank is not a hung rank -----
def summary(picture: JobPicture, rank: int, now: float, cpu: float, inflight: bool = True, stack: int = 1,
            other_cpu: float = 0.0, device=None) -> None:
    """Rank `rank` reports: inside collective 7 of the world group (or not), its main thread
    at `cpu` CPU seconds with stack fingerprint `stack`."""
    row = [GROUP, 7, "all_reduce", 1.0, None, 8, "float32", [2], None, 5, True, False]
    picture.ingest({"rank": rank, "pid": 100 + rank, "host": "h", "slot": rank, "type": "report", "step": 5,
                    "in_checkpoint": False, "inflight": [row] if inflight else [], "events": [],
                    "main": [cpu, 0, stack], "frames": [f"train.py:{stack} step"], "other_cpu": other_cpu,
                    "device": device}, now)


def every_report(picture: JobPicture, start: float, until: float, report) -> list:
    """`report(t)` every 0.2 s from `start` to `until`, the master's check after each; the incidents."""
    found, t = [], start
    while t <= until:
        report(t)
        found += picture.check(t)
        t = round(t + 0.2, 3)
    return found


def late_rank_1(picture: JobPicture, until: float, cpu_per_s: float) -> list:
    """Ranks 0, 2, 3 wait in collective 7 from t=1; rank 1 has not entered it and uses
    `cpu_per_s` of a core (its stack unchanged). Every rank reports every 0.2 s."""
    def report(t: float) -> None:
        for r in (0, 2, 3):
            summary(picture, r, t, cpu=1.0)
        summary(picture, 1, t, cpu=1.0 + cpu_per_s * (t - 1.0), inflight=False)

    return every_report(picture, 1.0, until, report)


def test_a_late_rank_that_computes_is_not_hung():
    # hang_warmup_s: before any baseline the wait limit is the floor
    spec = FaultSpec(hang_warmup_s=2.0)
    assert late_rank_1(JobPicture(spec, world=4), until=8.0, cpu_per_s=0.1) == []
    found = late_rank_1(JobPicture(spec, world=4), until=8.0, cpu_per_s=0.0)  # the same, stuck
    assert [(i.kind, i.ranks) for i in found] == [("noncomm_hang", [1])]
    ev = found[0].evidence["culprit_state"]["1"]
    assert ev["stuck_s"] >= spec.progress_window_s and ev["stack"] == ["train.py:1 step"]
    assert found[0].detected <= 1.0 + max(spec.hang_warmup_s, spec.progress_window_s) + 0.4


def test_a_late_rank_that_computes_is_hung_after_busy_silence_max_s():
    spec = FaultSpec(hang_warmup_s=2.0, busy_silence_max_s=5.0)
    found = late_rank_1(JobPicture(spec, world=4), until=8.0, cpu_per_s=0.1)
    assert [(i.kind, i.ranks) for i in found] == [("noncomm_hang", [1])]
    assert found[0].detected >= 6.0


def silent_rank_3(picture: JobPicture, until: float, outside_cpu_per_s: float, state: str = "S") -> list:
    """Every rank reports until t=2; then rank 3 falls silent while the master's process
    watch sees its main thread in `state`, using `outside_cpu_per_s` of a core."""
    from pliant.comm.monitor.progress import ThreadSample

    def report(t: float) -> None:
        for r in range(4):
            if r != 3 or t <= 2.0:
                summary(picture, r, t, cpu=t, inflight=False, stack=int(t * 10))
        picture.ranks[3].process = "running"
        picture.observe(3, ThreadSample(5.0 + outside_cpu_per_s * t, 0, None, state), t)

    return every_report(picture, 0.2, until, report)


def test_a_silent_rank_whose_main_thread_works_is_not_hung():
    spec = FaultSpec()
    assert silent_rank_3(JobPicture(spec, world=4), until=10.0, outside_cpu_per_s=0.2) == []
    # runnable but given no CPU (a loaded host): starved, not stuck
    assert silent_rank_3(JobPicture(spec, world=4), until=10.0, outside_cpu_per_s=0.0, state="R") == []
    found = silent_rank_3(JobPicture(spec, world=4), until=10.0, outside_cpu_per_s=0.0)  # sleeping, no CPU
    assert [(i.kind, i.ranks) for i in found] == [("noncomm_hang", [3])]
    ev = found[0].evidence
    assert "no progress" in ev["why"] and ev["main_thread_outside"]["state"] == "S"
    assert found[0].detected <= 2.0 + spec.heartbeat_min_s + 0.4


def all_inside(picture: JobPicture, until: float, other_cpu_per_s: float) -> list:
    """Ranks 0-3 all inside collective 7 from t=1, main threads blocked; their other
    threads (gloo's) use `other_cpu_per_s` of a core."""
    def report(t: float) -> None:
        for r in range(4):
            summary(picture, r, t, cpu=1.0, other_cpu=other_cpu_per_s * t)

    return every_report(picture, 1.0, until, report)


def test_a_collective_whose_bytes_move_is_not_hung():
    spec = FaultSpec(hang_warmup_s=2.0)
    assert all_inside(JobPicture(spec, world=4), until=6.0, other_cpu_per_s=0.5) == []
    found = all_inside(JobPicture(spec, world=4), until=6.0, other_cpu_per_s=0.003)  # idle gloo threads
    assert [(i.kind, i.ranks) for i in found] == [("comm_hang", GROUP)]


def test_a_busy_host_over_a_stuck_device_is_stuck():
    """On CUDA a host may spin while its device never runs the queued work: stuck."""
    picture = JobPicture(FaultSpec(), world=4)
    for t in (1.0, 1.2, 1.4, 4.0):
        summary(picture, 1, t, cpu=t, inflight=False, device=[True, 0.5])  # host CPU grows
    assert picture.ranks[1].stuck_for(4.0) == 3.5
    summary(picture, 1, 4.2, cpu=4.2, inflight=False, device=[True, 4.1])  # the device moved
    assert picture.ranks[1].stuck_for(4.2) < 0.2


# ----- several nodes -----
def node_report(picture: JobPicture, node: int, now: float, procs: dict | None = None, gone=()) -> str | None:
    return picture.node_report({"type": "node", "node": node, "host": f"n{node}", "pid": 900 + node,
                                "procs": procs or {}, "gone": list(gone)}, now)


def two_nodes(picture: JobPicture, t: float) -> None:
    """Ranks 0, 1 on node 0 and 2, 3 on node 1 report (all inside collective 7), and so do both node agents."""
    for r in range(4):
        row = [GROUP, 7, "all_reduce", 1.0, None, 8, "float32", [2], None, 5, True, False]
        picture.ingest({"rank": r, "pid": 100 + r, "host": "h", "node": r // 2, "slot": r, "type": "report",
                        "step": 5, "in_checkpoint": False, "inflight": [row], "events": [], "main": [1.0, 0, 1],
                        "frames": None, "other_cpu": 0.0, "device": None}, t)
    for n in (0, 1):
        node_report(picture, n, t, {str(100 + r): [1.0, 0, "S"] for r in (2 * n, 2 * n + 1)})


def test_a_node_whose_agent_and_ranks_fall_silent_is_lost_while_its_peers_raise():
    # agents and node agents report every 0.2 s here
    picture = JobPicture(FaultSpec(hang_warmup_s=1.0, report_interval_s=0.2, check_interval_s=0.2), world=4)
    for t in (0.2, 0.4, 0.6, 0.8, 1.0):
        two_nodes(picture, t)
    found, t = [], 1.0
    while t < 6.0 and not found:  # node 1 is gone; ranks 0, 1 raise at once (connection reset) and go on saying so
        t = round(t + 0.2, 3)
        for r in (0, 1):
            picture.ingest({"rank": r, "pid": 100 + r, "host": "h", "node": 0, "slot": r, "type": "bye",
                            "reason": "exception: RuntimeError: Connection reset by peer", "step": 5,
                            "in_checkpoint": False, "inflight": [], "events": []}, t)
        node_report(picture, 0, t, {})
        found = picture.check(t)
    assert [(i.kind, i.ranks, i.exclude_nodes, i.nodes) for i in found] == [("node_lost", [2, 3], [1], [1, 1])]
    assert found[0].detected <= 1.0 + 2.5


def test_a_crash_on_another_node_is_named_by_its_node_agent():
    picture = JobPicture(FaultSpec(), world=4)
    for t in (0.2, 0.4):
        two_nodes(picture, t)
    node_report(picture, 1, 0.5, {"102": [1.0, 0, "S"]}, gone=[103])
    found = picture.check(0.8)
    assert [(i.kind, i.ranks, i.nodes) for i in found] == [("crash", [3], [1])]


def test_two_node_agents_cannot_claim_the_same_node():
    picture = JobPicture(FaultSpec(), world=4)
    assert node_report(picture, 1, 0.2) is None
    err = picture.node_report({"type": "node", "node": 1, "host": "other", "pid": 5, "procs": {}, "gone": []}, 0.4)
    assert err is not None and "node rank 1 is already claimed by n1" in err


def test_a_node_that_said_goodbye_is_not_lost():
    picture = JobPicture(FaultSpec(), world=4)
    for t in (0.2, 0.4):
        two_nodes(picture, t)
    picture.node_report({"type": "node", "node": 1, "host": "n1", "pid": 901, "procs": {}, "gone": [], "bye": True},
                        0.5)
    for r in (2, 3):  # its ranks finished
        picture.ingest({"rank": r, "pid": 100 + r, "host": "h", "node": 1, "slot": r, "type": "bye",
                        "reason": "finished", "step": 8, "in_checkpoint": False, "inflight": [], "events": []}, 0.5)
    for t in (5.0, 9.0):  # node 0 goes on
        for r in (0, 1):
            picture.ingest({"rank": r, "pid": 100 + r, "host": "h", "node": 0, "slot": r, "type": "report", "step": 8,
                            "in_checkpoint": False, "inflight": [], "events": []}, t)
        node_report(picture, 0, t, {"100": [1.0, 0, "S"], "101": [1.0, 0, "S"]})
        assert picture.check(t) == []


def test_the_master_leaves_out_messages_of_another_start(tmp_path):
    """A rank of the previous start, still going down, reconnects to the new master: it is
    acknowledged (with the new start's number) and not taken into the picture."""
    from pliant.comm.monitor.master import Master

    master = Master(FaultSpec(), world=4, run_dir=tmp_path, attempt=1)
    old = {"rank": 2, "pid": 7, "host": "h", "slot": 2, "type": "hello", "attempt": 0, "msg": 1}
    assert master._handle(old, 1.0)["attempt"] == 1 and master.picture.ranks == {}
    master._handle({**old, "attempt": 1}, 1.1)
    assert list(master.picture.ranks) == [2]
    master.sock.close()


def test_the_master_sees_a_rank_process_exit_through_its_pidfd(tmp_path):
    """A rank's process on the master's host is watched through a pidfd in the main loop's
    poller: its exit is seen at once (no goodbye: a crash), with no polling thread."""
    import socket
    import subprocess
    import sys
    import threading
    import time

    import zmq

    from pliant.comm.monitor import wire
    from pliant.comm.monitor.master import Master

    spec = FaultSpec(report_interval_s=5.0, progress_window_s=15.0)  # its look at /proc: every 5 s
    master = Master(spec, world=1, run_dir=tmp_path)
    addr = master.bind("tcp://127.0.0.1:*")
    serving = threading.Thread(target=master.serve)
    serving.start()
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    try:
        dealer.connect(addr)
        dealer.send(wire.pack({"rank": 0, "pid": rank.pid, "host": socket.gethostname(), "slot": 0, "type": "hello",
                               "msg": 1}))
        assert dealer.poll(5000) and wire.unpack(dealer.recv())["msg"] == 1
        time.sleep(0.3)
        assert master.picture.ranks[0].gone_at is None and threading.active_count() == 2
        rank.kill()
        killed = time.monotonic()
        deadline = killed + 5
        while master.picture.ranks[0].gone_at is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert master.picture.ranks[0].gone_at is not None
        assert master.picture.ranks[0].gone_at - killed < 2.0  # not the look, 5 s after the start
    finally:
        master.stop()
        serving.join(5)
        dealer.close(0)
        rank.wait()
        master.sock.close()


# ----- errors are not faults: the job's own error stops it, a rank's odd exception is a crash -----
def says(picture: JobPicture, rank: int, now: float, reason: str) -> None:
    picture.ingest({"rank": rank, "pid": 100 + rank, "host": "h", "slot": rank, "type": "bye", "step": 3,
                    "in_checkpoint": False, "inflight": [], "events": [], "reason": reason}, now)


def byes(said: dict[int, str], until: float = 5.0) -> list:
    """Every rank reports from t=0.2; at t=1 the ranks in `said` say goodbye with their reason."""
    spec = FaultSpec()
    picture = JobPicture(spec, world=4)

    def report(t: float) -> None:
        for r in range(4):
            if r in said and t >= 1.0:
                if t == 1.0:
                    says(picture, r, t, said[r])
            else:
                summary(picture, r, t, cpu=t, inflight=False, stack=int(t * 10))

    return every_report(picture, 0.2, until, report)


def test_an_input_error_on_one_rank_stops_the_job_at_once_blaming_no_rank():
    found = byes({2: "error: DataError: tok.bin: token id 300 ..."})
    assert [(i.kind, i.ranks, i.action, i.exclude) for i in found] == [("error", [], "stop", [])]
    assert found[0].evidence["raised_by"] == [2] and found[0].evidence["message"].startswith("DataError")
    assert found[0].detected <= 1.0 + 0.2 + 1e-9


def test_the_same_exception_on_every_rank_stops_the_job():
    found = byes({r: "exception: RuntimeError: boom" for r in range(4)})
    assert [(i.kind, i.ranks, i.action) for i in found] == [("error", [], "stop")]
    assert found[0].evidence["raised_by"] == [0, 1, 2, 3]


def test_an_exception_on_one_rank_is_a_crash_once_the_others_did_not_follow():
    spec = FaultSpec()
    found = byes({1: "exception: RuntimeError: boom"})
    assert [(i.kind, i.ranks, i.action) for i in found] == [("crash", [1], "restart")]
    assert found[0].detected >= 1.0 + spec.same_error_s - 1e-9  # the others had their chance to say the same
    found = byes({1: "exception: RuntimeError: boom", 3: "exception: ValueError: other"})
    assert [(i.kind, i.ranks) for i in found] == [("crash", [1, 3])]  # different: no wait
    assert found[0].detected < 1.0 + 0.5


# ----- completed collectives as columns (agent.done_block -> the master's rings) -----
def columns_report(picture: JobPicture, rank: int, group: list[int], rows: list[tuple], now: float,
                   offset: float = 0.0) -> None:
    """Rank `rank` reports the completed collectives `rows` of `group`, as an agent does:
    (seq, (op, dtype, shape), enter, exit, step, finite) each, times on its own clock."""
    from pliant.comm.monitor.agent import done_block
    from pliant.comm.monitor.ops import signature_id

    cols = list(zip(*[(seq, signature_id(sig), enter, exit_, step, {1: True, 0: False, -1: None}[finite], False)
                      for seq, sig, enter, exit_, step, finite in rows]))
    sigs = {signature_id(sig): list(sig) for _, sig, *_ in rows}
    picture.ingest({"rank": rank, "pid": 100 + rank, "host": "h", "slot": rank, "type": "report", "step": 9,
                    "in_checkpoint": False, "inflight": [], "events": [], "done": [done_block(tuple(group), cols)],
                    "sigs": sigs, "offset": offset}, now)


SUM = ("all_reduce", "float64", (4,))


def test_columns_feed_the_baselines_and_the_arrival_order_once_every_member_reported():
    picture = JobPicture(FaultSpec(warmup_steps=1), world=3)
    group = [0, 1, 2]
    # rank 2 enters every collective 50 ms after the others; ten collectives, two per step from step 2
    rows = {r: [(seq, SUM, seq + (0.05 if r == 2 else 0.0), seq + 0.06, 2 + seq // 2, 1) for seq in range(10)]
            for r in group}
    columns_report(picture, 0, group, rows[0][:4], 0.1)
    columns_report(picture, 1, group, rows[1], 0.1)
    columns_report(picture, 2, group, rows[2], 0.1, offset=0.0)
    picture.check(0.2)  # collectives 0-3 are complete; 4-9 wait for rank 0
    assert picture.rings[(0, 1, 2)].base == 4
    assert len(picture.durations[((0, 1, 2), "all_reduce")]) == 3 * 4
    columns_report(picture, 0, group, rows[0][4:], 0.3)
    assert picture.check(0.4) == []
    assert len(picture.durations[((0, 1, 2), "all_reduce")]) == 3 * 10
    assert sorted(picture.durations[(3, "all_reduce")])[0] >= 0.01 - 1e-9
    # rank 2 arrived last every time, 50 ms after the next-to-last: its delay per step
    assert {step: dict(d) for step, d in picture.step_delay.items()} == \
        {step: {2: pytest.approx(0.1)} for step in range(2, 7)}


def test_columns_catch_a_desync_and_the_source_of_a_nan():
    group = [0, 1, 2]
    picture = JobPicture(FaultSpec(), world=3)
    for r in group:
        sig = ("all_reduce", "float64", (5,)) if r == 1 else SUM
        columns_report(picture, r, group, [(0, SUM, 1.0, 1.1, 3, 1), (1, sig, 1.2, 1.3, 3, 1)], 1.4)
    found = picture.check(1.5)
    assert [(i.kind, i.ranks) for i in found] == [("desync", [1])]
    assert found[0].evidence["seq"] == 1 and found[0].evidence["signatures"]["1"] == ["all_reduce", "float64", (5,)]

    picture = JobPicture(FaultSpec(nan="rollback"), world=3)
    for r in group:  # rank 2's input went non-finite at collective 1; at 2 every input is (it spread)
        rows = [(0, SUM, 1.0, 1.1, 3, 1), (1, SUM, 1.2, 1.3, 3, 0 if r == 2 else 1), (2, SUM, 1.4, 1.5, 3, 0)]
        columns_report(picture, r, group, rows, 1.6)
    found = picture.check(1.7)
    assert [(i.kind, i.ranks, i.evidence["seq"]) for i in found] == [("nan", [2], 1)]


def test_a_ring_grows_past_its_window_and_keeps_what_is_open():
    from pliant.comm.monitor.completed import GroupRing

    picture = JobPicture(FaultSpec(warmup_steps=0), world=2)
    group = [0, 1]
    rows = [(seq, SUM, float(seq), seq + 0.5, 1, 1) for seq in range(700)]
    columns_report(picture, 0, group, rows, 1.0)  # one member far ahead: 700 open collectives
    ring = picture.rings[(0, 1)]
    assert ring.window >= 700 > GroupRing((0, 1)).window
    columns_report(picture, 1, group, rows[:300], 1.1)
    picture.check(1.2)
    assert ring.base == 300
    columns_report(picture, 1, group, rows[300:], 1.3)
    picture.check(1.4)
    assert ring.base == 700 and len(picture.durations[(2, "all_reduce")]) == 400  # (its deque keeps 400)


def test_a_collective_one_member_never_reported_does_not_stop_the_group():
    from pliant.comm.monitor.completed import LOST_AFTER

    picture = JobPicture(FaultSpec(warmup_steps=0), world=2)
    rows = [(seq, SUM, float(seq), seq + 0.5, 1, 1) for seq in range(LOST_AFTER + 10)]
    columns_report(picture, 0, [0, 1], rows, 1.0)
    columns_report(picture, 1, [0, 1], rows[:3] + rows[4:], 1.0)  # rank 1 lost collective 3
    picture.check(1.1)
    ring = picture.rings[(0, 1)]
    assert ring.base == len(rows)
    assert len(picture.durations[((0, 1), "all_reduce")]) == 2 * (len(rows) - 1)
