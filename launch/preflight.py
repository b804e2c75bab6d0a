"""What `pliant train` checks on the driver before it launches anything (docs/faults.md,
"Errors are not faults"): the config with its command-line overrides, the data files (they
exist, their headers and index hold together, every token id is within the model's
vocabulary) and the model directory (config.json, tokenizer, every tensor's shape), each
problem a pliant input error that names the file, the key or the value. Bad input found here
costs no start-up, no restart and no slot marked bad on a cluster.
"""
from __future__ import annotations

from pliant.config import JobConfig
from pliant.planner.lengths import load_length_file


def check_data(cfg: JobConfig) -> None:
    """The files the job's data section names, read as the ranks will read them."""
    data = cfg.data
    if data.source == "tokens":
        from pliant.runtime.indexed import IndexedTokens

        IndexedTokens.open(data.token_prefix, vocab_size=cfg.model.vocab_size).check_token_ids()
    elif data.lengths_file:
        load_length_file(data.lengths_file)


def check_model(cfg: JobConfig) -> None:
    """The model directory (model.hf_path), checked without loading its weights."""
    if cfg.model.hf_path is None:
        return
    from pliant.runtime.hf import check_model as check_model_dir

    check_model_dir(cfg.model)


def check_job(cfg: JobConfig) -> None:
    """Every check above; raises the first problem found."""
    check_data(cfg)
    check_model(cfg)
