"""Dual-encoder retriever: a trainable query encoder and a frozen context encoder.

Only the query encoder is ever trained (as in RA-DIT): the context encoder made the store's
embeddings, so keeping it frozen means a store never needs re-indexing after fine-tuning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from fedrag_app.rag.device import pick_device
from fedrag_app.rag.lora import share_frozen_a
from fedrag_app.rag.models import resolve_model, weights_fingerprint
from fedrag_app.rag.state import load_into


class Retriever:
    def __init__(
        self,
        query_model: str,
        context_model: str = "",
        device: str = "cpu",
        lora_r: int = 0,
        freeze_lora_a: bool = False,
    ) -> None:
        self.device = pick_device(device)
        self.query_ref = query_model
        self.model_path = resolve_model(query_model)
        self.context_ref = context_model or query_model
        self.query_encoder = SentenceTransformer(self.model_path, device=str(self.device))
        self.context_encoder = SentenceTransformer(
            resolve_model(self.context_ref), device=str(self.device)
        )
        self.context_encoder.eval()
        self.context_encoder.requires_grad_(False)
        dims = [_dim(self.query_encoder), _dim(self.context_encoder)]
        if dims[0] != dims[1]:
            raise ValueError(
                f"config keys 'retriever-model' ({query_model}, dim {dims[0]}) and "
                f"'context-model' ({self.context_ref}, dim {dims[1]}): the query and context "
                "encoders must embed into the same dimension"
            )
        self.lora_r = lora_r
        if lora_r > 0:
            from peft import LoraConfig, get_peft_model

            module, attr = _transformer(self.query_encoder)
            setattr(
                module,
                attr,
                get_peft_model(
                    getattr(module, attr),
                    LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=["query", "value"]),
                ),
            )
            if freeze_lora_a:  # FFA-LoRA (rag/lora.py)
                share_frozen_a(self.query_encoder)
        # hashed before any training: the base both encoders start from
        self.base_fingerprint = weights_fingerprint(
            {
                **{f"q.{k}": p for k, p in self.query_encoder.named_parameters()},
                **{f"c.{k}": p for k, p in self.context_encoder.named_parameters()},
            },
            skip="lora_B" if freeze_lora_a and lora_r > 0 else "lora_",
        )

    @property
    def dim(self) -> int:
        return _dim(self.context_encoder)

    @property
    def tokenizer(self):
        """The context encoder's tokenizer: chunks are measured in its tokens."""
        return self.context_encoder.tokenizer

    def encode_queries(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        self.query_encoder.eval()
        return self.query_encoder.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
        )

    def encode_contexts(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self.context_encoder.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
        )

    def query_embeddings(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        """Normalized query embeddings WITH gradients to the query encoder (for LSR), and the
        number of tokens encoded."""
        encoder = self.query_encoder
        features = (encoder.preprocess if hasattr(encoder, "preprocess") else encoder.tokenize)(
            texts
        )
        features = {
            k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()
        }
        emb = self.query_encoder(features)["sentence_embedding"]
        return torch.nn.functional.normalize(emb, dim=-1), int(features["attention_mask"].sum())

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        params = dict(self.query_encoder.named_parameters())
        if self.lora_r > 0:
            return {k: p for k, p in params.items() if "lora_" in k and p.requires_grad}
        return params

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.trainable_parameters().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        load_into(self.trainable_parameters(), state, "retriever")

    def save(self, folder: str | Path) -> None:
        """A plain sentence-transformers folder (LoRA merged), loadable with SentenceTransformer."""
        if self.lora_r > 0:
            import copy

            merged = copy.deepcopy(self.query_encoder)
            module, attr = _transformer(merged)
            setattr(module, attr, getattr(module, attr).merge_and_unload())
            merged.save(str(folder))
        else:
            self.query_encoder.save(str(folder))


def _transformer(encoder: SentenceTransformer) -> tuple[torch.nn.Module, str]:
    """The module holding the Hugging Face model, and its attribute name: sentence-transformers
    5 keeps it in ``model`` (``auto_model`` became a read-only alias), older releases in
    ``auto_model``."""
    module = encoder[0]
    if isinstance(getattr(type(module), "auto_model", None), property):
        return module, "model"
    return module, "auto_model"


def _dim(encoder: SentenceTransformer) -> int:
    get = (
        getattr(encoder, "get_embedding_dimension", None)
        or encoder.get_sentence_embedding_dimension
    )
    return int(get())
