"""Offline text data: the Jane Austen novels and user-supplied text files.

Only the standard library is used, so the data layer works without torch.

The novels come from Debian's ``r-cran-janeaustenr`` package (installed by
``scripts/install_assets.sh``) as an R lazy-load database:

* ``Rdata.rdx`` -- gzip of an R serialization of the index, a named list
  ``(variables, references, compressed)`` where ``variables`` maps each object
  name to an integer vector ``(offset, length)`` into ``Rdata.rdb``.
* ``Rdata.rdb`` -- per object: a 4-byte big-endian uncompressed length, then a
  zlib stream holding an R serialization of a character vector (one element
  per line of the novel, ``NA`` for missing lines).

The serialization format is R's XDR (big-endian) format, versions 2 and 3;
``_RDeserializer`` reads the subset these two files use.
"""

import gzip
import json
import os
import pathlib
import struct
import zlib

#: Novels used by the RoPE factor search: the two shortest (~105K tokens each
#: with the SmolLM2 tokenizer), which keeps the search cheap and still gives
#: many disjoint windows far longer than the model's 8K trained context.
SEARCH_NOVELS = ("persuasion", "northangerabbey")

#: Novels held out from the search and used only for evaluation.
HELDOUT_NOVELS = ("emma", "mansfieldpark", "prideprejudice", "sensesensibility")

_INSTALL_HINT = "run `bash scripts/install_assets.sh` to install the offline assets"

# R SEXP type codes (see R's serialize.c) for the types the novels use.
_NILVALUE_SXP = 254
_REFSXP = 255
_SYMSXP = 1
_LISTSXP = 2
_CHARSXP = 9
_LGLSXP = 10
_INTSXP = 13
_STRSXP = 16
_VECSXP = 19

_NA_INTEGER = -(2**31)  # R's NA for integer and logical vectors
_NA_STRING_LENGTH = -1  # a CHARSXP of length 0xFFFFFFFF is NA_character_
_LATIN1_MASK = 1 << 2  # CHARSXP encoding bits in the flags' "levels" field
_HAS_ATTR = 1 << 9
_HAS_TAG = 1 << 10


def data_dir() -> pathlib.Path:
    """Directory holding the offline data: $LONGROPE_TRITON_DATA or ~/.cache/longrope_triton."""
    default = pathlib.Path.home() / ".cache" / "longrope_triton"
    return pathlib.Path(os.environ.get("LONGROPE_TRITON_DATA", default))


