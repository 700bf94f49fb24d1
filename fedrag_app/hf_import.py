"""Turn Hugging Face datasets into per-client folders, partitioned with flwr-datasets.

Users with internet pass hub dataset ids; offline, ``dataset="json"`` with ``data_files`` works
the same way (the tests use that path). QA pairs and corpus rows are each split over the clients
by a flwr-datasets partitioner: ``iid``, or ``dirichlet`` / ``pathological`` on a label column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from fedrag_app.data import DataError, write_jsonl


def make_partitioner(kind: str, num_partitions: int, by: str = "", seed: int = 0) -> Partitioner:
    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        if not by:
            raise DataError("partitioner 'dirichlet' needs a label column (--partition-by)")
        return DirichletPartitioner(
            num_partitions=num_partitions, partition_by=by, alpha=0.5, seed=seed
        )
    raise DataError(f"unknown partitioner {kind!r}: expected iid or dirichlet")


def _partitions(
    dataset: str, split: str, num: int, kind: str, by: str, data_files: Any
) -> list[list[dict]]:
    kwargs: dict[str, Any] = {"data_files": data_files} if data_files else {}
    fds = FederatedDataset(
        dataset=dataset, partitioners={split: make_partitioner(kind, num, by)}, **kwargs
    )
    return [list(fds.load_partition(i, split)) for i in range(num)]


def _column(row: dict, name: str, where: str) -> Any:
    if name not in row:
        raise DataError(f"{where}: column {name!r} missing (columns: {', '.join(row)})")
    return row[name]


def import_hf(
    out: Path,
    num_clients: int,
    qa_dataset: str,
    corpus_dataset: str,
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
) -> list[Path]:
    """Write ``out/client-<i>/{corpus,train,eval}.jsonl``; returns the client folders."""
    qa_parts = _partitions(qa_dataset, qa_split, num_clients, partitioner, partition_by, qa_files)
    corpus_parts = _partitions(corpus_dataset, corpus_split, num_clients, "iid", "", corpus_files)
    folders = []
    for i, (qa_rows, corpus_rows) in enumerate(zip(qa_parts, corpus_parts, strict=True)):
        folder = out / f"client-{i}"
        corpus = []
        for j, row in enumerate(corpus_rows):
            text = str(_column(row, text_column, f"{corpus_dataset}[{j}]"))
            title = str(row.get(title_column, "")) if title_column else ""
            corpus.append({"id": f"c{i}-{j}", "text": text, "title": title})
        qa = []
        for j, row in enumerate(qa_rows):
            answer = _column(row, answer_column, f"{qa_dataset}[{j}]")
            answers = [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]
            qa.append(
                {"question": str(_column(row, question_column, qa_dataset)), "answers": answers}
            )
        n_eval = max(1, int(len(qa) * eval_fraction))
        if len(qa) < 2 or not corpus:
            raise DataError(f"client {i}: too few rows after partitioning ({len(qa)} QA)")
        write_jsonl(folder / "corpus.jsonl", corpus)
        write_jsonl(folder / "train.jsonl", qa[n_eval:])
        write_jsonl(folder / "eval.jsonl", qa[:n_eval])
        folders.append(folder)
    return folders
