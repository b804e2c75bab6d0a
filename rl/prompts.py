"""Prompt datasets as an RL task (`task.kind: dataset`): a JSONL or Parquet file, one prompt per
row, tokenized with the policy's own tokenizer (its chat template applied when asked).

    task:
      kind: dataset
      dataset: data/train.jsonl         # rows like {"question": "What is 12 + 7?", "answer": "19"}
      eval_dataset: data/test.jsonl     # null: rl.eval_prompts rows of `dataset` kept out of training
      sft_dataset: data/sft.jsonl       # the warm start's rows; null: `dataset`'s
      prompt_key: question
      answer_key: answer                # the supervised warm start's targets (null: none)
      chat_template: true
    rl:
      reward_fn: pliant.rl.arithmetic:reward    # fn(RewardSample) -> float (rl/reward.py)

Every row is read and checked when the task is built, in the driver, so a bad row stops the
run before any worker starts, naming the file, the row and the keys it has; the prompts are
tokenized once then to find the longest and those that do not fit the policy's context
(skipped and counted, or an error). What is kept is small: row indices and a few numbers.
The rows themselves and the tokenizer are not pickled with the task (it is sent to Ray
actors): each process that draws prompts reads the file again, keeping each JSONL row as its
line of text (Parquet: the Arrow table) and decoding a row only when it is handed out.

Streams: the training prompts are the training rows shuffled by the run's seed, epoch after
epoch (a new order each epoch), uids counting up; the supervised examples are the same rows
in an order of their own (seed + 10000); the held-out prompts are fixed for every seed: the
eval_dataset's rows in file order, or rows picked once by EVAL_SEED.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .common import log
from .reward import RewardSample
from .spec import RLConfigError
from .task_protocol import EVAL_SEED, SFT_SEED_OFFSET, LearnerCapacity, Prompt

ENCODE_BATCH = 1024  # prompts per tokenizer call when the rows are measured


class PromptDataError(RLConfigError):
    """A prompt dataset or tokenizer that cannot be used: the message names the file, the row and
    the key (or the setting) at fault."""


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class Rows:
    """The rows of one dataset file, checked when read: each has `prompt_key` holding a non-empty
    string and (when `answer_key` is set) `answer_key` holding a string or an integer.

    Held compactly (a JSONL row as its line, Parquet as the Arrow table); `row(i)` decodes one.
    Blank JSONL lines are not rows; row numbers count from 1."""

    def __init__(self, path: str | Path, prompt_key: str, answer_key: str | None, what: str = "task.dataset"):
        from pliant.runtime.data import DataError
        from pliant.runtime.corpus import check_inputs, split_suffix

        self.path = Path(path)
        self.prompt_key, self.answer_key = prompt_key, answer_key
        try:
            check_inputs([self.path])
            fmt, compression = split_suffix(self.path)
        except DataError as e:
            raise PromptDataError(f"{what}: {e}") from None
        self._lines: list[str] | None = None
        self._line_no: np.ndarray | None = None
        self._table: Any = None
        if fmt == "json":
            self._read_jsonl(compression)
        else:
            self._read_parquet()
        if not len(self):
            raise PromptDataError(f"{what}: {self.path} holds no rows")

    def __len__(self) -> int:
        return len(self._lines) if self._lines is not None else self._table.num_rows

    def where(self, i: int) -> str:
        """`FILE: row N` (JSONL: and its line, when blank lines make them differ)."""
        line = int(self._line_no[i]) if self._line_no is not None else i + 1
        return f"{self.path}: row {i + 1}" + (f" (line {line})" if line != i + 1 else "")

    def row(self, i: int) -> dict:
        if self._lines is not None:
            return json.loads(self._lines[i])
        return self._table.slice(i, 1).to_pylist()[0]

    def prompt(self, i: int) -> str:
        return self.row(i)[self.prompt_key]

    def prompts(self, start: int, stop: int) -> list[str]:
        if self._lines is not None:
            return [json.loads(line)[self.prompt_key] for line in self._lines[start:stop]]
        return self._table.column(self.prompt_key).slice(start, stop - start).to_pylist()

    # ----- reading and checking
    def _check(self, i: int, keys: list[str], prompt: Any, has_prompt: bool, answer: Any = None,
               has_answer: bool = True) -> None:
        listed = ", ".join(map(repr, keys)) or "none"
        if not has_prompt:
            raise PromptDataError(f"{self.where(i)}: no key {self.prompt_key!r} (task.prompt_key); the row's keys: "
                                  f"{listed}")
        if not isinstance(prompt, str):
            raise PromptDataError(f"{self.where(i)}: {self.prompt_key!r} is {_kind(prompt)}, not a string (the "
                                  f"row's keys: {listed})")
        if not prompt.strip():
            raise PromptDataError(f"{self.where(i)}: {self.prompt_key!r} is an empty string")
        if self.answer_key is None:
            return
        if not has_answer:
            raise PromptDataError(f"{self.where(i)}: no key {self.answer_key!r} (task.answer_key; null if the rows "
                                  f"have no reference answers); the row's keys: {listed}")
        if isinstance(answer, bool) or not isinstance(answer, (str, int)):
            raise PromptDataError(f"{self.where(i)}: {self.answer_key!r} is {_kind(answer)}, not a string or an "
                                  f"integer (task.answer_key; null if the rows have no reference answers)")

    def _read_jsonl(self, compression: str | None) -> None:
        import pyarrow as pa

        from pliant.runtime.corpus import open_text_lines

        lines: list[str] = []
        numbers: list[int] = []
        self._line_no = numbers  # type: ignore[assignment]  (where() while reading)
        try:
            with open_text_lines(self.path, compression) as f:
                for lineno, line in enumerate(f, 1):
                    line = line.strip()
                    if not line:
                        continue
                    i = len(lines)
                    lines.append(line)
                    numbers.append(lineno)
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise PromptDataError(f"{self.where(i)} is not valid JSON ({e.msg} at column {e.colno})"
                                              ) from None
                    if not isinstance(record, dict):
                        raise PromptDataError(f"{self.where(i)} is a JSON {type(record).__name__}, not an object "
                                              f"with a {self.prompt_key!r} key")
                    self._check(i, list(record), record.get(self.prompt_key), self.prompt_key in record,
                                record.get(self.answer_key) if self.answer_key else None,
                                self.answer_key in record if self.answer_key else True)
        except (pa.ArrowException, OSError, EOFError) as e:
            raise PromptDataError(f"{self.path}: cannot read it ({e})") from None
        self._lines = lines
        self._line_no = np.asarray(numbers, dtype=np.int64)

    def _read_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(str(self.path))
        except (pa.ArrowException, OSError) as e:
            raise PromptDataError(f"{self.path}: cannot read it as Parquet ({e})") from None
        self._table = table
        keys = table.column_names
        n = table.num_rows
        prompts = table.column(self.prompt_key).to_pylist() if self.prompt_key in keys else [None] * n
        has_answer = self.answer_key is None or self.answer_key in keys
        answers = table.column(self.answer_key).to_pylist() if self.answer_key and has_answer else [None] * n
        for i in range(n):
            self._check(i, keys, prompts[i], self.prompt_key in keys, answers[i], has_answer)


class _Epochs:
    """Positions 0..n-1 in a seeded order, a new order each epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.rng = n, np.random.default_rng(seed)
        self.order = np.empty(0, dtype=np.int64)
        self.pos = self.epoch = 0

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.pos == len(self.order):
                self.order, self.pos = self.rng.permutation(self.n), 0
                self.epoch += 1
            m = min(k - len(out), len(self.order) - self.pos)
            out += self.order[self.pos:self.pos + m].tolist()
            self.pos += m
        return out


