"""RL tasks: the copy task's prompts (unchanged by the Task protocol), prompt datasets from
JSONL and Parquet with a locally trained tokenizer, their errors, reward functions loaded by
path, and the built-in arithmetic task. CPU only, no Ray, no network."""
from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest

from pliant.planner.spec import ModelSpec
from pliant.rl.prompts import DatasetTask, PromptDataError
from pliant.rl.reward import FunctionLoadError, RewardFnError, RewardSample, load_function, load_reward_fn
from pliant.rl.spec import CopyTaskSpec, DatasetTaskSpec, RLConfigError, task_spec
from pliant.rl.task import EOS, CopyTask, build_task, reward as copy_reward
from pliant.rl.task_protocol import Prompt, Task

REPO = Path(__file__).resolve().parent.parent
TEXTS = [f"question number {i}: what is {i} plus {i + 1}?" for i in range(40)]


def own_model(vocab_size: int = 16) -> ModelSpec:
    return ModelSpec(name="own", layers=2, hidden=32, heads=2, kv_heads=1, head_dim=16, ffn_hidden=64,
                     vocab_size=vocab_size, attention=["softmax"], zero_stage=0, dtype="fp32")


def hf_model(path: Path) -> ModelSpec:
    return ModelSpec(hf_path=str(path), zero_stage=0)


def write_jsonl(path: Path, rows: list, opener=open) -> Path:
    with opener(path, "wt") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return path


def rows_of(n: int = 20) -> list[dict]:
    return [{"prompt": TEXTS[i], "answer": str(2 * i + 1), "extra": i} for i in range(n)]


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
    """The arithmetic task's dataset and tiny policy directory (tokenizer with a chat template)."""
    from pliant.rl.arithmetic import prepare_arithmetic

    return prepare_arithmetic(tmp_path_factory.mktemp("arith"), train=300, test=40, seed=3)


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    """A tokenizer directory with no chat template (and no model beside it)."""
    from pliant.runtime.tokenizer import train_bpe_tokenizer

    d = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(TEXTS * 3 + [str(i) for i in range(100)], 300, d)
    return d


def dataset_task(path, tok_dir=None, model=None, seed: int = 0, eval_prompts: int = 0, learner=None,
                 **spec) -> DatasetTask:
    fields = {"kind": "dataset", "dataset": str(path), **spec}
    if tok_dir is not None:
        fields["tokenizer"] = str(tok_dir)
    return build_task(task_spec(**fields), model or own_model(512), seed, eval_prompts, learner)


# ---------------------------------------------------------------- the copy task

def _digest(prompts: list[Prompt]) -> str:
    return hashlib.sha256(";".join(p.row["digits"] for p in prompts).encode()).hexdigest()[:16]


# recorded from the copy task before the Task protocol (CopyTask(spec, seed).prompts(300)):
# the runner drew training prompts with `seed`, supervised ones with 10000 + seed and the
# held-out ones with 99991
BEFORE = {(40, 0): "d9612e35e593bada", (40, 7): "da701ff36891be1e", (40, 10_000): "58562da6c041afd7",
          (40, 99_991): "80ae1a26eebf22ef", (24, 0): "6a12ca45bd87fefc", (24, 7): "d565fbc5216fe009",
          (24, 10_000): "a2a92c3bcd10bb5a", (24, 99_991): "ae7af368882a1d40"}


@pytest.mark.parametrize("max_digits,median", [(40, 4.0), (24, 6.0)])
def test_the_copy_task_draws_the_prompts_it_drew_before(max_digits, median):
    spec = CopyTaskSpec(max_digits=max_digits, median_digits=median)
    task = build_task(spec, own_model(), 0, 256)
    assert isinstance(task, Task)
    assert _digest(task.prompts(300)) == BEFORE[(max_digits, 0)]
    assert _digest(task.sft_examples(300)) == BEFORE[(max_digits, 10_000)]
    assert _digest(task.held_out(300)) == BEFORE[(max_digits, 99_991)]
    assert _digest(CopyTask.from_spec(spec, 7).prompts(300)) == BEFORE[(max_digits, 7)]


