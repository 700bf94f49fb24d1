"""Causal LM generator with PEFT LoRA adapters, chat-template prompts and answer scoring."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
)

from fedrag_app.rag.device import pick_device, pick_dtype
from fedrag_app.rag.lora import share_frozen_a
from fedrag_app.rag.models import resolve_model, weights_fingerprint
from fedrag_app.rag.state import load_into

SYSTEM_PROMPT = (
    "Answer the question using the context. Reply with the short answer only: "
    "a term, a name, an expansion or a year."
)
IGNORE = -100
MIN_SHARED_PREFIX = 8  # below this, a separate pass for the shared tokens costs more


def first_line(text: str) -> str:
    """The answer in a generation: its first non-empty line."""
    return text.strip().split("\n", 1)[0].strip()


class _FirstLineDone(StoppingCriteria):
    """Per sequence: done once the text after the prompt holds a complete non-empty line."""

    def __init__(self, tokenizer, prompt_width: int) -> None:
        self.tokenizer, self.prompt_width = tokenizer, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_width :], skip_special_tokens=True
        )
        return torch.tensor(["\n" in t.lstrip() for t in texts], device=input_ids.device)


class ExampleTooLong(ValueError):
    """An example that cannot fit ``max-seq-len`` even with its contexts cut short."""

    def __init__(self, length: int, max_len: int) -> None:
        super().__init__(f"an example of {length} tokens does not fit max-seq-len {max_len}")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "v_proj")


class Generator:
    def __init__(
        self,
        model_ref: str,
        device: str = "cpu",
        dtype: str = "float32",
        lora: LoraSettings | None = None,
        adapter: str | Path | None = None,
        max_context_chars: int = 700,
        autocast_bf16: bool = False,
        gradient_checkpointing: bool = False,
        freeze_lora_a: bool = False,
    ) -> None:
        path = resolve_model(model_ref)
        self.autocast_bf16 = autocast_bf16  # answers generated under bf16 autocast too
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype))
        if adapter:
            self.model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
        else:
            lora = lora or LoraSettings()
            config = LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(lora.targets),
                task_type="CAUSAL_LM",
            )
            self.model = get_peft_model(base, config)
        if freeze_lora_a:  # FFA-LoRA: a loaded adapter keeps its (shared) A
            share_frozen_a(self.model, reinit=not adapter)
        self.model.to(self.device)
        if gradient_checkpointing:  # training only: in eval mode nothing is recomputed
            self.model.gradient_checkpointing_enable({"use_reentrant": False})
        self.max_context_chars = max_context_chars
        self.contexts_cut = 0  # contexts longer than max_context_chars, cut in prompts so far
        self.model_path = path
        base = getattr(self.model, "get_base_model", lambda: self.model)()
        # checkpointed layers recompute without a cache; sliding windows and conv/recurrent
        # layers would see the padding between the shared prefix and a row's own tokens
        self.share_prefix = not gradient_checkpointing and plain_attention_cache(base.config)
        # transformers 5 renamed forward's past_key_values to cache
        self._cache_kwarg = (
            "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        )
        # the frozen base weights, hashed once: the server and every site must share them
        # with FFA the frozen A is part of what every party must share
        self.base_fingerprint = weights_fingerprint(
            dict(self.model.named_parameters()), skip="lora_B" if freeze_lora_a else "lora_"
        )

    # ---- prompts -------------------------------------------------------------------------
    def prompt(self, question: str, contexts: list[str], max_chars: int | None = None) -> str:
        limit = max_chars or self.max_context_chars
        if limit == self.max_context_chars:  # not the shorter retries of encode_example
            self.contexts_cut += sum(len(c) > limit for c in contexts)
        ctx = "\n".join(f"[{i + 1}] {c[:limit]}" for i, c in enumerate(contexts))
        user = f"Context:\n{ctx}\n\nQuestion: {question}" if contexts else f"Question: {question}"
        if self.tokenizer.chat_template:
            messages = [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": user},
            ]
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        return f"{SYSTEM_PROMPT}\n\n{user}\nAnswer:"

    def encode_example(
        self, question: str, contexts: list[str], answer: str, max_len: int = 640
    ) -> tuple[list[int], list[int]]:
        """Token ids and labels; labels are IGNORE on every prompt and context token.

        Too long a prompt gets shorter contexts (never a cut template or answer).
        """
        text = answer.strip() if self.tokenizer.chat_template else " " + answer.strip()
        answer_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        answer_ids = answer_ids + [self.tokenizer.eos_token_id]
        limit = self.max_context_chars
        while True:
            prompt = self.prompt(question, contexts, max_chars=limit)
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if len(prompt_ids) + len(answer_ids) <= max_len or not contexts or limit < 40:
                break
            limit = int(limit * 0.75)
        if len(prompt_ids) + len(answer_ids) > max_len:
            # no text in the message: it may reach a log that leaves the site
            raise ExampleTooLong(len(prompt_ids) + len(answer_ids), max_len)
        return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids

    # ---- inference -----------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self, prompts: list[str], max_new_tokens: int = 24, batch_size: int = 8
    ) -> list[str]:
        """Greedy answers, one line each, in the order of ``prompts``.

        Prompts are grouped by token length (left padding wastes little) and each sequence
        stops at EOS or once its first non-empty line is complete: an answer is one line, so
        nothing is generated past it. The KV cache stays on (transformers' default).
        """
        self.model.eval()
        self.tokenizer.padding_side = "left"
        encoded = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        out = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = self.tokenizer.pad(
                {"input_ids": [encoded[i] for i in rows]}, return_tensors="pt"
            ).to(self.device)
            width = batch["input_ids"].shape[1]
            autocast = (
                torch.autocast(self.device.type, dtype=torch.bfloat16)
                if self.autocast_bf16
                else contextlib.nullcontext()
            )
            with autocast:
                generated = self.model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                    stopping_criteria=StoppingCriteriaList([_FirstLineDone(self.tokenizer, width)]),
                )
            texts = self.tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            for i, text in zip(rows, texts, strict=True):
                out[i] = first_line(text)
        return out

    def answer_token_logprobs(
        self, encoded: list[tuple[list[int], list[int]]], share_prefix: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log p of the answer tokens, (B, T) with a (B, T) validity mask.

        Sequences are LEFT-padded so every answer ends at the last position; the LM head and
        the softmax then run only on the last T+1 positions (``logits_to_keep``), not on the
        whole prompt and context: most of the vocabulary projection is skipped.

        Every prompt opens with the same template (41 of the demo's ~141 tokens), so the
        tokens the whole batch shares run once, batch 1, and their keys and values are
        repeated for each row; the gradient flows back through them. Same log-probs (to
        float rounding); LoRA dropout draws one mask for the shared tokens. Off for DP-SGD
        (``share_prefix=False``: Opacus needs every activation per example), with gradient
        checkpointing and for models whose cache is not plain full attention.
        """
        shared = self.shared_prefix(encoded) if share_prefix else 0
        cache = None
        if shared:
            first = torch.tensor([encoded[0][0][:shared]], device=self.device)
            out = self.model(input_ids=first, use_cache=True, logits_to_keep=1)
            cache = out.cache if "cache" in out else out.past_key_values  # transformers 5 / 4
            cache.batch_repeat_interleave(len(encoded))
            encoded = [(x[shared:], y[shared:]) for x, y in encoded]
        ids, labels, mask = pad_batch(encoded, self.tokenizer.pad_token_id, left=True)
        ids, labels, mask = ids.to(self.device), labels.to(self.device), mask.to(self.device)
        keep = int((labels != IGNORE).sum(dim=1).max()) + 1
        positions = shared + (mask.cumsum(dim=1) - 1).clamp(min=0)
        if shared:  # the shared tokens sit before each row's left padding
            mask = torch.cat([mask.new_ones(len(encoded), shared), mask], dim=1)
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=cache is not None,
            logits_to_keep=keep,
            **({self._cache_kwarg: cache} if cache is not None else {}),
        ).logits[:, :-1]
        cache = None  # the full keys and values: not needed past the forward
        target = labels[:, -(keep - 1) :]
        valid = target != IGNORE
        logp = torch.log_softmax(logits.float(), dim=-1)
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return picked * valid, valid

    def shared_prefix(self, encoded: list[tuple[list[int], list[int]]]) -> int:
        """The leading tokens ``answer_token_logprobs`` runs once for the whole batch."""
        shared = shared_prefix_length(encoded) if self.share_prefix else 0
        return shared if shared >= MIN_SHARED_PREFIX else 0

    def fits(self, question: str, contexts: list[str], answer: str, max_len: int) -> bool:
        try:
            self.encode_example(question, contexts, answer, max_len)
        except ExampleTooLong:
            return False
        return True

    @torch.no_grad()
    def answer_logprobs(
        self, examples: list[tuple[str, list[str], str]], batch_size: int = 8, max_len: int = 640
    ) -> torch.Tensor:
        """log p(answer | contexts, question) summed over answer tokens, for each example."""
        return self.encoded_logprobs(
            [self.encode_example(q, c, a, max_len) for q, c, a in examples], batch_size
        )

    @torch.no_grad()
    def encoded_logprobs(
        self, encoded: list[tuple[list[int], list[int]]], batch_size: int = 8, mean: bool = False
    ) -> torch.Tensor:
        """log p(answer) summed over its tokens, or (``mean``) averaged per answer token.

        Scored in batches of similar lengths (candidates of one question differ most in their
        chunk's length), so little of the work is padding; returned in the input's order."""
        self.model.eval()
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        scores = torch.empty(len(encoded))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            token_logp, valid = self.answer_token_logprobs([encoded[i] for i in rows])
            total = token_logp.sum(dim=-1)
            scores[rows] = (total / valid.sum(dim=-1).clamp(min=1) if mean else total).float().cpu()
        return scores

    # ---- trainable state -----------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {k: p for k, p in self.model.named_parameters() if p.requires_grad}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.trainable_parameters().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        load_into(self.trainable_parameters(), state, "generator")

    def save_adapter(self, folder: str | Path) -> None:
        """A PEFT adapter folder, loadable with ``PeftModel.from_pretrained``."""
        self.model.save_pretrained(str(folder))