def _eos_ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PromptDataError(f"{path}: unreadable ({e})") from None
    return data if isinstance(data, dict) else {}


class DatasetTask:
    """Prompts from a dataset file, scored by the user's reward function (see the module doc).

    Implements the Task protocol of rl/task_protocol.py."""

    def __init__(self, spec, model_spec, seed: int, eval_prompts: int, learner: LearnerCapacity | None = None):
        self.spec, self.seed = spec, seed
        self.learner = learner
        self.model_dir = Path(model_spec.hf_path).absolute() if model_spec.hf_path is not None else None
        tok_dir = spec.tokenizer if spec.tokenizer is not None else model_spec.hf_path
        if tok_dir is None:
            raise PromptDataError("task.tokenizer is not set and neither is model.hf_path: a dataset task tokenizes "
                                  "its prompts with the policy's tokenizer; give task.tokenizer: DIR (a tokenizer "
                                  "directory) or a Hugging Face model directory in model.hf_path")
        # absolute, as the driver sees them: the task is used in Ray actors, whose working
        # directory need not be the driver's
        self.tokenizer_dir = str(Path(tok_dir).absolute())
        self.paths = {"train": Path(spec.dataset).absolute(),
                      "eval": Path(spec.eval_dataset).absolute() if spec.eval_dataset is not None else None,
                      "sft": Path(spec.sft_dataset).absolute() if spec.sft_dataset is not None else None}
        self._tok: Any = None
        self._rows: dict[str, Rows] = {}
        tok = self.tokenizer()
        if len(tok) > model_spec.vocab_size:
            raise PromptDataError(f"the tokenizer in {self.tokenizer_dir} has {len(tok)} tokens but the policy's "
                                  f"vocab_size is {model_spec.vocab_size}: ids {model_spec.vocab_size}..{len(tok) - 1} "
                                  f"have no embedding")
        if spec.chat_template and not getattr(tok, "chat_template", None):
            raise PromptDataError(f"task.chat_template is true but the tokenizer in {self.tokenizer_dir} has no chat "
                                  f"template (tokenizer_config.json's chat_template or chat_template.jinja); set "
                                  f"chat_template: false to feed the prompt text as it is")
        self.stop_tokens = self._stop_tokens(tok)
        self.context, self.context_source = self._context()
        if self.context is not None and spec.max_response_tokens >= self.context:
            raise PromptDataError(f"task.max_response_tokens={spec.max_response_tokens} leaves no room for a prompt in "
                                  f"the policy's context of {self.context} tokens ({self.context_source})")

        # read, check and measure every row, once, here in the driver
        train = self.rows("train")
        self.rows_in = {"train": len(train)}
        kept, longest, skipped = self._measure(train)
        self.skipped = {"train": skipped}
        if spec.eval_dataset is not None:
            ev = self.rows("eval")
            self.rows_in["eval"] = len(ev)
            held, eval_longest, self.skipped["eval"] = self._measure(ev)
            self._held_from = "eval"
            longest = max(longest, eval_longest)
        else:
            self._held_from = "train"
            if eval_prompts and eval_prompts >= len(kept):
                raise PromptDataError(f"task.dataset {spec.dataset} has {len(kept)} usable rows: keeping "
                                      f"rl.eval_prompts={eval_prompts} of them out of training for evaluation leaves "
                                      f"none to train on; give task.eval_dataset, or lower rl.eval_prompts")
            pick = np.random.default_rng(EVAL_SEED).permutation(len(kept))
            held = kept[pick[:eval_prompts]]
            kept = np.sort(kept[pick[eval_prompts:]])
        if not len(kept):
            raise PromptDataError(f"task.dataset {spec.dataset}: no prompt is left to train on ({skipped} of "
                                  f"{len(train)} skipped: their samples exceed "
                                  f"{' or '.join(why for _, why in self._limits())})")
        self._train_idx, self._held_idx = kept, held
        self._sft_from, self._sft_idx = "train", kept
        if spec.sft_dataset is not None:  # the warm start's own rows
            sft = self.rows("sft")
            self.rows_in["sft"] = len(sft)
            self._sft_idx, sft_longest, self.skipped["sft"] = self._measure(sft)
            self._sft_from = "sft"
            longest = max(longest, sft_longest)
            if not len(self._sft_idx):
                raise PromptDataError(f"task.sft_dataset {spec.sft_dataset}: no row is left for the warm start (all "
                                      f"{len(sft)} skipped as too long)")
        self._max_prompt = longest
        self._train = _Epochs(len(kept), seed)
        self._sft = _Epochs(len(self._sft_idx), seed + SFT_SEED_OFFSET)
        self.next_uid = 0
        self.sft_handed = 0

    # ----- what is not pickled: the tokenizer and the rows, read again where they are used
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_tok"], state["_rows"] = None, {}
        return state

    def tokenizer(self):
        if self._tok is None:
            from pliant.runtime.tokenizer import TokenizerError, load_tokenizer

            try:
                self._tok = load_tokenizer(self.tokenizer_dir)
            except TokenizerError as e:
                key = "task.tokenizer" if self.spec.tokenizer is not None else "model.hf_path"
                raise PromptDataError(f"{key}: {e}") from None
        return self._tok

    def rows(self, which: str) -> Rows:
        if which not in self._rows:
            path = self.paths[which]
            rows = Rows(path, self.spec.prompt_key, self.spec.answer_key,
                        {"train": "task.dataset", "eval": "task.eval_dataset", "sft": "task.sft_dataset"}[which])
            expected = getattr(self, "rows_in", {}).get(which)
            if expected is not None and len(rows) != expected:
                raise PromptDataError(f"{path} has {len(rows)} rows now but had {expected} when the task was built; "
                                      f"a dataset must not change during a run")
            self._rows[which] = rows
        return self._rows[which]

    # ----- setup
    def _stop_tokens(self, tok) -> tuple[int, ...]:
        ids: list[int] = _eos_ids(tok.eos_token_id)
        if self.model_dir is not None:
            for name in ("generation_config.json", "config.json"):
                if (self.model_dir / name).is_file():
                    ids += _eos_ids(_read_json(self.model_dir / name).get("eos_token_id"))
        ids = list(dict.fromkeys(ids))
        if not ids:
            raise PromptDataError(f"no stop token: the tokenizer in {self.tokenizer_dir} has no eos token and "
                                  f"{self.model_dir or 'the policy'} declares no eos_token_id")
        return tuple(ids)

    def _context(self) -> tuple[int | None, str]:
        if self.spec.max_context_tokens is not None:
            return self.spec.max_context_tokens, "task.max_context_tokens"
        if self.model_dir is not None and (self.model_dir / "config.json").is_file():
            n = _read_json(self.model_dir / "config.json").get("max_position_embeddings")
            if isinstance(n, int) and n > 0:
                return n, f"max_position_embeddings in {self.model_dir / 'config.json'}"
        return None, "unknown"

    def _limits(self) -> list[tuple[int, str]]:
        """(tokens a prompt plus its longest response may take, what sets it): the policy's
        context and the learner's memory."""
        out = []
        if self.context is not None:
            out.append((self.context, f"the policy's context of {self.context} tokens ({self.context_source})"))
        if self.learner is not None:
            out.append((self.learner.tokens, self.learner.describe()))
        return out

    def _measure(self, rows: Rows) -> tuple[np.ndarray, int, int]:
        """The rows whose samples fit the policy's context and the learner's memory, the
        longest prompt among them, how many were skipped."""
        limits = self._limits()
        room = self.spec.max_response_tokens
        kept: list[int] = []
        longest = 0
        over: dict[str, int] = {}
        for start in range(0, len(rows), ENCODE_BATCH):
            stop = min(start + ENCODE_BATCH, len(rows))
            for i, ids in zip(range(start, stop), self.encode(rows.prompts(start, stop))):
                n = len(ids)
                beyond = next((why for limit, why in limits if n + room > limit), None)
                if beyond is not None:
                    if self.spec.overlong == "error":
                        raise PromptDataError(
                            f"{rows.where(i)}: the prompt is {n} tokens; with task.max_response_tokens={room} its "
                            f"samples take up to {n + room}, above {beyond}; task.overlong: skip leaves such prompts "
                            f"out (and counts them)")
                    over[beyond] = over.get(beyond, 0) + 1
                    continue
                kept.append(i)
                longest = max(longest, n)
        for why, k in over.items():
            log(f"{rows.path}: {k} of {len(rows)} prompts skipped: with task.max_response_tokens={room} their samples "
                f"exceed {why}")
        return np.asarray(kept, dtype=np.int64), longest, len(rows) - len(kept)

    # ----- tokenizing
    def messages(self, text: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.spec.system_prompt}] if self.spec.system_prompt else []
        return [*system, {"role": "user", "content": text}]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Prompt ids as the policy reads them: the chat template applied (with the assistant's
        turn opened) when configured, else the text with the tokenizer's special tokens (BOS)."""
        if not texts:
            return []
        tok = self.tokenizer()
        if self.spec.chat_template:
            return [list(ids) for ids in tok.apply_chat_template([self.messages(t) for t in texts],
                                                                 add_generation_prompt=True, tokenize=True,
                                                                 return_dict=False)]
        return [list(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]]

    def _answer(self, row: dict) -> tuple[int, ...]:
        if self.spec.answer_key is None:
            return ()
        ids = self.tokenizer()(str(row[self.spec.answer_key]), add_special_tokens=False)["input_ids"]
        return (*ids, self.stop_tokens[0])

    def _prompts(self, which: str, indices: list[int], uids: list[int]) -> list[Prompt]:
        rows = self.rows(which)
        got = [rows.row(i) for i in indices]
        texts = [r[self.spec.prompt_key] for r in got]
        return [Prompt(uid, tuple(ids), self._answer(r), t, r)
                for uid, ids, t, r in zip(uids, self.encode(texts), texts, got)]

    # ----- the Task protocol
    def prompts(self, n: int) -> list[Prompt]:
        idx = [int(self._train_idx[p]) for p in self._train.take(n)]
        out = self._prompts("train", idx, list(range(self.next_uid, self.next_uid + n)))
        self.next_uid += n
        return out

    def held_out(self, n: int) -> list[Prompt]:
        """The first n held-out prompts (all of them when there are fewer)."""
        idx = [int(i) for i in self._held_idx[:n]]
        return self._prompts(self._held_from, idx, [-(k + 1) for k in range(len(idx))])

    def sft_examples(self, n: int) -> list[Prompt]:
        if self.spec.answer_key is None:
            raise PromptDataError("task.answer_key is null: the rows have no reference answers for the supervised "
                                  "warm start; set rl.sft_steps: 0, or name the answers' key in task.answer_key")
        idx = [int(self._sft_idx[p]) for p in self._sft.take(n)]
        out = self._prompts(self._sft_from, idx, list(range(self.sft_handed, self.sft_handed + n)))
        self.sft_handed += n
        return out

    def max_prompt(self) -> int:
        return self._max_prompt

    def max_response(self) -> int:
        return self.spec.max_response_tokens

    def decode(self, ids: list[int]) -> str:
        ids = list(ids)
        stops = set(self.stop_tokens)
        cut = next((k for k, t in enumerate(ids) if t in stops), len(ids))
        return self.tokenizer().decode(ids[:cut], skip_special_tokens=True)

    def reward_sample(self, prompt: Prompt, response_ids: list[int]) -> RewardSample:
        return RewardSample(prompt.text, self.decode(response_ids), list(response_ids), prompt.row,
                            list(prompt.tokens))

    def counts(self) -> dict:
        return {"rows": dict(self.rows_in), "train_prompts": len(self._train_idx),
                "held_out_prompts": len(self._held_idx), "overlong_skipped": dict(self.skipped),
                "prompts": self.next_uid, "epochs": self._train.epoch, "sft_examples": self.sft_handed}
