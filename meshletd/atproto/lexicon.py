"""Lexicon loading and record validation.

The JSON files under `lexicons/` are the single source of truth for every record and XRPC
method. `Lexicons.load()` reads them; `Lexicons.validate_record(nsid, value)` checks a record
value (as it goes over the wire: JSON-like dicts, lists, str, int, bool, bytes) against its
lexicon and raises `InvalidRecord` naming the offending path. Only the lexicon v1 features
our files use are supported; an unsupported feature in a lexicon file is a load error, so a
file cannot silently mean less than it says.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import libipld

from meshletd.atproto.validity import RULES
from meshletd.errors import InvalidRecord


def _lexicon_dir() -> Path:
    """Where the lexicons are: package data of `meshletd` (`meshletd/lexicons`), wherever
    meshletd is installed (a wheel, the .deb's bundle, an editable checkout). In the
    source tree that is a link to the top-level `lexicons/`, the single copy; resolved, so
    `LEXICON_DIR.parent` is the checkout there."""
    return Path(str(importlib.resources.files("meshletd").joinpath("lexicons"))).resolve()


LEXICON_DIR = _lexicon_dir()

# Our own cap on a record's encoded size: far below the PDS's 1 MB, far above any valid record.
MAX_RECORD_BYTES = 64 * 1024
# Deepest nesting of objects and arrays a record may have (the record itself is level 1).
# Our lexicons need 4; unknown fields are allowed for forward compatibility but may not nest
# deeper than this either: a validator that recursed as deep as the data would let one record
# raise RecursionError in every meshlet (docs/protocol.md, "Validity").
MAX_DEPTH = 32

_DID_RE = re.compile(r"^did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]$")
_NSID_RE = re.compile(
    r"^[a-zA-Z]([a-zA-Z0-9-]{0,62})?(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,62})?)+(\.[a-zA-Z]([a-zA-Z0-9]{0,62})?)$"
)
_RKEY_RE = re.compile(r"^[a-zA-Z0-9_~.:-]{1,512}$")
_TID_RE = re.compile(r"^[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}$")
_HANDLE_RE = re.compile(
    r"^([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$"
)
_DATETIME_RE = re.compile(
    r"^[0-9]{4}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-6][0-9]:[0-6][0-9](\.[0-9]{1,20})?(Z|[+-][0-2][0-9]:[0-5][0-9])$"
)
_URI_RE = re.compile(r"^[a-z][a-z0-9+.-]*:\S+$")
_CID_RE = re.compile(r"^[a-zA-Z0-9+=]{8,256}$")

_SUPPORTED_KEYS: dict[str, set[str]] = {
    "object": {"type", "description", "required", "nullable", "properties"},
    "params": {"type", "description", "required", "properties"},
    "string": {
        "type",
        "description",
        "format",
        "maxLength",
        "minLength",
        "maxGraphemes",
        "minGraphemes",
        "knownValues",
        "enum",
        "const",
        "default",
    },
    "integer": {"type", "description", "minimum", "maximum", "enum", "const", "default"},
    "boolean": {"type", "description", "default", "const"},
    "bytes": {"type", "description", "maxLength", "minLength"},
    "array": {"type", "description", "items", "maxLength", "minLength"},
    "ref": {"type", "description", "ref"},
    "union": {"type", "description", "refs", "closed"},
    "unknown": {"type", "description"},
    "cid-link": {"type", "description"},
}


class _Fail(Exception):
    def __init__(self, msg: str, parts: list[str] | None = None) -> None:
        self.msg = msg
        self.parts = parts if parts is not None else []


class LexiconError(Exception):
    """A lexicon file is malformed or uses a feature this loader does not support."""


def grapheme_len(s: str) -> int:
    """Approximate grapheme count: code points that are not combining marks or joiners."""
    n = 0
    prev_zwj = False
    for ch in s:
        if unicodedata.combining(ch) or ch in "\u200d\ufe0f\ufe0e" or prev_zwj:
            prev_zwj = ch == "\u200d"
            continue
        n += 1
    return n


def _check_format(fmt: str, value: str) -> bool:
    if fmt == "did":
        return len(value) <= 2048 and bool(_DID_RE.match(value))
    if fmt == "datetime":
        if not _DATETIME_RE.match(value):
            return False
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return False
        return True
    if fmt == "at-uri":
        if not value.startswith("at://") or len(value) > 8192:
            return False
        parts = value[5:].split("/")
        if not parts[0] or len(parts) > 3:
            return False
        if not (_DID_RE.match(parts[0]) or _HANDLE_RE.match(parts[0])):
            return False
        if len(parts) >= 2 and not _NSID_RE.match(parts[1]):
            return False
        return not (len(parts) == 3 and not _RKEY_RE.match(parts[2]))
    if fmt == "uri":
        return bool(_URI_RE.match(value))
    if fmt == "cid":
        return bool(_CID_RE.match(value))
    if fmt == "nsid":
        return bool(_NSID_RE.match(value))
    if fmt == "handle":
        return bool(_HANDLE_RE.match(value))
    if fmt == "at-identifier":
        return bool(_DID_RE.match(value) or _HANDLE_RE.match(value))
    if fmt == "record-key":
        return bool(_RKEY_RE.match(value)) and value not in (".", "..")
    if fmt == "tid":
        return bool(_TID_RE.match(value))
    if fmt == "language":
        return bool(re.match(r"^[a-zA-Z]{1,8}(-[a-zA-Z0-9]{1,8})*$", value))
    raise LexiconError(f"unsupported string format {fmt!r}")


_FORMATS = {
    "did",
    "datetime",
    "at-uri",
    "uri",
    "cid",
    "nsid",
    "handle",
    "at-identifier",
    "record-key",
    "tid",
    "language",
}


@dataclass
class LexiconDoc:
    """One lexicon file."""

    id: str
    defs: dict[str, dict[str, Any]]
    description: str = ""
    path: Path | None = None

    @property
    def main(self) -> dict[str, Any] | None:
        return self.defs.get("main")


@dataclass
class Lexicons:
    """All lexicons of one directory, indexed by NSID."""

    docs: dict[str, LexiconDoc] = field(default_factory=dict)
    _ref_cache: dict[tuple[str, str], tuple[str, dict[str, Any]]] = field(
        default_factory=dict, repr=False
    )

    @classmethod
    def load(cls, directory: Path | str | None = None) -> Lexicons:
        """Read every `*.json` under `directory` (default: `LEXICON_DIR`, the package's)."""
        root = Path(directory) if directory is not None else LEXICON_DIR
        lex = cls()
        for path in sorted(root.rglob("*.json")):
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("lexicon") != 1:
                raise LexiconError(f"{path}: not a lexicon v1 document")
            doc = LexiconDoc(
                id=raw["id"], defs=raw["defs"], description=raw.get("description", ""), path=path
            )
            expected = root.joinpath(*doc.id.split(".")).with_suffix(".json")
            if path != expected:
                raise LexiconError(f"{path}: id {doc.id} belongs in {expected}")
            lex.docs[doc.id] = doc
        for doc in lex.docs.values():
            for name, d in doc.defs.items():
                lex._check_def(doc.id, name, d)
        return lex

    # -- structure checks at load time -------------------------------------------------------
    def _check_def(self, nsid: str, name: str, d: dict[str, Any]) -> None:
        t = d.get("type")
        where = f"{nsid}#{name}"
        if t == "record":
            if name != "main":
                raise LexiconError(f"{where}: a record must be the main def")
            key = d.get("key", "")
            if not (key in ("tid", "any", "nsid") or key.startswith("literal:")):
                raise LexiconError(f"{where}: bad record key type {key!r}")
            self._check_schema(nsid, where, d["record"])
        elif t in ("query", "procedure"):
            if "parameters" in d:
                self._check_schema(nsid, where + ".parameters", d["parameters"])
            for io in ("input", "output"):
                if io in d and "schema" in d[io]:
                    self._check_schema(nsid, f"{where}.{io}", d[io]["schema"])
        else:
            self._check_schema(nsid, where, d)

    def _check_schema(self, nsid: str, where: str, s: dict[str, Any]) -> None:
        t = s.get("type")
        if t not in _SUPPORTED_KEYS:
            raise LexiconError(f"{where}: unsupported type {t!r}")
        extra = set(s) - _SUPPORTED_KEYS[t]
        if extra:
            raise LexiconError(f"{where}: unsupported keys {sorted(extra)}")
        if t == "string":
            if "format" in s and s["format"] not in _FORMATS:
                raise LexiconError(f"{where}: unsupported format {s['format']!r}")
            if "maxLength" not in s and "enum" not in s and "const" not in s:
                raise LexiconError(f"{where}: every string needs an explicit maxLength")
        if t == "array" and "maxLength" not in s:
            raise LexiconError(f"{where}: every array needs an explicit maxLength")
        if t == "bytes" and "maxLength" not in s:
            raise LexiconError(f"{where}: bytes need an explicit maxLength")
        if t in ("object", "params"):
            for req in s.get("required", []):
                if req not in s.get("properties", {}):
                    raise LexiconError(f"{where}: required {req!r} is not a property")
            for pname, p in s.get("properties", {}).items():
                self._check_schema(nsid, f"{where}.{pname}", p)
        elif t == "array":
            self._check_schema(nsid, where + "[]", s["items"])
        elif t == "ref":
            self.resolve_ref(nsid, s["ref"])
        elif t == "union":
            for r in s["refs"]:
                self.resolve_ref(nsid, r)

    # -- lookups ------------------------------------------------------------------------------
    def resolve_ref(self, context_nsid: str, ref: str) -> tuple[str, dict[str, Any]]:
        """Resolve `#name`, `nsid` or `nsid#name` to (full ref, def)."""
        nsid, _, name = ref.partition("#")
        nsid = nsid or context_nsid
        name = name or "main"
        doc = self.docs.get(nsid)
        if doc is None or name not in doc.defs:
            raise LexiconError(f"unresolvable ref {ref!r} (from {context_nsid})")
        return f"{nsid}#{name}", doc.defs[name]

    def record_def(self, nsid: str) -> dict[str, Any]:
        doc = self.docs.get(nsid)
        if doc is None or doc.main is None or doc.main.get("type") != "record":
            raise InvalidRecord(f"{nsid}: no record lexicon of that name")
        return doc.main

    def record_nsids(self) -> list[str]:
        return sorted(n for n, d in self.docs.items() if d.main and d.main["type"] == "record")

    def record_properties(self, nsid: str) -> dict[str, tuple[dict[str, Any], bool]]:
        """Every property of a record, by dotted path through nested objects (refs to
        objects followed; arrays are leaves): path -> (schema, required where it is)."""
        out: dict[str, tuple[dict[str, Any], bool]] = {}
        self._walk(nsid, self.record_def(nsid)["record"], "", out)
        return out

    def object_properties(self, ref: str) -> dict[str, tuple[dict[str, Any], bool]]:
        """The same for a named object definition (`nsid#name`)."""
        full, schema = self.resolve_ref(ref.partition("#")[0], ref)
        out: dict[str, tuple[dict[str, Any], bool]] = {}
        self._walk(full.partition("#")[0], schema, "", out)
        return out

    def _walk(
        self, nsid: str, s: dict[str, Any], prefix: str, out: dict[str, tuple[dict[str, Any], bool]]
    ) -> None:
        required = set(s.get("required", ()))
        for name, p in s.get("properties", {}).items():
            path = prefix + name
            ctx, target = nsid, p
            if p["type"] == "ref":
                full, target = self.resolve_ref(nsid, p["ref"])
                ctx = full.partition("#")[0]
            if target.get("type") == "object":
                self._walk(ctx, target, path + ".", out)
            else:
                out[path] = (target, name in required)

    def defaults(self, nsid: str) -> dict[str, Any]:
        """The `default` of every record property that declares one, by dotted path: what a
        record that leaves the property out means."""
        return {
            p: s["default"] for p, (s, _) in self.record_properties(nsid).items() if "default" in s
        }

    def parameters(self, nsid: str) -> dict[str, Any] | None:
        """The `parameters` schema of an XRPC method (None if it takes none)."""
        got: dict[str, Any] | None = self._method(nsid).get("parameters")
        return got

    # -- validation ---------------------------------------------------------------------------
    def validate_record(
        self, nsid: str, value: Mapping[str, Any], *, rkey: str | None = None
    ) -> None:
        """Raise `InvalidRecord` unless `value` is a valid `nsid` record (and `rkey` fits it)."""
        d = self.record_def(nsid)
        if not isinstance(value, Mapping):
            raise InvalidRecord(f"{nsid}: record is not an object")
        t = value.get("$type")
        if t is not None and t != nsid:
            raise InvalidRecord(f"{nsid}: $type is {t!r}")
        if rkey is not None:
            key = d.get("key", "any")
            if key.startswith("literal:") and rkey != key[len("literal:") :]:
                raise InvalidRecord(f"{nsid}: record key must be {key[8:]!r}, not {rkey!r}")
            if key == "tid" and not _TID_RE.match(rkey):
                raise InvalidRecord(f"{nsid}: record key {rkey!r} is not a TID")
            if not _RKEY_RE.match(rkey) or rkey in (".", ".."):
                raise InvalidRecord(f"{nsid}: bad record key {rkey!r}")
        self._validate(nsid, d["record"], value, "", top_level=True)
        rule = RULES.get(nsid)
        if rule is not None:  # the protocol's validity rule (meshletd/atproto/validity.py)
            rule(value)

    def validate_size(self, nsid: str, value: Mapping[str, Any]) -> int:
        """Encoded (DAG-CBOR) size of a record; raise `InvalidRecord` above MAX_RECORD_BYTES."""
        try:
            size = len(libipld.encode_dag_cbor(dict(value)))
        except Exception as e:  # floats, unsupported types
            raise InvalidRecord(f"{nsid}: not encodable as DAG-CBOR ({e})") from e
        if size > MAX_RECORD_BYTES:
            raise InvalidRecord(
                f"{nsid}: record is {size} bytes, over the {MAX_RECORD_BYTES} limit"
            )
        return size

    def validate_params(self, nsid: str, params: Mapping[str, Any]) -> None:
        d = self._method(nsid)
        if "parameters" in d:
            self._validate(nsid, d["parameters"], params, "params")

    def validate_input(self, nsid: str, body: Mapping[str, Any]) -> None:
        d = self._method(nsid)
        if "input" in d and "schema" in d["input"]:
            self._validate(nsid, d["input"]["schema"], body, "input")

    def validate_output(self, nsid: str, body: Mapping[str, Any]) -> None:
        d = self._method(nsid)
        if "output" in d and "schema" in d["output"]:
            self._validate(nsid, d["output"]["schema"], body, "output")

    def _method(self, nsid: str) -> dict[str, Any]:
        doc = self.docs.get(nsid)
        if doc is None or doc.main is None or doc.main.get("type") not in ("query", "procedure"):
            raise InvalidRecord(f"{nsid}: no XRPC method lexicon of that name")
        return doc.main

    def _validate(
        self, nsid: str, s: dict[str, Any], v: Any, path: str, top_level: bool = False
    ) -> None:
        try:
            self._check(nsid, s, v, top_level)
        except _Fail as f:
            parts = [path] if path else []
            for p in f.parts:
                if p.startswith("[") or not parts:
                    parts.append(p)
                else:
                    parts.append("." + p)
            where = "".join(parts) or "record"
            message = f"{nsid}: {where}: {f.msg}"
            raise InvalidRecord(message, field="".join(parts), reason=f.msg) from None
        except RecursionError:  # unreachable with MAX_DEPTH; never let it out of here
            raise InvalidRecord(
                f"{nsid}: record: nested too deep", field="", reason="nested too deep"
            ) from None

    def _check(
        self, nsid: str, s: dict[str, Any], v: Any, top_level: bool = False, depth: int = 1
    ) -> None:
        # The path is only built on failure (_Fail collects it on the way out): the success
        # path, which the firehose runs for every record, allocates nothing. `depth` is the
        # nesting level of `v` (the record is 1).
        t = s["type"]
        if type(v) is float:
            raise _Fail("floats are not allowed (use integers)")
        if t == "object" or t == "params":
            if not isinstance(v, Mapping):
                raise _Fail("must be an object")
            if depth > MAX_DEPTH:
                raise _Fail(f"nested deeper than {MAX_DEPTH} levels")
            for req in s.get("required", ()):
                if v.get(req) is None:
                    raise _Fail("required", [req])
            props = s.get("properties", {})
            for k, item in v.items():
                if type(k) is not str:
                    raise _Fail("keys must be strings")
                if top_level and k == "$type":
                    continue
                try:
                    sub = props.get(k)
                    if sub is not None:
                        if item is None and k in s.get("nullable", ()):
                            continue
                        self._check(nsid, sub, item, depth=depth + 1)
                    else:
                        self._check_unknown(item, depth + 1)
                except _Fail as f:
                    f.parts.insert(0, k)
                    raise
        elif t == "string":
            if type(v) is not str:
                raise _Fail("must be a string")
            if "const" in s and v != s["const"]:
                raise _Fail(f"must be {s['const']!r}")
            if "enum" in s and v not in s["enum"]:
                raise _Fail(f"must be one of {s['enum']}")
            n = len(v) if v.isascii() else len(v.encode("utf-8"))
            if "maxLength" in s and n > s["maxLength"]:
                raise _Fail(f"longer than {s['maxLength']} bytes")
            if "minLength" in s and n < s["minLength"]:
                raise _Fail(f"shorter than {s['minLength']} bytes")
            mx, mn = s.get("maxGraphemes"), s.get("minGraphemes")
            # graphemes <= code points <= bytes: count them only when it can matter
            if (mx is not None and len(v) > mx) or mn is not None:
                g = grapheme_len(v)
                if mx is not None and g > mx:
                    raise _Fail(f"longer than {mx} graphemes")
                if mn is not None and g < mn:
                    raise _Fail(f"shorter than {mn} graphemes")
            fmt = s.get("format")
            if fmt is not None and not _check_format(fmt, v):
                raise _Fail(f"not a valid {fmt}")
        elif t == "integer":
            if type(v) is not int:
                raise _Fail("must be an integer")
            if "minimum" in s and v < s["minimum"]:
                raise _Fail(f"below the minimum {s['minimum']}")
            if "maximum" in s and v > s["maximum"]:
                raise _Fail(f"above the maximum {s['maximum']}")
            if "enum" in s and v not in s["enum"]:
                raise _Fail(f"must be one of {s['enum']}")
            if "const" in s and v != s["const"]:
                raise _Fail(f"must be {s['const']}")
        elif t == "boolean":
            if type(v) is not bool:
                raise _Fail("must be a boolean")
            if "const" in s and v != s["const"]:
                raise _Fail(f"must be {s['const']}")
        elif t == "bytes":
            if not isinstance(v, bytes | bytearray):
                raise _Fail("must be bytes")
            if "maxLength" in s and len(v) > s["maxLength"]:
                raise _Fail(f"longer than {s['maxLength']} bytes")
            if "minLength" in s and len(v) < s["minLength"]:
                raise _Fail(f"shorter than {s['minLength']} bytes")
        elif t == "array":
            if not isinstance(v, list | tuple):
                raise _Fail("must be an array")
            if depth > MAX_DEPTH:
                raise _Fail(f"nested deeper than {MAX_DEPTH} levels")
            if "maxLength" in s and len(v) > s["maxLength"]:
                raise _Fail(f"more than {s['maxLength']} items")
            if "minLength" in s and len(v) < s["minLength"]:
                raise _Fail(f"fewer than {s['minLength']} items")
            items = s["items"]
            for idx, item in enumerate(v):
                try:
                    self._check(nsid, items, item, depth=depth + 1)
                except _Fail as f:
                    f.parts.insert(0, f"[{idx}]")
                    raise
        elif t == "ref":
            full, target = self._ref(nsid, s["ref"])
            self._check(full, target, v, depth=depth)
        elif t == "union":
            if not isinstance(v, Mapping) or not isinstance(v.get("$type"), str):
                raise _Fail("union member needs a $type")
            wanted = v["$type"] if "#" in v["$type"] else v["$type"] + "#main"
            for r in s["refs"]:
                full, target = self.resolve_ref(nsid, r)
                if full == wanted:
                    self._check(full.split("#")[0], target, v, depth=depth)
                    return
            if s.get("closed"):
                raise _Fail(f"$type {v['$type']!r} is not allowed here")
        elif t == "unknown":
            self._check_unknown(v, depth)
        elif t == "cid-link":
            if not isinstance(v, bytes | bytearray | str):
                raise _Fail("must be a CID link")
        else:  # guarded by the load-time check
            raise _Fail(f"unsupported type {t}")

    def _ref(self, nsid: str, ref: str) -> tuple[str, dict[str, Any]]:
        key = (nsid, ref)
        hit = self._ref_cache.get(key)
        if hit is None:
            full, target = self.resolve_ref(nsid, ref)
            hit = self._ref_cache[key] = (full.split("#")[0], target)
        return hit

    def _check_unknown(self, v: Any, depth: int) -> None:
        # Unknown fields are allowed (forward compatibility) but must still be plain data,
        # nested no deeper than MAX_DEPTH.
        tv = type(v)
        if tv is float:
            raise _Fail("floats are not allowed (use integers)")
        if tv is dict:
            if depth > MAX_DEPTH:
                raise _Fail(f"nested deeper than {MAX_DEPTH} levels")
            for k, item in v.items():
                try:
                    self._check_unknown(item, depth + 1)
                except _Fail as f:
                    f.parts.insert(0, str(k))
                    raise
        elif tv is list or tv is tuple:
            if depth > MAX_DEPTH:
                raise _Fail(f"nested deeper than {MAX_DEPTH} levels")
            for idx, item in enumerate(v):
                try:
                    self._check_unknown(item, depth + 1)
                except _Fail as f:
                    f.parts.insert(0, f"[{idx}]")
                    raise


_DEFAULT: Lexicons | None = None


def default_lexicons() -> Lexicons:
    """The project's lexicons, loaded once."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Lexicons.load()
    return _DEFAULT


def validate_record(nsid: str, value: Mapping[str, Any], *, rkey: str | None = None) -> None:
    """Validate a record against the project's lexicon for `nsid` (shape and encoded size)."""
    lex = default_lexicons()
    lex.validate_record(nsid, value, rkey=rkey)
    lex.validate_size(nsid, value)
