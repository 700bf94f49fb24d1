"""The ONE local path that centralized runs and the Flower ClientApp share.

Open a client's store (indexing it if needed), build the RAG system from settings, train it
locally in the configured mode, and evaluate it. Nothing here knows about Flower messages.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from fedrag_app.config import Settings
from fedrag_app.data import ClientData, QAPair, file_digest
from fedrag_app.evaluation import evaluate_system, summarize
from fedrag_app.finetune.loop import LoopSettings, prepared_batches, run_loop, seed_everything
from fedrag_app.finetune.lsr import LsrLoss
from fedrag_app.finetune.privacy import DpSettings, PrivacyLedger, noise_multiplier, poisson_batches
from fedrag_app.finetune.ralt import RaltLoss, raft_examples, ralt_examples
from fedrag_app.rag.chunking import chunk_documents
from fedrag_app.rag.generator import Generator, LoraSettings
from fedrag_app.rag.lora import only_factor, trained_factor
from fedrag_app.rag.retriever import Retriever
from fedrag_app.rag.store import KnowledgeStore, fingerprint
from fedrag_app.rag.system import RAGSystem

log = logging.getLogger(__name__)


def build_retriever(s: Settings, query_dir: str | Path | None = None) -> Retriever:
    """``query_dir``: a fine-tuned query encoder; the context encoder stays the base model."""
    return Retriever(
        str(query_dir) if query_dir else s.retriever_model,
        context_model=s.context_model or s.retriever_model,
        device=s.device,
        lora_r=0 if query_dir else s.retriever_lora_r,
        freeze_lora_a=s.lora_aggregation == "ffa",
    )


def build_generator(s: Settings, adapter: str | Path | None = None) -> Generator:
    lora = LoraSettings(
        r=s.lora_r,
        alpha=s.lora_alpha,
        dropout=s.lora_dropout,
        targets=tuple(t.strip() for t in s.lora_targets.split(",") if t.strip()),
    )
    return Generator(
        s.generator_model,
        device=s.device,
        dtype=s.dtype,
        lora=lora,
        adapter=adapter,
        max_context_chars=s.max_context_chars,
        autocast_bf16=s.autocast_bf16,
        gradient_checkpointing=s.gradient_checkpointing,
        freeze_lora_a=s.lora_aggregation == "ffa",
    )


def warn_cut(generator: Generator, before: int, what: str) -> None:
    """Retrieval and recall@k see whole chunks; the prompt sees at most max-context-chars."""
    cut = generator.contexts_cut - before
    if cut:
        log.warning(
            "%s: %d retrieved contexts were longer than max-context-chars=%d and were cut in "
            "the prompt (raise max-context-chars, or lower chunk-tokens)",
            what,
            cut,
            generator.max_context_chars,
        )


def store_name(client: ClientData) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", client.name)


def open_store(
    client: ClientData, s: Settings, retriever: Retriever, progress: bool = True
) -> KnowledgeStore:
    """Open the client's private store and index its corpus unless an identical build exists."""
    store = KnowledgeStore.open(
        store_name(client), s.store_mode, s.store_dir, s.qdrant_url, s.qdrant_api_key_env
    )
    try:
        corpus_file = client.file("corpus")
        fp = fingerprint(
            file_digest(corpus_file),
            retriever.context_ref,
            retriever.dim,
            s.chunk_tokens,
            s.chunk_overlap,
        )
        store.build(
            fp,
            lambda: chunk_documents(
                client.corpus(), retriever.tokenizer, s.chunk_tokens, s.chunk_overlap
            ),
            retriever.encode_contexts,
            retriever.dim,
            progress=progress,
        )
    except BaseException:
        store.close()
        raise
    return store


@contextlib.contextmanager
def open_stores(
    clients: list[ClientData], s: Settings, retriever: Retriever, progress: bool = True
) -> Iterator[list[KnowledgeStore]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(open_store(c, s, retriever, progress)) for c in clients]


