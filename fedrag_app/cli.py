"""`fedrag` command: index, query, eval, train --centralized, import-hf, split, export, report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from fedrag_app.config import Settings, parse_overrides, settings_from
from fedrag_app.data import DataError, resolve_clients


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        action="append",
        metavar="DIR",
        help="client folder or data root (repeatable; default: the packaged demo)",
    )
    p.add_argument(
        "-c",
        "--config",
        action="append",
        metavar="'KEY=VALUE ...'",
        help="override [tool.flwr.app.config] keys, e.g. -c 'top-k=5 device=cuda'",
    )
    p.add_argument("--retriever-model", help="query/context encoder: hub id or local folder")
    p.add_argument("--generator-model", help="causal LM: hub id or local folder")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--store-dir", help="folder for embedded Qdrant stores")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _finetuned(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run",
        help="a finished run (outputs/run-* or a train --out folder): its models and the "
        "settings it trained with (-c and the options below still win)",
    )
    p.add_argument("--adapter", help="a LoRA adapter folder (e.g. OUT/adapter)")
    p.add_argument("--retriever", help="a fine-tuned query encoder folder (e.g. OUT/retriever)")


def _trained(args: argparse.Namespace) -> tuple[Settings, str | None, str | None]:
    """Settings, adapter and query encoder: a --run's, under any explicit option."""
    if not args.run:
        return _settings(args), args.adapter, args.retriever
    from fedrag_app.trained import open_run

    run = open_run(args.run)
    s = _settings(args, base=run.settings.to_config())
    return s, args.adapter or run.adapter, args.retriever or run.query_encoder


def _settings(args: argparse.Namespace, base: dict | None = None) -> Settings:
    return settings_from(
        {**(base or {}), **parse_overrides(args.config)},
        retriever_model=args.retriever_model,
        generator_model=args.generator_model,
        device=args.device,
        dtype=args.dtype,
        store_dir=args.store_dir,
    )


