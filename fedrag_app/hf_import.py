"""Turn Hugging Face datasets into per-client folders, partitioned with flwr-datasets.

Users with internet pass hub dataset ids; offline, ``dataset="json"`` with ``data_files`` works
the same way (the tests use that path). QA pairs are split over the clients by a flwr-datasets
partitioner: ``iid``, or ``dirichlet`` on a label column. Columns may be nested (SQuAD's
``answers.text``). When the QA set carries its own contexts (``context_column``, SQuAD-style),
each client's corpus is built from its own QA pairs' contexts, deduplicated, so every question's
supporting document lives at its own site; otherwise a separate corpus data set is split IID.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    ShardPartitioner,
)

from fedrag_app.atomic import atomic_text, check_data_root, publish_data_root
from fedrag_app.data import DataError, write_jsonl

MARKER = "import.json"  # marks a data root this command wrote, so --overwrite may replace it


def make_partitioner(
    kind: str,
    num_partitions: int,
    by: str = "",
    seed: int = 0,
    alpha: float = 0.5,
    min_partition_size: int = 10,
) -> Partitioner:
    """``iid``, ``dirichlet`` (alpha = concentration over the ``by`` labels) or ``shard`` (each
    partition gets two label-sorted shards)."""
    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if kind in ("dirichlet", "shard") and not by:
        raise DataError(f"partitioner {kind!r} needs a label column (--partition-by)")
    if kind == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=by,
            alpha=alpha,
            min_partition_size=min_partition_size,
            seed=seed,
        )
    if kind == "shard":
        return ShardPartitioner(
            num_partitions=num_partitions, partition_by=by, num_shards_per_partition=2, seed=seed
        )
    raise DataError(f"unknown partitioner {kind!r}: expected iid, dirichlet or shard")


def _partitions(
    dataset: str, split: str, num: int, kind: str, by: str, data_files: Any
) -> list[list[dict]]:
    kwargs: dict[str, Any] = {"data_files": data_files} if data_files else {}
    fds = FederatedDataset(
        dataset=dataset, partitioners={split: make_partitioner(kind, num, by)}, **kwargs
    )
    return [list(fds.load_partition(i, split)) for i in range(num)]


def _column(row: dict, name: str, where: str) -> Any:
    """``name`` may be dotted for nested columns: ``answers.text``."""
    value: Any = row
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            keys = ", ".join(value) if isinstance(value, dict) else type(value).__name__
            raise DataError(f"{where}: column {name!r} missing (at {part!r}; found: {keys})")
        value = value[part]
    return value


def _answers(value: Any, name: str, where: str) -> list[str]:
    """A string or a list of strings; anything else (SQuAD's ``answers`` dict) is refused."""
    items = value if isinstance(value, list) else [value]
    if not items or not all(
        isinstance(a, str | int | float) and not isinstance(a, bool) for a in items
    ):
        hint = " (a nested column, e.g. 'answers.text'?)" if isinstance(value, dict) else ""
        raise DataError(
            f"{where}: column {name!r} holds {type(value).__name__}, not a string or a list of "
            f"strings{hint}"
        )
    answers = [str(a).strip() for a in items if str(a).strip()]
    if not answers:
        raise DataError(f"{where}: column {name!r} holds no non-empty answer")
    return answers


def import_hf(
    out: Path,
    num_clients: int,
    qa_dataset: str,
    corpus_dataset: str = "",
    qa_split: str = "train",
    corpus_split: str = "train",
    question_column: str = "question",
    answer_column: str = "answer",
    text_column: str = "text",
    title_column: str = "",
    partitioner: str = "iid",
    partition_by: str = "",
    eval_fraction: float = 0.2,
    qa_files: Any = None,
    corpus_files: Any = None,
    context_column: str = "",
    overwrite: bool = False,
) -> list[Path]:
    """Write ``out/client-<i>/{corpus,train,eval}.jsonl``; returns the client folders.

    With ``context_column`` the corpus comes from the QA rows' own contexts (no corpus data set
    needed); without it, from ``corpus_dataset``. ``out`` must be new, empty or (with
    ``overwrite``) a previous import, which is replaced whole once the new one is complete.
    """
    if not context_column and not corpus_dataset:
        raise DataError(
            "give a corpus data set (--corpus-dataset) or the QA set's --context-column"
        )
    try:
        check_data_root(out, MARKER, "client-", overwrite, "import")  # refuse before downloading
    except ValueError as err:
        raise DataError(str(err)) from None
    qa_parts = _partitions(qa_dataset, qa_split, num_clients, partitioner, partition_by, qa_files)
    corpus_parts = (
        [[] for _ in qa_parts]
        if context_column
        else _partitions(corpus_dataset, corpus_split, num_clients, "iid", "", corpus_files)
    )
    clients = []
    for i, (qa_rows, corpus_rows) in enumerate(zip(qa_parts, corpus_parts, strict=True)):
        corpus = []
        for j, row in enumerate(corpus_rows):
            text = str(_column(row, text_column, f"{corpus_dataset}[{j}]"))
            title = str(row.get(title_column, "")) if title_column else ""
            corpus.append({"id": f"c{i}-{j}", "text": text, "title": title})
        qa, contexts = [], {}
        for j, row in enumerate(qa_rows):
            where = f"{qa_dataset}[{j}]"
            answers = _answers(_column(row, answer_column, where), answer_column, where)
            question = str(_column(row, question_column, where))
            qa.append({"question": question, "answers": answers})
            if context_column:
                text = str(_column(row, context_column, where))
                title = str(_column(row, title_column, where)) if title_column else ""
                contexts.setdefault(
                    text, {"id": f"c{i}-{len(contexts)}", "text": text, "title": title}
                )
        corpus += list(contexts.values())
        n_eval = max(1, int(len(qa) * eval_fraction))
        if len(qa) < 2 or not corpus:
            raise DataError(f"client {i}: too few rows after partitioning ({len(qa)} QA)")
        clients.append((corpus, qa[n_eval:], qa[:n_eval]))

    def build(tmp: Path) -> None:
        for i, (corpus, train, evaluation) in enumerate(clients):
            write_jsonl(tmp / f"client-{i}" / "corpus.jsonl", corpus)
            write_jsonl(tmp / f"client-{i}" / "train.jsonl", train)
            write_jsonl(tmp / f"client-{i}" / "eval.jsonl", evaluation)
        source = {
            "qa-dataset": qa_dataset,
            "corpus-dataset": corpus_dataset,
            "clients": len(clients),
        }
        atomic_text(tmp / MARKER, json.dumps(source, indent=2) + "\n")

    try:
        publish_data_root(out, build, MARKER, "client-", overwrite, "import")
    except ValueError as err:
        raise DataError(str(err)) from None
    return [out / f"client-{i}" for i in range(len(clients))]