class _RDeserializer:
    """Reader of R's XDR serialization format (the subset lazy-load files use).

    Values map to Python as: NULL -> None, character/integer/logical vectors
    and lists -> lists (NA -> None), symbols -> str, pairlists -> dict of
    tag -> value. A vector with a ``names`` attribute becomes a dict.
    """

    def __init__(self, payload: bytes):
        self._buf = payload
        self._pos = 0
        self._refs = []  # symbols, in read order, for back-references (REFSXP)

    def read(self):
        """Check the serialization header and return the top-level object."""
        if self._take(2) != b"X\n":
            raise ValueError("not an R XDR serialization (expected 'X\\n' header)")
        version = self._int()
        self._int()  # R version that wrote the data
        self._int()  # minimal R version able to read it
        if version == 3:
            self._take(self._int())  # native encoding name, e.g. "UTF-8"
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")
        return self._item()

    def _take(self, n: int) -> bytes:
        chunk = self._buf[self._pos : self._pos + n]
        if len(chunk) != n:
            raise ValueError("truncated R serialization")
        self._pos += n
        return chunk

    def _int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def _length(self) -> int:
        length = self._int()
        if length == -1:  # long vector: the length follows as two 32-bit halves
            upper, lower = struct.unpack(">II", self._take(8))
            length = (upper << 32) | lower
        return length

    def _item(self):
        flags = self._int()
        sexp_type = flags & 0xFF
        if sexp_type == _NILVALUE_SXP:
            return None
        if sexp_type == _REFSXP:
            index = flags >> 8 or self._int()  # packed in the flags unless too large
            return self._refs[index - 1]
        if sexp_type == _SYMSXP:
            name = self._item()  # the symbol's printname, a CHARSXP
            self._refs.append(name)
            return name
        if sexp_type == _LISTSXP:
            return self._pairlist(flags)
        if sexp_type == _CHARSXP:
            return self._charsxp(flags)
        if sexp_type in (_INTSXP, _LGLSXP):
            value = self._int_vector(sexp_type)
        elif sexp_type in (_STRSXP, _VECSXP):  # elements are CHARSXPs or any objects
            value = [self._item() for _ in range(self._length())]
        else:
            raise ValueError(f"unsupported R object type {sexp_type}")
        if flags & _HAS_ATTR:
            value = self._apply_names(value, self._item())
        return value

    def _pairlist(self, flags: int) -> dict:
        """A pairlist (e.g. an attribute list) as an ordered dict of tag -> value."""
        result = {}
        while True:
            if flags & _HAS_ATTR:
                self._item()  # attributes of a pairlist cell carry nothing we need
            tag = self._item() if flags & _HAS_TAG else len(result)
            result[tag] = self._item()
            flags = self._int()  # the CDR is serialized inline as the next cell
            if flags & 0xFF == _NILVALUE_SXP:
                return result
            if flags & 0xFF != _LISTSXP:
                raise ValueError("pairlist not terminated by NULL")

    def _charsxp(self, flags: int):
        length = self._int()
        if length == _NA_STRING_LENGTH:
            return None
        encoding = "latin-1" if (flags >> 12) & _LATIN1_MASK else "utf-8"
        return self._take(length).decode(encoding)

    def _int_vector(self, sexp_type: int) -> list:
        n = self._length()
        values = struct.unpack(f">{n}i", self._take(4 * n))
        convert = bool if sexp_type == _LGLSXP else int
        return [None if v == _NA_INTEGER else convert(v) for v in values]

    @staticmethod
    def _apply_names(value: list, attributes: dict):
        names = attributes.get("names")
        return dict(zip(names, value)) if names is not None else value


def deserialize_r(payload: bytes):
    """Decode one R XDR serialization (see ``_RDeserializer`` for the mapping)."""
    return _RDeserializer(payload).read()


def read_lazyload_index(rdx_path) -> dict:
    """Map each object name in an R lazy-load ``.rdx`` index to ``(offset, length)`` in the ``.rdb``."""
    index = deserialize_r(gzip.decompress(pathlib.Path(rdx_path).read_bytes()))
    # compressed=TRUE means zlib; 2 and 3 (bzip2, xz) are not used by janeaustenr.
    if index["compressed"] != [True]:
        raise ValueError(f"unsupported lazy-load compression {index['compressed']!r}")
    return {name: tuple(span) for name, span in index["variables"].items()}


def read_lazyload_object(rdb_path, offset: int, length: int):
    """Read and decode the object stored at ``offset`` (``length`` bytes) in an R ``.rdb`` file."""
    with open(rdb_path, "rb") as f:
        f.seek(offset)
        record = f.read(length)
    (expected_size,) = struct.unpack(">I", record[:4])
    payload = zlib.decompress(record[4:])
    if len(payload) != expected_size:
        raise ValueError(f"object at {offset}: {len(payload)} bytes, header says {expected_size}")
    return deserialize_r(payload)


def austen_novels() -> dict:
    """Map each Jane Austen novel's name (e.g. 'emma') to its full text, lines joined by newlines."""
    austen_dir = data_dir() / "janeaustenr"
    rdx, rdb = austen_dir / "Rdata.rdx", austen_dir / "Rdata.rdb"
    for path in (rdx, rdb):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; {_INSTALL_HINT}")
    return {
        name: "\n".join(line or "" for line in read_lazyload_object(rdb, offset, length))
        for name, (offset, length) in read_lazyload_index(rdx).items()
    }


def load_text(path) -> list:
    """Read documents from a file: a ``.jsonl`` file gives each line's "text" field, any other file is one document."""
    path = pathlib.Path(path)
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    documents = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path}:{line_number}: expected a JSON object with a string "text" field')
            documents.append(record["text"])
    return documents
