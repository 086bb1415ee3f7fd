"""Loader and scoring of the Tang-poem tasks (lm-evaluation-harness ``!function`` hooks).

The task YAML beside this file name their data (``dataset_kwargs.data_file``),
read from this directory whatever the working directory, so the set runs
offline both under ``tangquant eval --tasks`` and ``lm_eval --include_path``.
Written by tangquant (``tangquant/lmtasks.py``); data: chinese-poetry, MIT.
"""

import json
import os

import datasets


def load(data_file, **_metadata):
    """{"test": the JSONL file's rows}; lm_eval passes the task's metadata too, unused."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), data_file)
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_nextline(doc, results):
    """Byte perplexity and bits per byte of the target couplet given its context."""
    loglikelihood, _is_greedy = results[0]
    n_bytes = len(doc["target"].encode("utf-8"))
    return {"byte_perplexity": (loglikelihood, n_bytes), "bits_per_byte": (loglikelihood, n_bytes)}
