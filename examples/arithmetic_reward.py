"""A reward function written by a user: a stricter checker for the arithmetic task.

A reward function is any Python function that takes one `RewardSample` and returns a float.
It can live in a file of your own, outside pliant; name it in the job config as
`path/to/file.py:function` (or `module:function` for an importable module):

    rl:
      reward_fn: examples/arithmetic_reward.py:reward

What the sample holds (pliant.rl.reward.RewardSample):

    sample.prompt        the prompt's text, as in your dataset (before any chat template)
    sample.response      the generated text, stop and special tokens dropped
    sample.response_ids  the generated token ids (the stop token included when one came)
    sample.prompt_ids    the prompt's token ids, as the policy read them
    sample.row           your dataset's row as read: every column, e.g. sample.row["answer"]

It runs in the reward worker, once per response. An exception skips that one sample (it is
logged and counted, and the run goes on), so a checker need not guard against every odd
response; returning 0.0 for one it cannot read is usually what you want.

This one gives full credit only for a bare answer ("19"), half for the right number said
with other words around it ("The answer is 19."), and nothing otherwise: it rewards the
policy for answering tersely, as the supervised answers do.
"""
from __future__ import annotations

import re

INTEGER = re.compile(r"-?\d+")


def reward(sample) -> float:
    expected = int(sample.row["answer"])
    text = sample.response.strip()
    if re.fullmatch(r"-?\d+", text):
        return 1.0 if int(text) == expected else 0.0
    numbers = INTEGER.findall(text)
    if numbers and int(numbers[-1]) == expected:
        return 0.5
    return 0.0
