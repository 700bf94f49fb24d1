"""`fedrag export`: a run's fine-tuned system in plain formats that serving stacks load.

OUT/generator  the causal LM with the LoRA merged (transformers; vLLM, TGI, llama.cpp's
               converter read it; no PEFT needed)
OUT/retriever  the query encoder (sentence-transformers)
OUT/context-encoder.json  the frozen context encoder's id and weights fingerprint: the stores
               it indexed are the ones this query encoder matches
OUT/README.md  a Hugging Face model card: bases, sites, rounds, config, final metrics, privacy
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from fedrag_app.atomic import atomic_text, fsync_dir, fsync_tree
from fedrag_app.rag.generator import SYSTEM_PROMPT
from fedrag_app.rag.models import weights_fingerprint
from fedrag_app.trained import TrainedRun, build_models, merged_generator, open_run

MARKER = "fedrag-export.json"  # marks a folder this command wrote, so --overwrite may replace it


def export(run_folder: str | Path, out: str | Path, overwrite: bool = False, **overrides) -> Path:
    """Write the export aside and rename it in: OUT is complete or untouched."""
    out = Path(out).expanduser().resolve()
    _check_out(out, overwrite)
    run = open_run(run_folder, **overrides)
    retriever, generator = build_models(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        model = merged_generator(generator)
        model.save_pretrained(tmp / "generator")
        generator.tokenizer.save_pretrained(tmp / "generator")
        retriever.save(tmp / "retriever")  # LoRA, if any, merged: a plain folder
        context = {
            "model": retriever.context_ref,
            "weights-fingerprint": weights_fingerprint(
                dict(retriever.context_encoder.named_parameters())
            ),
            "dim": retriever.dim,
            "chunk-tokens": run.settings.chunk_tokens,
            "chunk-overlap": run.settings.chunk_overlap,
            "max-context-chars": generator.max_context_chars,
        }
        atomic_text(tmp / "context-encoder.json", json.dumps(context, indent=2) + "\n")
        atomic_text(tmp / "README.md", model_card(run, context))
        atomic_text(tmp / MARKER, json.dumps({"run": str(run.run), "kind": run.kind}) + "\n")
        fsync_tree(tmp)
        if out.exists():
            _check_out(out, overwrite)  # still ours? (checked again after the long work)
            shutil.rmtree(out)
        tmp.rename(out)
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not (out / MARKER).is_file():
        raise FileExistsError(f"--out {out}: not empty and not a previous export; refusing")
    if not overwrite:
        raise FileExistsError(f"--out {out}: holds a previous export; pass --overwrite")


def final_metrics(run: TrainedRun) -> dict[str, dict]:
    """Per-site and aggregated metrics of the last evaluated round (federated), or the
    centralized run's ``after``."""
    if run.kind == "centralized":
        after = json.loads((run.run / "metrics.json").read_text()).get("after") or {}
        return {**after.get("clients", {}), "overall": after.get("overall", {})}
    rows = [r for r in run.history() if r["stage"] == "evaluate" and "em" in r]
    if not rows:
        return {}
    last = max(r["round"] for r in rows)
    keep = ("em", "f1", "recall_at_k", "mrr", "n")
    return {
        ("overall" if r["client"] == "aggregated" else f"site {r['client']}"): {
            k: r[k] for k in keep if k in r
        }
        for r in rows
        if r["round"] == last
    }


def sites(run: TrainedRun) -> list[str]:
    """Sites by name only: client folder names (centralized), node ids (federated: sites send
    no names)."""
    if run.kind == "centralized":
        return list(json.loads((run.run / "metrics.json").read_text()).get("clients", []))
    nodes = {str(r["client"]) for r in run.history() if r["stage"] == "train"}
    return sorted(nodes - {"aggregated"})


def privacy_settings(s) -> str:
    if s.dp == "record":
        noise = (
            f"noise multiplier {s.dp_noise_multiplier:g}"
            if s.dp_noise_multiplier
            else f"target epsilon {s.dp_epsilon:g}"
        )
        return f"record-level DP-SGD at each site (Opacus), {noise}, delta {s.dp_delta:g}, clip {s.dp_clip_norm:g}"
    if s.dp == "client":
        return f"client-level DP (Flower server-side fixed clipping), clip {s.dp_clip_norm:g}"
    return "no differential privacy"


def model_card(run: TrainedRun, context: dict) -> str:
    s = run.settings
    rounds = max((r["round"] for r in run.history()), default=0)
    metrics = final_metrics(run)
    table = ["| site | n | EM | F1 | recall@k | MRR |", "|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        table.append(
            f"| {name} | {m.get('n', '')} | {m.get('em', 0):.1f} | {m.get('f1', 0):.1f} | "
            f"{m.get('recall_at_k', 0):.1f} | {m.get('mrr', 0):.3f} |"
        )
    config = "\n".join(f"{k} = {json.dumps(v)}" for k, v in sorted(s.to_config().items()))
    how = (
        f"federated: {rounds} rounds of {s.strategy}, {s.local_steps} local steps per round"
        if run.kind == "federated"
        else f"centralized: {s.local_steps} steps on the pooled data"
    )
    return f"""---
base_model: {s.generator_model}
library_name: transformers
pipeline_tag: text-generation
tags:
- fedrag-app
- retrieval-augmented-generation
- federated-learning
- lora
---

# Fine-tuned RAG system (fedrag-app)

Exported by `fedrag export` from `{run.run.name}` ({run.kind} run).

- **Generator**: `{s.generator_model}` with a LoRA adapter (r={s.lora_r}, alpha={s.lora_alpha},
  targets {s.lora_targets}) merged into its weights: `generator/`, a plain transformers folder.
- **Query encoder**: `retriever/` (sentence-transformers), fine-tuned from `{s.retriever_model}`
  when the run trained the retriever (mode = {s.mode}).
- **Context encoder** (frozen; the stores it indexed are the ones this query encoder matches):
  `{context["model"]}`, weights fingerprint `{context["weights-fingerprint"]}`, chunks of
  {context["chunk-tokens"]} tokens with {context["chunk-overlap"]} overlap.
- **Training**: {how}; mode {s.mode}; generator lr {s.gen_lr:g}, retriever lr {s.ret_lr:g}.
- **Data sites** (names only; no data left them): {", ".join(sites(run)) or "(none recorded)"}.
- **Privacy**: {privacy_settings(s)}.

## Final metrics (last evaluated round)

{chr(10).join(table) if metrics else "No evaluation was recorded."}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from sentence_transformers import SentenceTransformer

generator = AutoModelForCausalLM.from_pretrained("generator")
tokenizer = AutoTokenizer.from_pretrained("generator")
query_encoder = SentenceTransformer("retriever")
```

Prompt it as it was fine-tuned (`fedrag_app.rag.generator.Generator.prompt`): the tokenizer's
chat template with this system message

> {SYSTEM_PROMPT}

and a user message of the top-{s.top_k} retrieved chunks, each cut to {context["max-context-chars"]}
characters, then the question:

```text
Context:
[1] first chunk
[2] second chunk

Question: the question
```

The run evaluated greedy answers of up to {s.max_new_tokens} new tokens, read to the end of
their first non-empty line (an answer is one line).

## Configuration

```toml
{config}
```
"""