def evaluate_local(
    clients: list[ClientData],
    s: Settings,
    retriever: Retriever,
    generator: Generator,
    progress: bool = True,
) -> tuple[dict, dict[str, list[dict]]]:
    """``{"overall": {...}, "clients": {name: {...}}}`` and per-question records per client."""
    per_client: dict[str, dict] = {}
    records: dict[str, list[dict]] = {}
    cut_before = generator.contexts_cut
    with open_stores(clients, s, retriever, progress) as stores:
        for client, store in zip(clients, stores, strict=True):
            system = RAGSystem(retriever, generator, store, s.top_k)
            qa = client.qa("eval", s.eval_limit)
            per_client[client.name], records[client.name] = evaluate_system(
                system, qa, s.max_new_tokens, progress=progress, desc=f"eval {client.name}"
            )
    overall = summarize([r for rs in records.values() for r in rs], s.top_k)
    warn_cut(generator, cut_before, "evaluation")
    return {"overall": overall, "clients": per_client}, records


def train_local(
    clients: list[ClientData],
    s: Settings,
    retriever: Retriever,
    generator: Generator,
    progress: bool = True,
    server_round: int = 0,
    optimizer_state: dict[str, torch.Tensor] | None = None,
    privacy: PrivacyLedger | None = None,
    data_position: dict[str, int] | None = None,
) -> dict[str, float]:
    """Fine-tune in place on the pooled train sets of ``clients``; returns numeric metrics.

    With ``dp = record`` the generator trains with DP-SGD; ``privacy`` holds the site's private
    steps of earlier rounds (and its budget), and gains this call's, so the reported
    ``dp-epsilon`` covers the whole run so far.

    Mode ``both`` trains the retriever first (LSR, ``local-steps`` steps), then the generator
    (RALT, ``local-steps`` steps) on contexts retrieved with the freshly trained query encoder.
    A federated client passes ``server_round``: with ``lr-schedule = run`` its steps continue
    one learning-rate schedule over all rounds instead of restarting it every round, and
    (with ``keep-optimizer-state``) its own AdamW moments, which this call updates in place.
    With ``data-order = run`` it passes ``data_position`` (``seed``, and per stage, ``ret`` and
    ``gen``, the items its earlier rounds went through), and this round's examples continue one
    pass over its data from there (updated in place) instead of a fresh shuffle.
    """
    seed_everything(s.seed)
    rng = random.Random(s.seed)
    start = time.perf_counter()
    pairs = [(i, p) for i, c in enumerate(clients) for p in c.qa("train")]
    if s.local_epochs > 0:  # a site's work in proportion to its data, as FedAvg's E epochs
        per_step = s.batch_size * s.grad_accum
        s = s.replace(local_steps=max(1, round(s.local_epochs * len(pairs) / per_step)))
    # local-steps: what FedNova (``fednova``) divides this site's update by
    metrics: dict[str, float] = {
        "num-examples": float(len(pairs)),
        "local-steps": float(s.local_steps),
    }
    skipped, cut_before = 0, generator.contexts_cut
    loop = dict(
        steps=s.local_steps,
        warmup_ratio=s.warmup_ratio,
        max_grad_norm=s.max_grad_norm,
        grad_accum=s.grad_accum,
        micro_batch_tokens=s.micro_batch_tokens,
        autocast_bf16=s.autocast_bf16,
        proximal_mu=s.proximal_mu,
        optimizer=s.client_optimizer,
        schedule="constant" if s.lr_schedule == "constant" else "linear",
        progress=progress,
    )
    if server_round > 0 and s.lr_schedule == "run":
        loop.update(
            schedule_start=(server_round - 1) * s.local_steps,
            schedule_total=s.num_server_rounds * s.local_steps,
        )
    factor = trained_factor(s.lora_aggregation, server_round)  # alternate: one factor a round

    def continued(stage: str, prepare: Callable[[list], list]) -> tuple[Callable, tuple | None]:
        """``prepare`` counting what it consumes, and where this stage's pass resumes."""
        if data_position is None or s.data_order != "run":
            return prepare, None
        data_position.setdefault(stage, 0)

        def counted(items: list) -> list:
            data_position[stage] += len(items)
            return prepare(items)

        return counted, (data_position["seed"], data_position[stage])

    with open_stores(clients, s, retriever, progress) as stores:
        if s.mode in ("retriever", "both"):
            loss = LsrLoss(
                retriever,
                generator,
                stores,
                s.lsr_k,
                s.lsr_gamma,
                s.lsr_tau,
                s.max_seq_len,
                target=s.lsr_target,
            )
            too_long: set = set()

            def fitting(items: list[tuple[int, QAPair]]) -> list[tuple[int, QAPair]]:
                n = s.max_seq_len
                keep = [x for x in items if generator.fits(x[1].question, [], x[1].answers[0], n)]
                too_long.update(set(items) - set(keep))
                return keep

            prepare, run_order = continued("ret", fitting)
            batches = prepared_batches(
                pairs,
                prepare,
                lambda x: len(x[1].question),
                s.lsr_batch_size,
                _window(s, s.lsr_batch_size),
                rng,
                run_order,
            )
            with only_factor(retriever.trainable_parameters(), factor) as params:
                res = run_loop(
                    _prefixed("ret.", params),
                    batches,
                    loss,
                    LoopSettings(lr=s.ret_lr, desc="LSR (retriever)", **loop),
                    optimizer_state,
                )
            metrics.update({f"ret-{k.replace('_', '-')}": float(v) for k, v in res.items()})
            skipped += len(too_long) + loss.skipped
        if s.mode in ("generator", "both"):
            loss = RaltLoss(generator, s.max_seq_len, per_example=s.dp == "record")
            unfit: set = set()

            per_pair = 1 if s.raft_p > 0 or s.dp == "record" else s.top_k

            def examples(items: list[tuple]) -> list:
                """RALT / RAFT examples of (store, pair, rank) items: one batched retrieval per
                store. Plain RALT makes one example per (pair, retrieved rank), so an item is
                one of them, and a window holds as many different questions as examples, as
                when every example of the data set was shuffled."""
                built = []
                for i, store in enumerate(stores):
                    mine = [(p, rank) for j, p, rank in items if j == i]
                    if not mine:
                        continue
                    unique = list(dict.fromkeys(p for p, _ in mine))
                    k = s.top_k + s.raft_distractors + 2 if s.raft_p > 0 else s.top_k
                    found = store.search(retriever.encode_queries([p.question for p in unique]), k)
                    hits = dict(zip(unique, found, strict=True))
                    if s.raft_p > 0:
                        built += raft_examples(unique, found, s.raft_p, s.raft_distractors, rng)
                    elif s.dp == "record":  # one example per QA pair, the unit DP is about
                        built += ralt_examples(unique, found, s.top_k, joint=True)
                    else:
                        for p, rank in mine:
                            if rank < len(hits[p]):
                                built += ralt_examples([p], [hits[p][rank : rank + 1]], 1)
                keep = [e for e in built if loss.fits(e)]
                unfit.update(set(built) - set(keep))
                return keep

            items = [(i, p, rank) for i, p in pairs for rank in range(per_pair)]
            dp = None
            if s.dp == "record":
                dp = _dp_settings(s, len(pairs), federated=server_round > 0)
                privacy = privacy or PrivacyLedger(s.dp_delta)
                privacy.plan(dp, s.local_steps)  # refuse before training, not after
                batches = poisson_batches(items, dp.sample_rate, rng, examples)
            else:
                window = _window(s, s.batch_size)
                prepare, run_order = continued("gen", examples)
                batches = prepared_batches(
                    items, prepare, loss.length, s.batch_size, window, rng, run_order
                )
            with only_factor(generator.trainable_parameters(), factor) as params:
                res = run_loop(
                    _prefixed("gen.", params),
                    batches,
                    loss,
                    LoopSettings(lr=s.gen_lr, desc="RALT (generator)", dp=dp, **loop),
                    optimizer_state,
                    module=generator.model,
                )
            metrics.update({f"gen-{k.replace('_', '-')}": float(v) for k, v in res.items()})
            skipped += len(unfit)
            if dp is not None and privacy is not None:
                privacy.record(dp, int(res["steps"]))
                metrics.update(
                    {
                        "dp-epsilon": privacy.epsilon(),
                        "dp-noise-multiplier": dp.noise_multiplier,
                        "dp-sample-rate": dp.sample_rate,
                    }
                )
    # examples longer than max-seq-len are left out and counted, never a failed round
    metrics["skipped-examples"] = float(skipped)
    metrics["contexts-cut"] = float(generator.contexts_cut - cut_before)
    warn_cut(generator, cut_before, "training")
    if skipped:
        log.warning(
            "%d training examples do not fit max-seq-len %d: skipped", skipped, s.max_seq_len
        )
    metrics["train-loss"] = metrics.get("gen-loss", metrics.get("ret-loss", 0.0))
    metrics["seconds"] = time.perf_counter() - start
    return metrics


