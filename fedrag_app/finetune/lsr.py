"""LSR (LM-supervised retrieval, RA-DIT / REPLUG) for the query encoder.

p_R = softmax(sim(q, c) / gamma) over the top-k candidates, where q comes from the trainable
query encoder WITH gradients and c are the store's frozen context embeddings; p_LM =
softmax(s(c) / tau) from the generator without gradients, where s(c) is log p_gen(answer | c,
question) summed over the answer's tokens (``lsr-target = sum``: at tau = 1, p_LM is the
likelihood normalised over the candidates, as in REPLUG) or averaged per token (``mean``: Atlas's
perplexity distillation). Every candidate of a question scores the same answer, so ``mean`` is
``sum`` at tau times the answer's length: the same ranking, a flatter target. Measured
(README, "LSR on two data sets"): the LM's top choice holds the answer in 93-100% of the
questions where the top-k holds it, and the flatter target cost recall on WordNet;
loss = KL(p_LM || p_R). Gradients reach the query encoder only; the store is never re-indexed.
"""

from __future__ import annotations

import numpy as np
import torch

from fedrag_app.data import QAPair
from fedrag_app.rag.generator import ExampleTooLong, Generator
from fedrag_app.rag.retriever import Retriever
from fedrag_app.rag.store import KnowledgeStore


class LsrLoss:
    def __init__(
        self,
        retriever: Retriever,
        generator: Generator,
        stores: list[KnowledgeStore],
        k: int,
        gamma: float,
        tau: float,
        max_len: int = 640,
        target: str = "sum",
    ) -> None:
        self.retriever = retriever
        self.generator = generator
        self.stores = stores
        self.k, self.gamma, self.tau, self.max_len = k, gamma, tau, max_len
        self.per_token = target == "mean"
        self.skipped = 0  # pairs left out because a candidate did not fit max-seq-len

    def __call__(self, batch: list[tuple[int, QAPair]]) -> tuple[torch.Tensor, int]:
        """``batch`` holds (store index, pair): pooled training spans several clients' stores."""
        self.retriever.query_encoder.train()
        questions = [p.question for _, p in batch]
        q, tokens = self.retriever.query_embeddings(questions)  # (B, D), differentiable
        q_np = q.detach().float().cpu().numpy()
        contexts, encoded, rows = [], [], []
        candidates: dict[int, list] = {}  # row -> hits; ONE batched search per store
        for store_idx in sorted({i for i, _ in batch}):
            mine = [row for row, (i, _) in enumerate(batch) if i == store_idx]
            found = self.stores[store_idx].search(q_np[mine], self.k, with_vectors=True)
            candidates.update(zip(mine, found, strict=True))
        for row, (store_idx, pair) in enumerate(batch):
            hits = candidates[row]
            if len(hits) < self.k:
                raise RuntimeError(
                    f"store {self.stores[store_idx].name} holds fewer than {self.k} chunks"
                )
            try:
                enc = [
                    self.generator.encode_example(
                        pair.question, [h.text], pair.answers[0], self.max_len
                    )
                    for h in hits
                ]
            except ExampleTooLong:
                self.skipped += 1
                continue
            rows.append(row)
            contexts.append(np.stack([h.vector for h in hits]))
            encoded += enc
        if not rows:  # nothing in this batch fits: a zero loss that still reaches the encoder
            return (q * 0).sum(), tokens
        c = torch.from_numpy(np.stack(contexts)).to(q.device)  # (B, K, D), frozen
        q = q[rows]
        log_p_r = torch.log_softmax(torch.einsum("bd,bkd->bk", q.float(), c) / self.gamma, dim=-1)
        lm = self.generator.encoded_logprobs(encoded, mean=self.per_token)
        lm = lm.view(len(rows), self.k)
        log_p_lm = torch.log_softmax(lm.to(q.device) / self.tau, dim=-1)
        loss = torch.nn.functional.kl_div(log_p_r, log_p_lm, reduction="batchmean", log_target=True)
        return loss, tokens