def test_copy_prompts_keep_their_token_ids_and_streams_stay_apart():
    task = build_task(task_spec(), own_model(), 0, 8)
    p = task.prompts(2)
    assert p[0] == Prompt(0, (10, 3, 0, 0, 0, 11), (3, 0, 0, 0, 12), "3000", {"digits": "3000"})
    assert p[1].tokens == (10, 5, 6, 9, 7, 6, 11) and p[1].uid == 1
    assert [q.uid for q in task.prompts(3)] == [2, 3, 4]
    held = task.held_out(4)
    assert [q.uid for q in held] == [-1, -2, -3, -4]
    assert held == task.held_out(4)  # fixed: the same every call
    assert held[0].tokens == (10, 4, 2, 11)
    task.sft_examples(50)
    other = build_task(task_spec(), own_model(), 0, 8)
    other.prompts(5)
    assert task.prompts(1) == other.prompts(1)  # drawing supervised examples did not move the training stream
    assert task.max_prompt() == 42 and task.max_response() == 41 and task.stop_tokens == (EOS,)
    assert task.counts() == {"prompts": 6, "sft_examples": 50}


def test_copy_reward_is_an_exact_match_of_the_response_ids():
    task = build_task(task_spec(), own_model(), 0, 0)
    p = task.prompts(1)[0]  # digits 3000
    right = task.reward_sample(p, [3, 0, 0, 0, EOS])
    assert right == RewardSample("3000", "3000", [3, 0, 0, 0, 12], {"digits": "3000"}, [10, 3, 0, 0, 0, 11])
    assert copy_reward(right) == 1.0
    assert copy_reward(task.reward_sample(p, [3, 0, 0, 0])) == 0.0  # no stop token
    assert copy_reward(task.reward_sample(p, [3, 0, 0, EOS])) == 0.0
    assert task.decode([3, 11, 0, EOS, 4]) == "30"


def test_the_copy_task_needs_pliants_own_model(arith):
    with pytest.raises(RLConfigError, match=r"task.kind=copy needs pliant's own model .* model.hf_path="):
        build_task(task_spec(), hf_model(arith.policy), 0, 0)
    with pytest.raises(RLConfigError, match=r"model.vocab_size=12: the copy task needs at least 13"):
        build_task(task_spec(), own_model(12), 0, 0)


def test_prompts_and_tasks_pickle_small(plain_tok, tmp_path, monkeypatch):
    p = build_task(task_spec(), own_model(), 0, 0).prompts(1)[0]
    assert pickle.loads(pickle.dumps(p)) == p and len(pickle.dumps(p)) < 300
    write_jsonl(tmp_path / "d.jsonl", rows_of(20))
    monkeypatch.chdir(tmp_path)
    task = dataset_task("d.jsonl", plain_tok)  # a relative path: read where the task was built
    monkeypatch.chdir(plain_tok)
    task.prompts(3)
    blob = pickle.dumps(task)
    assert len(blob) < 4000 and b"tokenizer.json" not in blob and b"question number" not in blob
    copy = pickle.loads(blob)
    assert copy.prompts(5) == task.prompts(5)  # the stream goes on where it was, rows and tokenizer read again
    assert copy.held_out(3) == task.held_out(3)


# ---------------------------------------------------------------- the task section

def test_task_spec_kinds_and_defaults():
    from pliant.config import ConfigError, RLJobConfig, load_config, parse_config

    base = load_config([REPO / "configs" / "rl-local.yaml"], RLJobConfig).model_dump()
    job = {"model": own_model().model_dump(), "learner": base["learner"]}
    assert isinstance(parse_config(job, schema=RLJobConfig).task, CopyTaskSpec)
    old = parse_config({**job, "task": {"max_digits": 12}}, schema=RLJobConfig).task  # no kind: copy
    assert old == CopyTaskSpec(max_digits=12)
    ds = parse_config({**job, "task": {"kind": "dataset", "dataset": "x.parquet"}}, schema=RLJobConfig).task
    assert isinstance(ds, DatasetTaskSpec)
    assert (ds.prompt_key, ds.answer_key, ds.tokenizer, ds.chat_template, ds.max_response_tokens, ds.overlong) == \
        ("prompt", "answer", None, False, 64, "skip")
    assert task_spec() == CopyTaskSpec()
    for task, message in [({"kind": "dataset"}, r"task.dataset: missing"),
                          ({"kind": "dataset", "dataset": "x.csv"}, r"task.dataset = 'x.csv': .* JSON lines"),
                          ({"kind": "other"}, r"task: kind='other' is not a task kind"),
                          ({"kind": "dataset", "dataset": "x.jsonl", "max_digits": 3}, r"task.max_digits: unknown"),
                          ({"kind": "dataset", "dataset": "x.jsonl", "overlong": "cut"}, r"task.overlong = 'cut'"),
                          ({"kind": "dataset", "dataset": "x.jsonl", "system_prompt": "Be brief."},
                           r"system_prompt is set but chat_template is false"),
                          ({"kind": "dataset", "dataset": "x.jsonl", "answer_key": "prompt"},
                           r"answer_key='prompt' is the prompt_key too")]:
        with pytest.raises(ConfigError, match=message):
            parse_config({**job, "task": task}, schema=RLJobConfig)


