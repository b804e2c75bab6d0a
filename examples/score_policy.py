"""Score a Hugging Face policy directory on a held-out JSONL set with transformers' own
`generate`, independently of pliant's decoder: the check that what `pliant export` wrote of an
RL run is the policy the run evaluated.

    python examples/score_policy.py DIR --data data/arithmetic/test.jsonl \
        --reward examples/arithmetic_reward.py:reward --max-new-tokens 8

Each prompt goes through the directory's chat template (the assistant's turn opened), one
response is sampled as the run's evaluation samples it (temperature 1 by default, no top-k
or top-p truncation, stopping at any of the end-of-sequence ids of the tokenizer and the
directory's generation config, or after max-new-tokens: the task's max_response_tokens),
and the reward function scores it as the reward worker would (a RewardSample). With
--samples K, K responses per prompt, the prompt's score their mean. Prints the mean reward
over the prompts and its standard error.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def _ids(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a Hugging Face model directory (e.g. what pliant export wrote)")
    p.add_argument("--data", required=True, help="JSONL of held-out rows")
    p.add_argument("--prompt-key", default="question")
    p.add_argument("--reward", default="examples/arithmetic_reward.py:reward", help="path/to/file.py:function")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("-n", type=int, default=200, help="the first n rows")
    p.add_argument("--samples", type=int, default=1, help="responses per prompt (the mean over them is the "
                   "prompt's score: more make the estimate of the policy's reward tighter)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pliant.rl.reward import RewardSample, load_reward_fn

    tok = AutoTokenizer.from_pretrained(args.model)
    model, info = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, output_loading_info=True)
    missing = sorted(set(info["missing_keys"]) | set(info["unexpected_keys"]))
    if missing:
        raise SystemExit(f"{args.model}: keys that do not match the model: {missing[:8]}")
    model.eval()
    reward = load_reward_fn(args.reward)
    stop = {tok.eos_token_id} | set(_ids(model.generation_config.eos_token_id)) | set(_ids(model.config.eos_token_id))
    stop.discard(None)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()][: args.n]
    torch.manual_seed(args.seed)
    scores = []
    for row in rows:
        ids = tok.apply_chat_template([{"role": "user", "content": row[args.prompt_key]}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        prompt = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                 temperature=args.temperature, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                                 eos_token_id=sorted(stop), pad_token_id=tok.pad_token_id or tok.eos_token_id,
                                 num_return_sequences=args.samples)
        per_prompt = []
        for seq in out:
            response = seq[len(ids):].tolist()
            end = next((i for i, t in enumerate(response) if t in stop), None)
            if end is not None:  # generate pads the shorter responses of a batch after their stop token
                response = response[:end + 1]
            text = tok.decode(response, skip_special_tokens=True)
            per_prompt.append(float(reward(RewardSample(row[args.prompt_key], text, response, row, list(ids)))))
        scores.append(sum(per_prompt) / len(per_prompt))
    mean = sum(scores) / len(scores)
    se = math.sqrt(sum((s - mean) ** 2 for s in scores) / max(1, len(scores) - 1) / len(scores))
    print(f"{args.model}: mean reward {mean:.4f} +- {se:.4f} (standard error) over {len(scores)} prompts x "
          f"{args.samples} response(s) (transformers generate, temperature {args.temperature}, max "
          f"{args.max_new_tokens} new tokens)")


if __name__ == "__main__":
    main()
