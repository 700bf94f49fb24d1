"""Flower ServerApp: initial state out, Flower strategy rounds, checkpoints, history, export."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedrag_app import task
from fedrag_app.config import Settings, settings_from
from fedrag_app.finetune.loop import seed_everything
from fedrag_app.run_folder import RunFolder
from fedrag_app.strategies import momentum_warning, server_strategy
from fedrag_app.weights import nbytes, pack, unpack

app = ServerApp()
log = logging.getLogger("fedrag_app.server")


def exporter(s: Settings, retriever, generator):
    def export(folder: Path, arrays: ArrayRecord) -> None:
        task.apply_states(unpack(arrays), retriever, generator)
        generator.save_adapter(folder / "adapter")
        if s.mode in ("retriever", "both"):
            retriever.save(folder / "retriever")

    return export


@app.main()
def main(grid: Grid, context: Context) -> None:
    s = settings_from(context.run_config)
    run = RunFolder.create(s.output_dir, s.resume)
    run.save_config(s.to_config())
    seed_everything(s.seed)  # identical initial LoRA weights for identical seeds
    retriever, generator = task.load_models(s)
    # the global model is float32 always; wire-dtype=float16 encodes only the clients' updates
    initial = run.checkpoint_arrays() or pack(task.trainable_states(s.mode, retriever, generator))
    # every message names the base weights: a site whose own copy differs refuses to train
    base = ConfigRecord({"base-fingerprint": task.base_fingerprint(retriever, generator)})
    export = exporter(s, retriever, generator)
    strategy = server_strategy(s, run.history, run.start_round, nbytes(initial))
    if warning := momentum_warning(s):
        log.warning(warning)
    print(f"fedrag: run folder {run.path}; {nbytes(initial) / 1e6:.2f} MB of weights per client")

    if run.start_round == 0:
        run.save_arrays("initial.npz", initial)
    if run.start_round == 0 and s.fraction_evaluate > 0:  # the base system, as round 0
        replies = grid.send_and_receive(
            strategy.configure_evaluate(0, initial, ConfigRecord(dict(base)), grid),
            timeout=s.round_timeout,
        )
        strategy.aggregate_evaluate(0, replies)
        run.history.save(run.path)

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:
            done = server_round + run.start_round
            run.save_checkpoint(done, arrays, lambda folder: export(folder, arrays))
        return None

    rounds = s.num_server_rounds - run.start_round
    start = time.perf_counter()
    result = strategy.start(
        grid,
        initial,
        num_rounds=max(rounds, 0),
        timeout=s.round_timeout,
        train_config=ConfigRecord({**base, "round-offset": run.start_round}),
        evaluate_config=ConfigRecord(dict(base)),
        evaluate_fn=checkpoint,
    )
    final = result.arrays or initial
    run.save_final(final, export)
    run.history.save(run.path)
    _summary(run, time.perf_counter() - start)

    if s.query_question:  # each site answers only if its own policy allows it
        from fedrag_app.federated_query import federated_retrieve

        contexts = federated_retrieve(
            grid, s.query_question, s.top_k, final, str(base["base-fingerprint"]), s.round_timeout
        )
        cut_before = generator.contexts_cut
        answer = generator.generate(
            [generator.prompt(s.query_question, contexts)], s.max_new_tokens
        )
        task.warn_cut(generator, cut_before, "federated query")
        print(f"federated query: {s.query_question!r} -> {answer[0]!r}")


def _summary(run: RunFolder, seconds: float) -> None:
    print(f"fedrag: finished in {seconds:.0f} s; outputs in {run.path}")
    for row in run.history.rows:
        if row["client"] == "aggregated" and row["stage"] == "evaluate" and "em" in row:
            print(
                f"  round {row['round']}: EM {row['em']:.1f}  F1 {row['f1']:.1f}  "
                f"recall@k {row['recall_at_k']:.1f}  MRR {row['mrr']:.3f}"
            )
