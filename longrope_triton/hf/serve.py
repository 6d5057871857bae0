"""``longrope-triton serve MODEL [transformers serve options]``: transformers' own OpenAI-compatible
server, with the model patched where it is loaded.

``transformers serve`` has no plugin hook, but it looks its model loader up by name in
``transformers.cli.serving.model_manager`` when the command starts: ``ModelLoader`` (transformers
5.2x), which it pickles into a spawned worker process that loads the model there, or
``ModelManager`` (5.5 to 5.17), which loads it in the server process. :func:`serve` puts
:class:`LongRoPEModelLoader` under that name, a subclass whose ``_load_model`` patches the model it
loads (a spawned worker unpickles the class by its import path, this module, and so patches in its
own process), then runs transformers' own command line. Everything else (endpoints, chat templates,
streaming, ``--continuous-batching`` and its ``--cb-*`` options) is transformers'.

With ``--continuous-batching``, the patched model's continuous batching runs each request in its own
regime and refuses a request whose prompt plus max_new_tokens exceeds max_position_embeddings
(HTTP 400); without it, requests run one at a time through the patched ``generate()``, which refuses
the same requests before generating.

This module imports transformers' serving code: only the serve command (and the worker it spawns)
imports it.
"""

from __future__ import annotations

import functools
import logging
import os

from transformers.cli.serving import model_manager as _model_manager

from .continuous import admission_error
from .patch import _STATE_ATTR, patch_model

logger = logging.getLogger(__name__)

# The class transformers serve instantiates to load models: its name, and the class itself.
_LOADER_NAME = "ModelLoader" if hasattr(_model_manager, "ModelLoader") else "ModelManager"
_TransformersLoader = getattr(_model_manager, _LOADER_NAME)

# What transformers' is_serve_available() checks, as pip names them (the `serve` extra of setup.py).
SERVE_PACKAGES = ("fastapi", "uvicorn", "openai", "pydantic")


class LongRoPEModelLoader(_TransformersLoader):
    """transformers serve's model loader, patching every model it loads (see the module docstring)."""

    def _load_model(self, *args, **kwargs):
        return prepare_for_serving(super()._load_model(*args, **kwargs))


def prepare_for_serving(model):
    """Patch a model loaded for serving, and make its generate() refuse a request whose prompt plus
    max_new_tokens exceeds max_position_embeddings before it runs (as continuous batching does):
    otherwise it would fail only when it reaches that position, after generating all the way there."""
    patch_model(model)
    cfg = getattr(model, _STATE_ATTR).cfg
    generate = model.generate

    @functools.wraps(generate)
    def checked_generate(*args, **kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        config = kwargs.get("generation_config") or model.generation_config
        max_new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
        if input_ids is not None:
            error = admission_error(cfg, input_ids.shape[-1], max_new_tokens)
            if error is not None:
                raise ValueError(error)
        return generate(*args, **kwargs)

    model.generate = checked_generate
    logger.warning("longrope_triton: serving %s patched (per-request LongRoPE regimes) in process %d",
                   type(model).__name__, os.getpid())
    return model


def missing_packages() -> list:
    """The serving packages that are not installed (pip install 'longrope_triton[serve]')."""
    import importlib.util

    return [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]


def serve(model: str, options: list) -> None:
    """Run ``transformers serve MODEL *options`` with :class:`LongRoPEModelLoader` loading the model.
    Returns when the server stops (transformers' command line may exit the process itself)."""
    setattr(_model_manager, _LOADER_NAME, LongRoPEModelLoader)
    from transformers.cli.transformers import app

    app(["serve", model, *options])
