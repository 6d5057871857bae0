"""Loading what the commands work on: a model by name or directory, and text by name or file.

Model specs: ``smollm2`` (SmolLM2-135M-Instruct, offline, see :mod:`longrope_triton.models`) or a
Hugging Face model directory (``config.json`` + weights; loaded with ``local_files_only``).

Text specs: ``austen:search`` (the search novels), ``austen:heldout`` (held-out novels),
``austen:<novel>[,<novel>...]`` (e.g. ``austen:emma``), or a path to a plain-text or ``.jsonl``
file (see :func:`longrope_triton.data.load_text`).
"""

from __future__ import annotations

import pathlib

import torch

from .. import data
from ..config import LongRoPEConfig


def load_model(spec: str, dtype=torch.float32, device=None):
    """(model, tokenizer) for a model spec, in eval mode, on ``device`` (default: where it loads,
    the CPU); FileNotFoundError if it is not there."""
    model, tokenizer = _load(spec, dtype)
    return (model if device is None else model.to(device)), tokenizer


def _load(spec: str, dtype):
    if spec == "smollm2":
        from ..models import load_smollm2
        return load_smollm2(dtype=dtype)
    path = pathlib.Path(spec)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model {spec!r} not found: give 'smollm2' or a Hugging Face model directory "
                                "holding config.json")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return model.eval(), tokenizer


def load_texts(spec: str) -> dict:
    """{name: text} for a text spec (see the module docstring)."""
    if spec.startswith("austen:"):
        which = spec.split(":", 1)[1]
        names = {"search": data.SEARCH_NOVELS, "heldout": data.HELDOUT_NOVELS}.get(which) or tuple(which.split(","))
        novels = data.austen_novels()
        unknown = [n for n in names if n not in novels]
        if unknown:
            raise ValueError(f"unknown novel(s) {', '.join(unknown)} (available: {', '.join(sorted(novels))})")
        return {n: novels[n] for n in names}
    path = pathlib.Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"text {spec!r} not found: give a text/.jsonl file or austen:search, "
                                "austen:heldout, austen:<novel>")
    docs = data.load_text(path)
    return {f"{path.name}[{i}]": t for i, t in enumerate(docs)} if len(docs) > 1 else {path.name: docs[0]}


def load_documents(spec: str, tokenizer) -> tuple:
    """(names, token-id tensors) for a text spec."""
    from .perplexity import tokenize_documents
    texts = load_texts(spec)
    return list(texts), tokenize_documents(tokenizer, list(texts.values()))


def model_base_config(model) -> LongRoPEConfig:
    """The model's own (unextended) RoPE as a LongRoPEConfig."""
    return LongRoPEConfig.from_hf(model.config)