def _table(summary: dict) -> str:
    rows = [("client", "n", "EM", "F1", "recall@k", "MRR")]
    items = [*summary["clients"].items(), ("overall", summary["overall"])]
    for name, m in items:
        rows.append(
            (name, str(m["n"]), f"{m['em']:.1f}", f"{m['f1']:.1f}", f"{m['recall_at_k']:.1f}",
             f"{m['mrr']:.3f}")
        )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def cmd_index(args: argparse.Namespace) -> int:
    from fedrag_app.task import build_retriever, open_store

    s = _settings(args)
    clients = resolve_clients(args.data)  # bad folders fail before any model loads
    retriever = build_retriever(s)
    for client in clients:
        with open_store(client, s, retriever, progress=not args.quiet) as store:
            print(f"{client.name}: {store.count()} chunks in store '{store.name}'")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from fedrag_app.rag.system import RAGSystem
    from fedrag_app.task import build_generator, build_retriever, open_store, warn_cut

    s, adapter, query_encoder = _trained(args)
    clients = resolve_clients(args.data)  # bad folders fail before any model loads
    retriever, generator = build_retriever(s, query_encoder), build_generator(s, adapter)
    for client in clients:
        cut_before = generator.contexts_cut
        with open_store(client, s, retriever, progress=not args.quiet) as store:
            answer = RAGSystem(retriever, generator, store, s.top_k).answer(
                [args.question], s.max_new_tokens
            )[0]
        warn_cut(generator, cut_before, f"query at {client.name}")
        print(f"[{client.name}] answer: {answer.text}")
        for rank, hit in enumerate(answer.sources, start=1):
            print(f"  {rank}. ({hit.score:.3f}) {hit.doc_id}: {hit.text[:160]}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fedrag_app.task import build_generator, build_retriever, evaluate_local

    s, adapter, query_encoder = _trained(args)
    if args.limit is not None:
        s = s.replace(eval_limit=args.limit)
    clients = resolve_clients(args.data)  # bad folders fail before any model loads
    retriever, generator = build_retriever(s, query_encoder), build_generator(s, adapter)
    summary, _ = evaluate_local(clients, s, retriever, generator, not args.quiet)
    print(_table(summary))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from fedrag_app.centralized import run_centralized

    if not args.centralized:
        print(
            "federated training runs through Flower: `flwr run .` (see README); "
            "pass --centralized for an in-process run",
            file=sys.stderr,
        )
        return 2
    s = _settings(args)
    if args.mode:
        s = s.replace(mode=args.mode)
    result = run_centralized(
        resolve_clients(args.data), s, args.out, not args.quiet, overwrite=args.overwrite
    )
    print("before:\n" + _table(result["before"]))
    print("after:\n" + _table(result["after"]))
    print(f"wrote {args.out}/metrics.json, adapter/, retriever/ in {result['seconds']:.0f} s")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from fedrag_app.hf_import import import_hf

    folders = import_hf(
        Path(args.out),
        args.clients,
        qa_dataset=args.qa_dataset,
        corpus_dataset=args.corpus_dataset,
        context_column=args.context_column,
        qa_files=args.qa_files,
        corpus_files=args.corpus_files,
        qa_split=args.qa_split,
        corpus_split=args.corpus_split,
        question_column=args.question_column,
        answer_column=args.answer_column,
        text_column=args.text_column,
        title_column=args.title_column,
        partitioner=args.partitioner,
        partition_by=args.partition_by,
        overwrite=args.overwrite,
    )
    print("\n".join(str(f) for f in folders))
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from fedrag_app.split import split, table

    summary = split(
        resolve_clients(args.data),
        Path(args.out),
        args.clients,
        kind=args.partitioner,
        alpha=args.alpha,
        partition_by=args.partition_by,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(table(summary))
    print(f"wrote {len(summary['sites'])} sites and split.json to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedrag_app.export import export

    overrides = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v}
    out = export(args.run, args.out, overwrite=args.overwrite, **overrides)
    print(f"wrote {out}: generator/ (LoRA merged), retriever/, context-encoder.json, README.md")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedrag_app.report import write_report

    print(f"wrote {write_report(args.run, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedrag", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="build (or reuse) each client's Qdrant store")
    _common(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("query", help="answer a question with its sources")
    _common(p)
    _finetuned(p)
    p.add_argument("question")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("eval", help="EM, F1, recall@k and MRR per client and overall")
    _common(p)
    _finetuned(p)
    p.add_argument("--limit", type=int, help="questions per client (config key eval-limit)")
    p.add_argument("--json", metavar="OUT.json", help="write the summary as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="fine-tune in-process (federated runs use `flwr run`)")
    _common(p)
    p.add_argument("--centralized", action="store_true", help="train in this process")
    p.add_argument("--mode", choices=["generator", "retriever", "both"])
    p.add_argument("--out", required=True, help="output folder (new, or a previous result)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace this command's files in a non-empty --out it did not write",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("import-hf", help="Hugging Face datasets -> per-client folders")
    p.add_argument("--out", required=True)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--qa-dataset", required=True, help="hub id, or 'json' with --qa-files")
    p.add_argument("--corpus-dataset", default="", help="not needed with --context-column")
    p.add_argument("--qa-files", help="local files for --qa-dataset json (works offline)")
    p.add_argument("--corpus-files", help="local files for --corpus-dataset json")
    p.add_argument(
        "--context-column",
        default="",
        help="the QA set's own context column (SQuAD: context): each site's corpus is then "
        "its own QA pairs' contexts",
    )
    p.add_argument("--qa-split", default="train")
    p.add_argument("--corpus-split", default="train")
    p.add_argument("--question-column", default="question")
    p.add_argument("--answer-column", default="answer", help="nested too: answers.text")
    p.add_argument("--text-column", default="text")
    p.add_argument("--title-column", default="")
    p.add_argument("--partitioner", default="iid", choices=["iid", "dirichlet"])
    p.add_argument("--partition-by", default="")
    p.add_argument("--overwrite", action="store_true", help="replace a previous import in --out")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("split", help="per-client data -> N non-IID sites (flwr-datasets)")
    p.add_argument(
        "--data",
        action="append",
        metavar="DIR",
        help="client folder or data root (repeatable; default: the packaged demo)",
    )
    p.add_argument("--clients", type=int, required=True, help="number of sites to write")
    p.add_argument("--partitioner", default="dirichlet", choices=["iid", "dirichlet", "shard"])
    p.add_argument("--alpha", type=float, default=0.5, help="dirichlet concentration")
    p.add_argument(
        "--partition-by",
        default="client",
        help="the label the split is non-IID over: 'client' (the input client folder a "
        "document came from) or a corpus field",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="a new data root (or a previous split)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous split in --out")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("export", help="a run -> merged generator, query encoder, model card")
    p.add_argument("run", help="a federated run folder (outputs/run-*) or a train --out folder")
    p.add_argument("--out", required=True, help="a new folder (or a previous export)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export in --out")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="a run -> one self-contained HTML page")
    p.add_argument("run", help="a federated run folder (outputs/run-*)")
    p.add_argument("--out", help="the HTML file (default RUN/report.html)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except (DataError, ValueError, KeyError, RuntimeError, OSError) as err:
        if os.environ.get("FEDRAG_DEBUG"):
            raise
        print(
            f"fedrag {args.command}: error: {err} (FEDRAG_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
