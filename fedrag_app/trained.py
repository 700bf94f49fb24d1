"""A finished run read back: where its fine-tuned models are, and the settings it ran with.

Two kinds of result hold the same models: a federated run folder (``outputs/run-*``, models in
``final/``, settings in ``config.json``) and a centralized ``fedrag train --out`` folder (models
at the top, settings in ``metrics.json``). Export, report and the LangChain / LlamaIndex bridges
all start here, so they agree on what "the trained system" of a run is.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrag_app.config import Settings, settings_from

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedRun:
    run: Path  # the folder the user named
    models: Path  # where adapter/ and retriever/ are
    kind: str  # "federated" | "centralized"
    settings: Settings

    @property
    def adapter(self) -> Path | None:
        folder = self.models / "adapter"
        return folder if (folder / "adapter_config.json").is_file() else None

    @property
    def query_encoder(self) -> Path | None:
        """The fine-tuned query encoder; None when the run trained the generator only."""
        folder = self.models / "retriever"
        return folder if (folder / "modules.json").is_file() else None

    def history(self) -> list[dict]:
        file = self.run / "history.json"
        return json.loads(file.read_text()) if file.is_file() else []


def open_run(path: str | Path, **overrides: Any) -> TrainedRun:
    """Read a run or a train output; ``overrides`` (Settings fields, e.g. ``device``) win over
    its recorded settings. Fails with the folder and what it lacks when it holds no result."""
    run = Path(path).expanduser().resolve()
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    if run.name == "final" and (run.parent / "history.json").is_file():
        run = run.parent  # the user named final/ itself
    if (run / "final").is_dir():
        kind, models, config = "federated", run / "final", _read(run / "config.json", None)
    elif (run / "adapter").is_dir():
        kind, models = "centralized", run
        config = (_read(run / "metrics.json", {}) or {}).get("config")
    else:
        raise FileNotFoundError(
            f"{run}: neither a federated run (final/ is written after the last round) nor a "
            "`fedrag train --centralized --out` folder (adapter/)"
        )
    if config is None:
        log.warning("%s records no settings (an older run): using the defaults", run)
    result = TrainedRun(run, models, kind, settings_from(config or {}, **overrides))
    if result.adapter is None:
        raise FileNotFoundError(f"{models / 'adapter'}: no LoRA adapter (adapter_config.json)")
    return result


def _read(file: Path, default: Any) -> Any:
    if not file.is_file():
        return default
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None


def build_models(run: TrainedRun):
    """The run's retriever (fine-tuned query encoder, base context encoder) and generator, built
    fresh (task.load_models is the ClientApp's cached twin, keyed on base settings)."""
    from fedrag_app.task import build_generator, build_retriever

    return build_retriever(run.settings, run.query_encoder), build_generator(
        run.settings, run.adapter
    )


def merged_generator(generator) -> Any:
    """The generator's LoRA folded into its weights: a plain transformers model (no PEFT).

    The Generator's PEFT wrapper is consumed; keep using its tokenizer and prompt only.
    """
    return generator.model.merge_and_unload()