# ---------------------------------------------------------------- dataset tasks

def test_a_jsonl_dataset_gives_prompts_as_the_tokenizer_encodes_them(plain_tok, tmp_path):
    from pliant.runtime.tokenizer import load_tokenizer

    tok = load_tokenizer(plain_tok)
    task = dataset_task(write_jsonl(tmp_path / "d.jsonl", rows_of(20)), plain_tok, max_response_tokens=16)
    ps = task.prompts(20)
    assert [p.uid for p in ps] == list(range(20))
    assert sorted(p.row["extra"] for p in ps) == list(range(20))  # one epoch: every row once
    for p in ps:
        i = p.row["extra"]
        assert p.row == rows_of(20)[i] and p.text == TEXTS[i]
        assert list(p.tokens) == tok(TEXTS[i])["input_ids"] and p.tokens[0] == tok.bos_token_id
        assert list(p.answer) == tok(str(2 * i + 1), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert task.stop_tokens == (tok.eos_token_id,)
    assert task.max_response() == 16
    assert task.max_prompt() == max(len(tok(t)["input_ids"]) for t in TEXTS[:20])
    # the response's text: stop and special tokens dropped
    p = ps[0]
    s = task.reward_sample(p, [*p.answer[:-1], tok.eos_token_id, 7])
    assert s.response == p.row["answer"] and s.prompt == p.text and s.row == p.row
    assert s.prompt_ids == list(p.tokens) and s.response_ids[-2:] == [tok.eos_token_id, 7]
    assert task.decode([tok.bos_token_id, *tok("hi there", add_special_tokens=False)["input_ids"]]) == "hi there"


def test_parquet_and_gzipped_jsonl_give_the_same_prompts_as_jsonl(plain_tok, tmp_path):
    rows = rows_of(20)
    tasks = [dataset_task(write_jsonl(tmp_path / "d.jsonl", rows), plain_tok, seed=5, eval_prompts=4),
             dataset_task(write_parquet(tmp_path / "d.parquet", rows), plain_tok, seed=5, eval_prompts=4),
             dataset_task(write_jsonl(tmp_path / "d.jsonl.gz", rows, gzip.open), plain_tok, seed=5, eval_prompts=4)]
    first = tasks[0]
    want = (first.prompts(30), first.held_out(4), first.sft_examples(7))
    for t in tasks[1:]:
        assert (t.prompts(30), t.held_out(4), t.sft_examples(7)) == want


def test_the_chat_template_wraps_each_prompt_as_a_user_message(arith):
    from pliant.runtime.tokenizer import load_tokenizer

    tok = load_tokenizer(arith.policy)
    for system in (None, "Answer with a number."):
        task = dataset_task(arith.train, model=hf_model(arith.policy), prompt_key="question", chat_template=True,
                            system_prompt=system, eval_dataset=str(arith.test))
        for p in task.prompts(5) + task.held_out(3):
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": p.row["question"]}]
            want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            assert list(p.tokens) == list(want)
            assert tok.decode(list(p.tokens)).endswith("<|assistant|>\n")
            assert tok.decode(list(p.answer), skip_special_tokens=True) == p.row["answer"]
            assert p.answer[-1] == tok.eos_token_id


def test_a_chat_template_the_tokenizer_lacks_is_an_error(plain_tok, tmp_path):
    with pytest.raises(PromptDataError, match=rf"chat_template is true but the tokenizer in {plain_tok} has no chat"):
        dataset_task(write_jsonl(tmp_path / "d.jsonl", rows_of(5)), plain_tok, chat_template=True)


def test_held_out_rows_never_reach_training_and_stay_fixed(plain_tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows_of(30))
    task = dataset_task(path, plain_tok, seed=1, eval_prompts=8)
    held = task.held_out(8)
    assert len(held) == 8 and [p.uid for p in held] == list(range(-1, -9, -1))
    held_rows = {p.row["extra"] for p in held}
    seen = {p.row["extra"] for p in task.prompts(22 * 3)} | {p.row["extra"] for p in task.sft_examples(50)}
    assert seen.isdisjoint(held_rows) and len(seen) == 22
    assert task.held_out(8) == held and task.held_out(3) == held[:3] and len(task.held_out(100)) == 8
    assert dataset_task(path, plain_tok, seed=2, eval_prompts=8).held_out(8) == held  # the same for every seed
    assert task.counts()["train_prompts"] == 22 and task.counts()["held_out_prompts"] == 8
    with pytest.raises(PromptDataError, match=r"has 30 usable rows: keeping rl.eval_prompts=30 .* leaves none"):
        dataset_task(path, plain_tok, eval_prompts=30)
    # an eval_dataset: every training row trains, the held-out prompts are its rows in order
    ev = write_jsonl(tmp_path / "e.jsonl", [{"prompt": t, "answer": "0"} for t in TEXTS[30:]])
    task = dataset_task(path, plain_tok, eval_prompts=8, eval_dataset=str(ev))
    assert [p.text for p in task.held_out(8)] == TEXTS[30:38]
    assert {p.row["extra"] for p in task.prompts(30)} == set(range(30))


def test_epochs_cycle_in_new_orders_with_uids_counting_up(plain_tok, tmp_path):
    task = dataset_task(write_jsonl(tmp_path / "d.jsonl", rows_of(6)), plain_tok, seed=3)
    ps = task.prompts(4) + task.prompts(14)
    assert [p.uid for p in ps] == list(range(18))
    epochs = [[p.row["extra"] for p in ps[k:k + 6]] for k in (0, 6, 12)]
    assert all(sorted(e) == list(range(6)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled
    assert task.counts()["epochs"] == 3 and task.counts()["prompts"] == 18
    other = dataset_task(write_jsonl(tmp_path / "d2.jsonl", rows_of(6)), plain_tok, seed=4)
    assert [p.row["extra"] for p in other.prompts(6)] != epochs[0]  # another seed, another order
    sft = task.sft_examples(6)
    assert sorted(p.row["extra"] for p in sft) == list(range(6)) and all(p.answer for p in sft)
    assert [p.uid for p in sft] == list(range(6))


def test_without_answers_there_is_no_supervised_warm_start(plain_tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": t} for t in TEXTS[:5]])
    with pytest.raises(PromptDataError, match=r"row 1: no key 'answer' \(task.answer_key; null .*keys: 'prompt'"):
        dataset_task(path, plain_tok)
    task = dataset_task(path, plain_tok, answer_key=None)
    assert all(p.answer == () for p in task.prompts(5))
    with pytest.raises(PromptDataError, match=r"task.answer_key is null: .* rl.sft_steps: 0"):
        task.sft_examples(1)


BAD_ROWS = [
    ([{"prompt": "a", "answer": "1"}, {"question": "b", "answer": "2"}],
     r"{file}: row 2: no key 'prompt' \(task.prompt_key\); the row's keys: 'question', 'answer'"),
    ([{"prompt": "a", "answer": "1"}, {"prompt": None, "answer": "2"}],
     r"{file}: row 2: 'prompt' is null, not a string \(the row's keys: 'prompt', 'answer'\)"),
    ([{"prompt": 7, "answer": "1"}], r"{file}: row 1: 'prompt' is int, not a string"),
    ([{"prompt": "  ", "answer": "1"}], r"{file}: row 1: 'prompt' is an empty string"),
    ([{"prompt": "a", "answer": [1, 2]}], r"{file}: row 1: 'answer' is list, not a string or an integer"),
]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("rows,message", BAD_ROWS)
def test_a_bad_row_names_the_file_the_row_and_its_keys(plain_tok, tmp_path, fmt, rows, message):
    if fmt == "parquet":
        if any("question" in r for r in rows):  # a table has every column in every row: the key is null there
            rows = [{"question": r.get("question"), "answer": r["answer"], "prompt": r.get("prompt")} for r in rows]
            message = r"{file}: row 2: 'prompt' is null, not a string \(the row's keys: 'question', 'answer', " \
                      r"'prompt'\)"
        path = write_parquet(tmp_path / "d.parquet", rows)
    else:
        path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(PromptDataError, match=message.format(file=path)):
        dataset_task(path, plain_tok)


def test_a_parquet_file_without_the_prompt_column_lists_its_columns(plain_tok, tmp_path):
    path = write_parquet(tmp_path / "d.parquet", [{"question": "a", "answer": "1"}])
    with pytest.raises(PromptDataError, match=rf"{path}: row 1: no key 'prompt' .*keys: 'question', 'answer'"):
        dataset_task(path, plain_tok)


def test_unreadable_datasets_are_clear_errors(plain_tok, tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(PromptDataError, match=rf"task.dataset: {empty} holds no rows"):
        dataset_task(empty, plain_tok)
    with pytest.raises(PromptDataError, match=rf"task.dataset: input file {tmp_path / 'none.jsonl'} does not exist"):
        dataset_task(tmp_path / "none.jsonl", plain_tok)
    ev = tmp_path / "missing-eval.jsonl"
    with pytest.raises(PromptDataError, match=rf"task.eval_dataset: input file {ev} does not exist"):
        dataset_task(write_jsonl(tmp_path / "d.jsonl", rows_of(3)), plain_tok, eval_dataset=str(ev))
    broken = write_jsonl(tmp_path / "broken.jsonl", [json.dumps(rows_of(1)[0]), "", "{not json"])
    with pytest.raises(PromptDataError, match=rf"{broken}: row 2 \(line 3\) is not valid JSON"):
        dataset_task(broken, plain_tok)
    listed = write_jsonl(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(PromptDataError, match=rf"{listed}: row 1 is a JSON list, not an object"):
        dataset_task(listed, plain_tok)
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_text("not parquet")
    with pytest.raises(PromptDataError, match=rf"{bad_parquet}: cannot read it as Parquet"):
        dataset_task(bad_parquet, plain_tok)


def test_a_tokenizer_is_needed_and_must_fit_the_policy(plain_tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows_of(3))
    with pytest.raises(PromptDataError, match=r"task.tokenizer is not set and neither is model.hf_path"):
        dataset_task(path)
    with pytest.raises(PromptDataError, match=rf"task.tokenizer: {tmp_path} holds no tokenizer files"):
        dataset_task(path, tmp_path)
    with pytest.raises(PromptDataError, match=r"has 300 tokens but the policy's vocab_size is 256"):
        dataset_task(path, plain_tok, model=own_model(256))


def test_overlong_prompts_are_skipped_and_counted_or_an_error(plain_tok, tmp_path, capsys):
    from pliant.runtime.tokenizer import load_tokenizer

    tok = load_tokenizer(plain_tok)
    rows = rows_of(10) + [{"prompt": " ".join(TEXTS), "answer": "1", "extra": 10},
                          {"prompt": " ".join(TEXTS[:20]), "answer": "1", "extra": 11}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    lengths = [len(tok(r["prompt"])["input_ids"]) for r in rows]
    context = max(lengths[:10]) + 8
    task = dataset_task(path, plain_tok, max_context_tokens=context, max_response_tokens=8)
    assert task.counts()["overlong_skipped"] == {"train": 2}
    assert {p.row["extra"] for p in task.prompts(30)} == set(range(10))
    assert task.max_prompt() == max(lengths[:10])
    assert capsys.readouterr().err.count(f"{path}: 2 of 12 prompts skipped") == 1
    with pytest.raises(PromptDataError, match=rf"{path}: row 11: the prompt is {lengths[10]} tokens; with "
                                              rf"task.max_response_tokens=8 its samples take up to {lengths[10] + 8}, "
                                              rf"above the policy's context of {context} tokens "
                                              rf"\(task.max_context_tokens\)"):
        dataset_task(path, plain_tok, max_context_tokens=context, max_response_tokens=8, overlong="error")


def test_prompts_beyond_the_learners_memory_are_skipped_and_counted_or_an_error(plain_tok, tmp_path, capsys):
    """The learner's largest SP group is a second limit beside the policy's context: a prompt
    whose samples it cannot hold is left out and counted, or stops the run naming its row,
    its length and the group's capacity."""
    from pliant.rl.task_protocol import LearnerCapacity
    from pliant.runtime.tokenizer import load_tokenizer

    tok = load_tokenizer(plain_tok)
    rows = rows_of(10) + [{"prompt": " ".join(TEXTS), "answer": "1", "extra": 10}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    lengths = [len(tok(r["prompt"])["input_ids"]) for r in rows]
    cap = LearnerCapacity(tokens=max(lengths[:10]) + 8, ranks=4, memory_gib=0.05)
    task = dataset_task(path, plain_tok, max_response_tokens=8, learner=cap)
    assert task.counts()["overlong_skipped"] == {"train": 1} and task.max_prompt() == max(lengths[:10])
    assert "learner's largest SP group (4 rank(s) of learner.device_memory_gib=0.05)" in capsys.readouterr().err
    with pytest.raises(PromptDataError, match=rf"row 11: the prompt is {lengths[10]} tokens; .* up to "
                                              rf"{lengths[10] + 8}, above the learner's largest SP group \(4 rank\(s\) "
                                              rf"of learner.device_memory_gib=0.05\) holds a sample of {cap.tokens} "
                                              rf"tokens"):
        dataset_task(path, plain_tok, max_response_tokens=8, learner=cap, overlong="error")
    with pytest.raises(PromptDataError, match=r"no prompt is left to train on \(11 of 11 skipped: their samples "
                                              r"exceed the learner's largest SP group"):
        dataset_task(path, plain_tok, max_response_tokens=8, learner=LearnerCapacity(5, 4, 0.05))


def test_the_context_and_stop_tokens_come_from_the_model_directory(arith, tmp_path):
    model_dir = tmp_path / "policy"
    shutil.copytree(arith.policy, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["max_position_embeddings"] = 40
    (model_dir / "config.json").write_text(json.dumps(cfg))
    gen = json.loads((model_dir / "generation_config.json").read_text())
    gen["eos_token_id"] = [1, 5]
    (model_dir / "generation_config.json").write_text(json.dumps(gen))
    long_rows = [{"question": "What is 1 + 1?" + " and then" * 30, "answer": "2"},
                 {"question": "What is 2 + 2?", "answer": "4"}, {"question": "What is 3 + 2?", "answer": "5"}]
    path = write_jsonl(tmp_path / "d.jsonl", long_rows)
    with pytest.raises(PromptDataError, match=rf"row 1: .* context of 40 tokens \(max_position_embeddings in "
                                              rf"{model_dir / 'config.json'}\)"):
        dataset_task(path, model=hf_model(model_dir), prompt_key="question", chat_template=True, overlong="error",
                     max_response_tokens=8)
    task = dataset_task(path, model=hf_model(model_dir), prompt_key="question", chat_template=True,
                        max_response_tokens=8)
    assert task.counts()["overlong_skipped"] == {"train": 1}
    assert task.stop_tokens == (1, 5)
    p = task.prompts(1)[0]
    assert p.answer[-1] == 1
    assert task.decode([*p.answer[:-1], 5, 9]) == p.row["answer"]  # cut at any stop token


# ---------------------------------------------------------------- reward functions

def test_load_reward_fn_from_a_module_and_from_a_file(tmp_path):
    from pliant.rl import arithmetic

    assert load_reward_fn("pliant.rl.arithmetic:reward") is arithmetic.reward
    assert load_reward_fn("pliant.rl.task:reward") is copy_reward
    example = load_reward_fn(f"{REPO / 'examples' / 'arithmetic_reward.py'}:reward")
    sample = RewardSample("What is 2 + 3?", "The answer is 5.", [], {"answer": "5"}, [])
    assert example(sample) == 0.5
    own = tmp_path / "my_reward.py"
    own.write_text("from dataclasses import dataclass\n@dataclass\nclass C:\n    x: int = 1\n"
                   "def score(sample):\n    return float(len(sample.response)) + C().x\n")
    assert load_reward_fn(f"{own}:score")(sample) == 17.0
    assert load_reward_fn(f"{own}:score") is load_reward_fn(f"{own}:score")  # imported once


def test_a_reward_fn_that_cannot_be_loaded_is_a_clear_error(tmp_path):
    assert issubclass(RewardFnError, RLConfigError)
    with pytest.raises(RewardFnError, match=r"rl.reward_fn='no_such_module_x:f': cannot import module "
                                            r"no_such_module_x: ModuleNotFoundError: No module named"):
        load_reward_fn("no_such_module_x:f")
    broken = tmp_path / "broken_reward.py"
    broken.write_text("import no_such_dependency_y\ndef reward(sample):\n    return 1.0\n")
    with pytest.raises(RewardFnError, match=rf"cannot import file {broken}: ModuleNotFoundError: .*no_such_dependency"):
        load_reward_fn(f"{broken}:reward")
    with pytest.raises(RewardFnError, match=rf"the file {tmp_path / 'none.py'} does not exist"):
        load_reward_fn(f"{tmp_path / 'none.py'}:reward")
    with pytest.raises(RewardFnError, match=r"module pliant.rl.arithmetic has no attribute 'score' \(its functions: "
                                            r".*last_integer.*reward"):
        load_reward_fn("pliant.rl.arithmetic:score")
    with pytest.raises(RewardFnError, match=r"pliant.rl.arithmetic:CHAT_TEMPLATE is a str, not a function"):
        load_reward_fn("pliant.rl.arithmetic:CHAT_TEMPLATE")
    old = tmp_path / "old_reward.py"
    old.write_text("def reward(prompt, response):\n    return 0.0\n")
    with pytest.raises(RewardFnError, match=r"reward\(prompt, response\) cannot be called as fn\(sample\)"):
        load_reward_fn(f"{old}:reward")
    with pytest.raises(RewardFnError, match=r"expected 'module:function' or 'path/to/file.py:function'"):
        load_reward_fn("pliant.rl.arithmetic")
    # the general loader (e.g. a rollout engine's factory, called with keywords): any callable
    factory = tmp_path / "engine_factory.py"
    factory.write_text("def make(*, model_spec, rl, task, seed, worker):\n    return seed + worker\n")
    assert load_function(f"{factory}:make", "rl.rollout_engine")(model_spec=0, rl=0, task=0, seed=2, worker=3) == 5
    with pytest.raises(FunctionLoadError, match=r"rl.rollout_engine='pliant.rl.task:nothing': module pliant.rl.task "
                                                r"has no attribute 'nothing'") as e:
        load_function("pliant.rl.task:nothing", "rl.rollout_engine")
    assert not isinstance(e.value, RewardFnError)


# ---------------------------------------------------------------- the arithmetic task

def test_the_arithmetic_checker():
    from pliant.rl.arithmetic import reward

    def score(text: str, answer: str = "19") -> float:
        return reward(RewardSample("What is 12 + 7?", text, [], {"question": "What is 12 + 7?", "answer": answer}, []))

    assert score("19") == 1.0 and score("12 + 7 = 19") == 1.0 and score(" 19\n") == 1.0
    assert score("18") == 0.0 and score("19 or 20") == 0.0
    assert score("") == 0.0 and score("nineteen") == 0.0
    assert score("-3", answer="-3") == 1.0


def test_write_arithmetic_keeps_test_problems_out_of_training(tmp_path):
    from pliant.rl.arithmetic import write_arithmetic

    train, test = write_arithmetic(tmp_path, train=500, test=50, seed=1)
    tr = [json.loads(line) for line in train.read_text().splitlines()]
    te = [json.loads(line) for line in test.read_text().splitlines()]
    assert len(tr) == 500 and len(te) == 50
    assert {r["question"] for r in tr}.isdisjoint(r["question"] for r in te)
    for r in tr + te:
        a, op, b = r["question"].removeprefix("What is ").removesuffix("?").split()
        assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
    assert write_arithmetic(tmp_path / "again", train=500, test=50, seed=1)[0].read_text() == train.read_text()


def test_prepare_arithmetic_makes_a_policy_pliant_loads(arith):
    import torch

    from pliant.rl.arithmetic import reward
    from pliant.runtime.hf import load_hf_model
    from pliant.runtime.tokenizer import load_tokenizer

    tok = load_tokenizer(arith.policy)
    assert tok.chat_template and 259 <= len(tok) <= 512
    model = load_hf_model(arith.policy, torch.float32)
    cfg = json.loads((arith.policy / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 64 and cfg["vocab_size"] >= len(tok)
    assert not any(p.name.startswith(".") for p in arith.policy.parent.iterdir())  # no temp directory left
    task = dataset_task(arith.train, model=hf_model(arith.policy), prompt_key="question", chat_template=True,
                        eval_dataset=str(arith.test), max_response_tokens=8, eval_prompts=16)
    p = task.prompts(1)[0]
    assert reward(task.reward_sample(p, list(p.answer))) == 1.0
    assert reward(task.reward_sample(p, [tok.eos_token_id])) == 0.0
    with torch.no_grad():
        ids = torch.tensor([list(p.tokens) + list(p.answer)])
        assert model is not None and ids.max() < cfg["vocab_size"]
    with pytest.raises(FileExistsError):
        from pliant.rl.arithmetic import prepare_arithmetic

        prepare_arithmetic(arith.policy.parent)


# ---------------------------------------------------------------- the long-context task

def test_long_context_rows_hold_the_fact_they_ask_about_and_a_long_tail():
    import numpy as np

    from pliant.rl.long_context import LengthTail, make_row, reward

    rng = np.random.default_rng(0)
    tail = LengthTail()
    rows = [make_row(rng, tail, facts=3) for _ in range(3000)]
    assert make_row(rng, tail)["prompt"].count("the code of ") == 2  # one fact (the default) and the question
    for r in rows[:200]:
        name = r["prompt"].rsplit("code of ", 1)[1].rstrip("?")
        facts = dict(re.findall(r"the code of (\w+) is:(\d+)\.", r["prompt"]))
        assert len(facts) == 3 and len(set(facts.values())) == 3 and facts[name] == r["answer"]
        assert r["prompt"].count(". ") + 1 == r["sentences"] + 3  # filler sentences and the facts
    n = np.array([r["sentences"] for r in rows])
    assert np.median(n) < 40 and (n >= tail.tail_start).mean() > 0.03 and n.max() == tail.maximum
    sample = lambda text: RewardSample(rows[0]["prompt"], text, [], rows[0], [])  # noqa: E731
    answer = rows[0]["answer"]
    assert reward(sample(answer)) == 1.0 and reward(sample(f" {answer}.")) == 1.0
    assert reward(sample("")) == 0.0 and reward(sample(f"1{answer}")) == 0.0 and reward(sample("x")) == 0.0


def test_prepare_long_context_makes_held_out_rows_and_a_policy_for_long_prompts(tmp_path):
    import torch

    from pliant.rl.long_context import prepare_long_context, reward
    from pliant.runtime.hf import load_hf_model
    from pliant.runtime.tokenizer import load_tokenizer

    files = prepare_long_context(tmp_path / "lc", train=120, test=20, seed=2)
    tr = [json.loads(line) for line in files.train.read_text().splitlines()]
    te = [json.loads(line) for line in files.test.read_text().splitlines()]
    sft = [json.loads(line) for line in files.sft.read_text().splitlines()]
    assert len(tr) == 120 and len(te) == 20 and {r["prompt"] for r in tr}.isdisjoint(r["prompt"] for r in te)
    assert len(sft) == 5000 and max(r["sentences"] for r in sft) <= 16 < max(r["sentences"] for r in tr)
    cfg = json.loads((files.policy / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 8192
    tok = load_tokenizer(files.policy)
    task = dataset_task(files.train, model=hf_model(files.policy), chat_template=True,
                        eval_dataset=str(files.test), sft_dataset=str(files.sft), max_response_tokens=6,
                        eval_prompts=20)
    assert all(len(p.tokens) < 300 for p in task.sft_examples(50))  # the warm start's rows: short contexts
    assert task.counts()["rows"] == {"train": 120, "eval": 20, "sft": 5000}
    lengths = [len(p.tokens) for p in task.prompts(120)]
    assert max(lengths) > 3 * sorted(lengths)[60]  # a long tail in tokens too
    p = task.held_out(1)[0]
    assert reward(task.reward_sample(p, list(p.answer))) == 1.0
    assert reward(task.reward_sample(p, [tok.eos_token_id])) == 0.0
    longest = max(task.prompts(40), key=lambda q: len(q.tokens))
    model = load_hf_model(files.policy, torch.float32)
    from pliant.comm import SOLO
    from pliant.runtime.model import SeqContext

    n = len(longest.tokens)
    with torch.no_grad():  # the whole prompt in one sequence: its positions fit the policy
        logits = model(torch.tensor(longest.tokens), SeqContext.build(SOLO, [n], "cpu"))
    assert logits.shape == (n, cfg["vocab_size"]) and torch.isfinite(logits).all()
    assert not any(q.name.startswith(".") for q in files.policy.parent.iterdir())
