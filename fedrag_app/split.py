"""Split per-client data into N non-IID sites with flwr-datasets partitioners.

Why: robust aggregation and client-level DP need N >= 5 sites, and the demo has two. The corpus
documents of all inputs are pooled and partitioned (``iid``; ``dirichlet`` or ``shard`` over a
label, by default the input client each document came from); every QA pair follows the document
holding its answer (its ``doc_id``), so each site can answer its own questions. The result is a
data root in the per-client format, written aside and renamed into place, with ``split.json``.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedrag_app.atomic import atomic_text, check_data_root, publish_data_root
from fedrag_app.data import ClientData, DataError, read_jsonl, write_jsonl
from fedrag_app.hf_import import make_partitioner

SPLITS = ("train", "eval")
CLIENT_LABEL = "client"  # --partition-by default: the input client folder a document came from
MARKER = "split.json"
log = logging.getLogger(__name__)
DRAWS = 10  # partitions drawn (seeds derived from --seed) until every site has train + eval QA


@dataclass
class Pool:
    """All inputs' documents (rows with their final ids) and their QA pairs, by document."""

    docs: list[dict] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    qa: dict[str, list[tuple[dict, int]]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    renamed: int = 0
    no_doc_id: int = 0
    unknown_doc_id: int = 0


def _label(path: Path, number: int, row: dict, by: str) -> str:
    value = row.get(by)
    if isinstance(value, bool) or not isinstance(value, str | int | float) or value == "":
        raise DataError(f"{path}:{number}: field {by!r} (--partition-by) missing or not a string")
    return str(value)


def pool(clients: list[ClientData], partition_by: str = CLIENT_LABEL) -> Pool:
    """Validate every input as the loaders do, then pool its rows (extra fields kept).

    A document id two inputs share becomes ``<client>/<id>`` (only those ids); a QA pair's
    ``doc_id`` names a document of its own input, else of the one other input holding it.
    """
    rows: list[tuple[ClientData, Path, int, dict]] = []
    for client in clients:
        ids = [d.id for d in client.corpus()]  # validation: file:line errors
        path = client.file("corpus")
        for doc_id, (number, row) in zip(ids, read_jsonl(path), strict=True):
            rows.append((client, path, number, {**row, "id": doc_id}))
    counts = Counter(row["id"] for *_, row in rows)
    out = Pool()
    where: dict[tuple[str, str], int] = {}
    holders: dict[str, list[int]] = {}
    origin: list[str] = []
    for client, path, number, row in rows:
        original = row["id"]
        if counts[original] > 1:
            row["id"] = f"{client.name}/{original}"
            out.renamed += 1
        where[(client.name, original)] = len(out.docs)
        holders.setdefault(original, []).append(len(out.docs))
        label = (
            client.name if partition_by == CLIENT_LABEL else _label(path, number, row, partition_by)
        )
        out.docs.append(row)
        out.labels.append(label)
        origin.append(client.name)
    final = Counter(row["id"] for row in out.docs)
    if clash := sorted(i for i, n in final.items() if n > 1):
        raise DataError(
            f"document ids still not unique after prefixing with the client: {clash[:5]}"
        )
    for client in clients:
        for kind in SPLITS:
            client.qa(kind)  # validation: file:line errors
            path = client.file(kind)
            for number, row in read_jsonl(path):
                doc_id = row.get("doc_id")
                if isinstance(doc_id, int) and not isinstance(doc_id, bool):
                    doc_id = str(doc_id)
                if not isinstance(doc_id, str) or not doc_id:
                    out.no_doc_id += 1
                    continue
                index = where.get((client.name, doc_id))
                if index is None:
                    found = holders.get(doc_id, [])
                    if len(found) > 1:
                        others = sorted({origin[i] for i in found})
                        raise DataError(
                            f"{path}:{number}: doc_id {doc_id!r} is not in {client.name}'s "
                            f"corpus but in those of {', '.join(others)}: ambiguous"
                        )
                    if not found:
                        out.unknown_doc_id += 1
                        continue
                    index = found[0]
                out.qa[kind].append(({**row, "doc_id": out.docs[index]["id"]}, index))
    if not out.qa["train"] or not out.qa["eval"]:
        raise DataError(
            "no train or no eval QA pair names a corpus document (field 'doc_id'): "
            "a split needs to know where each answer lives"
        )
    return out


def min_site_docs(data: Pool, num_sites: int) -> int:
    """Dirichlet's min_partition_size: enough documents that a site expects >= 3 documents
    holding train and >= 3 holding eval questions, capped at half an even share."""
    rare = min(len({i for _, i in data.qa[s]}) for s in SPLITS)
    need = math.ceil(3 * len(data.docs) / rare)
    return max(1, min(need, len(data.docs) // (2 * num_sites)))


def _draw(
    labels: list[str], kind: str, num_sites: int, alpha: float, seed: int, min_docs: int
) -> list[list[int]]:
    from datasets import Dataset

    dataset = Dataset.from_dict({"row": list(range(len(labels))), "label": labels})
    # IidPartitioner cuts contiguous blocks: shuffle first, as FederatedDataset does
    dataset = dataset.shuffle(seed=seed)
    by = "" if kind == "iid" else "label"
    partitioner = make_partitioner(kind, num_sites, by, seed, alpha, min_docs)
    partitioner.dataset = dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Dirichlet's "min_partition_size not met" retries
        try:
            return [sorted(partitioner.load_partition(i)["row"]) for i in range(num_sites)]
        except ValueError as err:
            hint = (
                f"alpha {alpha} over {len(set(labels))} labels cannot give each of {num_sites} "
                f"sites >= {min_docs} documents"
                if kind == "dirichlet"
                else str(err)
            )
            raise DataError(
                f"{kind} partitioner failed: {hint}; try a larger --alpha or fewer --clients"
            ) from None


def partition(
    data: Pool, kind: str, num_sites: int, alpha: float, seed: int
) -> tuple[list[list[int]], dict]:
    """Document indices per site, and how they were drawn (for split.json)."""
    if num_sites < 1 or num_sites > len(data.docs):
        raise DataError(f"--clients {num_sites}: expected 1..{len(data.docs)} (the documents)")
    if kind not in ("iid", "dirichlet", "shard"):
        raise DataError(f"unknown partitioner {kind!r}: expected iid, dirichlet or shard")
    if kind == "dirichlet" and not alpha > 0:
        raise DataError(f"--alpha {alpha}: must be > 0")
    min_docs = min_site_docs(data, num_sites)
    holding = {s: {i for _, i in data.qa[s]} for s in SPLITS}
    problem = ""
    for draw in range(DRAWS):
        draw_seed = (
            seed if draw == 0 else int(np.random.SeedSequence([seed, draw]).generate_state(1)[0])
        )
        sites = _draw(data.labels, kind, num_sites, alpha, draw_seed, min_docs)
        problem = next(
            (
                f"site-{k:02d} gets {len(docs)} documents but no {s} QA pair"
                for k, docs in enumerate(sites)
                for s in SPLITS
                if holding[s].isdisjoint(docs)
            ),
            "",
        )
        if not problem:
            how = {"draws": draw + 1, "draw_seed": draw_seed}
            if kind == "dirichlet":
                how["min_partition_size"] = min_docs
            return sites, how
    raise DataError(f"{problem} (in {DRAWS} {kind} draws); try a larger --alpha or fewer --clients")


def _check_out(out: Path, overwrite: bool) -> bool:
    try:
        return check_data_root(out, MARKER, "site-", overwrite, "split")
    except ValueError as err:
        raise DataError(str(err)) from None


def split(
    clients: list[ClientData],
    out: Path,
    num_sites: int,
    kind: str = "dirichlet",
    alpha: float = 0.5,
    partition_by: str = CLIENT_LABEL,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write ``out/site-00 ... site-<N-1>`` and ``out/split.json``; returns split.json's content."""
    out = Path(out).expanduser().resolve()
    _check_out(out, overwrite)  # before the work, so a refusal is quick
    data = pool(clients, partition_by)
    if data.no_doc_id or data.unknown_doc_id:
        log.warning(
            "dropped %d QA pairs without a doc_id and %d whose doc_id is in no input's corpus",
            data.no_doc_id,
            data.unknown_doc_id,
        )
    sites, how = partition(data, kind, num_sites, alpha, seed)
    qa_site = {s: {} for s in SPLITS}
    owner = {i: k for k, docs in enumerate(sites) for i in docs}
    for s in SPLITS:
        for row, index in data.qa[s]:
            qa_site[s].setdefault(owner[index], []).append(row)
    summary = {
        "inputs": [{"name": c.name, "folder": str(c.folder.resolve())} for c in clients],
        "partitioner": kind,
        "alpha": alpha if kind == "dirichlet" else None,
        "partition_by": partition_by,
        "seed": seed,
        "clients": num_sites,
        **how,
        "renamed_ids": data.renamed,
        "dropped_qa": {"no_doc_id": data.no_doc_id, "unknown_doc_id": data.unknown_doc_id},
        "pooled": dict(sorted(Counter(data.labels).items())),
        "sites": [],
    }

    def build(tmp: Path) -> None:
        for k, docs in enumerate(sites):
            name = f"site-{k:02d}"
            write_jsonl(tmp / name / "corpus.jsonl", [data.docs[i] for i in docs])
            for s in SPLITS:
                write_jsonl(tmp / name / f"{s}.jsonl", qa_site[s].get(k, []))
            summary["sites"].append(
                {
                    "name": name,
                    "docs": len(docs),
                    **{s: len(qa_site[s].get(k, [])) for s in SPLITS},
                    "labels": dict(sorted(Counter(data.labels[i] for i in docs).items())),
                }
            )
        atomic_text(tmp / MARKER, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")

    try:
        publish_data_root(out, build, MARKER, "site-", overwrite, "split")
    except ValueError as err:
        raise DataError(str(err)) from None
    return summary


def _mix(labels: dict[str, int], pooled: dict[str, int], top: int = 3) -> str:
    """Percent per label: every label in name order when there are few, else the site's top."""
    total = sum(labels.values()) or 1

    def pct(n: int) -> str:
        value = round(100 * n / total)
        return f"{min(max(value, 1), 99) if 0 < n < total else value}%"

    if len(pooled) <= top:
        return " ".join(f"{name} {pct(labels.get(name, 0))}" for name in sorted(pooled))
    ranked = sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))
    text = " ".join(f"{name} {pct(n)}" for name, n in ranked[:top])
    return text + (f" +{len(ranked) - top} more" if len(ranked) > top else "")


def table(summary: dict) -> str:
    """One line per site: documents, train and eval pairs, label mix; then the pooled total."""
    rows = [("site", "docs", "train", "eval", f"{summary['partition_by']} mix")]
    for site in summary["sites"]:
        rows.append(
            (site["name"], str(site["docs"]), str(site["train"]), str(site["eval"]),
             _mix(site["labels"], summary["pooled"]))
        )  # fmt: skip
    sums = {key: sum(site[key] for site in summary["sites"]) for key in ("docs", "train", "eval")}
    rows.append(("all", str(sums["docs"]), str(sums["train"]), str(sums["eval"]),
                 _mix(summary["pooled"], summary["pooled"])))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