def _window(s: Settings, batch_size: int) -> int:
    """Examples prepared at a time: one round's (steps x accumulation x batch), capped so
    length grouping still sees a few dozen batches in a long centralized run."""
    return min(s.local_steps * s.grad_accum * batch_size, 32 * batch_size)


def _dp_settings(s: Settings, examples: int, federated: bool) -> DpSettings:
    """The noise for the whole run's steps at this site's sampling rate: a federated site
    plans for every round (num-server-rounds x local-steps), a centralized run for its steps.
    ``examples`` counts the site's QA pairs, sampled before anything is tokenized."""
    expected = min(s.batch_size * s.grad_accum, examples)
    rate = expected / max(examples, 1)
    steps = s.local_steps * (s.num_server_rounds if federated else 1)
    z = noise_multiplier(s.dp_epsilon, s.dp_delta, rate, steps, s.dp_noise_multiplier)
    return DpSettings(z, s.dp_clip_norm, rate, expected, s.batch_size)


def _prefixed(prefix: str, params: dict[str, torch.nn.Parameter]) -> dict:
    """Names unique across the retriever and generator, so one optimizer-state dict holds both."""
    return {prefix + name: p for name, p in params.items()}


# ---- weights in, weights out: what a Flower client does with a message ---------------------
_MODELS: dict[tuple, tuple[Retriever, Generator]] = {}