def plain_attention_cache(config: object) -> bool:
    """Whether every layer caches full-attention keys and values and nothing else: only then
    does [shared prefix, padding, row] attend as [row] does."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        layers = DynamicCache(config=config).layers
    except (ImportError, TypeError, AttributeError, ValueError):  # transformers 4: no layers
        return not getattr(config, "sliding_window", None) and not getattr(
            config, "layer_types", None
        )
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def shared_prefix_length(encoded: list[tuple[list[int], list[int]]]) -> int:
    """Tokens every sequence of the batch starts with, stopping before each one's last prompt
    token (whose logits predict the first answer token); 0 for a single sequence."""
    if len(encoded) < 2:
        return 0
    first = encoded[0][0]
    n = min(len(x) for x, _ in encoded)
    for x, y in encoded:
        n = min(n, next((i for i, v in enumerate(y) if v != IGNORE), len(y)) - 1)
        n = next((i for i in range(n) if x[i] != first[i]), n)
    return max(n, 0)


def pad_batch(
    encoded: list[tuple[list[int], list[int]]], pad_id: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad to the longest example in THIS batch (dynamic padding), on the right or left."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (x, y) in enumerate(encoded):
        span = slice(width - len(x), width) if left else slice(0, len(x))
        ids[i, span] = torch.tensor(x)
        labels[i, span] = torch.tensor(y)
        mask[i, span] = 1
    return ids, labels, mask