def load_models(s: Settings, cache_key: object = None) -> tuple[Retriever, Generator]:
    """Build (or reuse, within one process and run) the retriever and generator.

    Reuse is safe because every message overwrites the trainable state it carries.
    """
    key = (
        cache_key,
        s.retriever_model,
        s.context_model,
        s.generator_model,
        s.device,
        s.dtype,
        s.lora_r,
        s.lora_alpha,
        s.lora_dropout,
        s.lora_targets,
        s.retriever_lora_r,
        s.max_context_chars,
        s.autocast_bf16,
        s.gradient_checkpointing,
        s.lora_aggregation,
    )
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = (build_retriever(s), build_generator(s))
    return _MODELS[key]


def trainable_states(
    mode: str, retriever: Retriever, generator: Generator
) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors a mode trains: only these travel between server and clients."""
    states: dict[str, dict[str, torch.Tensor]] = {}
    if mode in ("generator", "both"):
        states["generator"] = generator.trainable_state()
    if mode in ("retriever", "both"):
        states["retriever"] = retriever.trainable_state()
    return states


def base_fingerprint(retriever: Retriever, generator: Generator) -> str:
    """One hash of both base models: what the server and every site must share."""
    return f"{generator.base_fingerprint[:16]}-{retriever.base_fingerprint[:16]}"


def apply_states(
    states: dict[str, dict[str, torch.Tensor]], retriever: Retriever, generator: Generator
) -> None:
    if "generator" in states:
        generator.load_trainable_state(states["generator"])
    if "retriever" in states:
        retriever.load_trainable_state(states["retriever"])
