"""The mapping file as forms: every value the file holds is a field (named by its JSON
pointer, e.g. ``/accounts/merchant_fees``), a change is applied to the YAML tree with its
comments and quoting kept (ruamel's round trip), and the result is validated by the same
``load_mapping`` the runs and ``stripe-sage mapping preview`` use, its errors placed at the
field they name. Plain Python over text: the console's routes do the I/O."""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.scalarstring import DoubleQuotedScalarString, ScalarString

from stripe_sage.errors import ConfigurationError
from stripe_sage.mapping import Accounts, Mapping, load_mapping

# The file's values with a fixed set of choices (the mapping model's Literals).
CHOICES: dict[str, tuple[str, ...]] = {
    "on_overflow": ("reject", "truncate", "shorten"),
    "closed_period_policy": ("next_open", "dead_letter"),
    "unknown_erp_order": ("on_account", "reject"),
    "document": ("invoice", "sales_order_and_invoice"),
}
ACCOUNT_NAMES = tuple(Accounts.model_fields)
SECTION_TITLES = {
    "": "General",
    "accounts": "GL accounts",
    "customers": "Customers",
    "charges": "Charges: invoices and receipts (payment methods)",
    "refunds": "Refunds: credit memos (reasons)",
    "invoices": "Billing invoices",
    "items": "Items",
    "orders": "Checkout orders",
    "tax": "Tax codes",
    "reporting_categories": "Reporting categories → accounts",
}
# Maps a person may add entries to (a value map anywhere, and these sections).
ADDABLE = ("value_map", "reporting_categories", "codes")


def _yaml() -> YAML:
    y = YAML()
    y.preserve_quotes = True
    y.width = 4096  # never re-wrap a long line or comment
    y.indent(mapping=2, sequence=4, offset=2)
    # An empty value is written as the file writes it, "null" (ruamel would leave it blank).
    y.representer.add_representer(
        type(None), lambda r, _d: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return y


def load_tree(text: str) -> CommentedMap:
    tree = _yaml().load(text)
    if not isinstance(tree, CommentedMap):
        raise ConfigurationError("the mapping file is not a YAML mapping")
    return tree


def dump_tree(tree: CommentedMap) -> str:
    out = io.StringIO()
    _yaml().dump(tree, out)
    return out.getvalue()


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def pointer(path: tuple[Any, ...]) -> str:
    """RFC 6901 JSON pointer of a path in the file (``/accounts/clearing/USD``)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


@dataclass
class Field:
    path: tuple[Any, ...]
    value: Any
    kind: str  # text | number | list | bool | choice | account | account_name | null
    options: tuple[str, ...] = ()
    error: str | None = None
    shown: str | None = None  # what the person typed, when it did not apply

    @property
    def name(self) -> str:
        return pointer(self.path)

    @property
    def label(self) -> str:
        return ".".join(str(p) for p in self.path[1:]) or str(self.path[0])

    @property
    def where(self) -> str:
        return ".".join(str(p) for p in self.path)

    @property
    def text(self) -> str:
        return self.shown if self.shown is not None else display(self.value)


@dataclass
class Addable:
    """A map a person may add an entry to (a value map, a reporting category, a tax code)."""

    path: tuple[Any, ...]
    value_kind: str

    @property
    def name(self) -> str:
        return pointer(self.path)

    @property
    def label(self) -> str:
        return ".".join(str(p) for p in self.path)


@dataclass
class Section:
    key: str
    title: str
    fields: list[Field] = field(default_factory=list)
    addables: list[Addable] = field(default_factory=list)


def display(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(display(v) for v in value)
    return str(value)


def _kind(path: tuple[Any, ...], value: Any) -> tuple[str, tuple[str, ...]]:
    last = str(path[-1])
    if path[0] == "accounts":
        return "account", ()
    if path[0] == "reporting_categories":
        return "account_name", ACCOUNT_NAMES
    if last in CHOICES:
        return "choice", CHOICES[last]
    if isinstance(value, bool):
        return "bool", ("true", "false")
    if isinstance(value, int | float):
        return "number", ()
    if isinstance(value, list):
        return "list", ()
    if value is None:
        return "null", ()
    return "text", ()


def _walk(node: Any, path: tuple[Any, ...], out: list[Field], adds: list[Addable]) -> None:
    if isinstance(node, dict):
        if path and str(path[-1]) in ADDABLE:
            kind = "account_name" if path[0] == "reporting_categories" else "text"
            adds.append(Addable(path, kind))
        for k, v in node.items():
            _walk(v, (*path, k), out, adds)
    elif isinstance(node, list) and any(isinstance(v, dict | list) for v in node):
        for i, v in enumerate(node):
            _walk(v, (*path, i), out, adds)
    else:
        kind, options = _kind(path, node)
        out.append(Field(path, node, kind, options))


def sections(tree: CommentedMap) -> list[Section]:
    """The file's values, grouped by its top-level sections (scalars at the top: General)."""
    by_key: dict[str, Section] = {"": Section("", SECTION_TITLES[""])}
    fields: list[Field] = []
    adds: list[Addable] = []
    _walk(tree, (), fields, adds)
    for f in fields:
        key = str(f.path[0]) if len(f.path) > 1 or f.path[0] in SECTION_TITLES else ""
        by_key.setdefault(key, Section(key, SECTION_TITLES.get(key, key)))
        by_key[key].fields.append(f)
    for a in adds:
        key = str(a.path[0])
        by_key.setdefault(key, Section(key, SECTION_TITLES.get(key, key)))
        by_key[key].addables.append(a)
    return [s for s in by_key.values() if s.fields or s.addables]


def _convert(text: str, old: Any) -> Any:
    """The typed value for what a person typed, in the type the file had there."""
    text = text.strip()
    if isinstance(old, bool):
        if text not in ("true", "false"):
            raise ValueError("true or false")
        return text == "true"
    if isinstance(old, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"a whole number, not {text!r}") from None
    if isinstance(old, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"a number, not {text!r}") from None
    if isinstance(old, list):
        items = [t.strip() for t in text.split(",") if t.strip()]
        seq = CommentedSeq(items)
        if hasattr(old, "fa") and old.fa.flow_style():
            seq.fa.set_flow_style()
        return seq
    if text == "":
        return None
    return _string(text, old)


def _string(text: str, old: Any) -> str:
    """Keep the file's quoting ("6100" stays quoted: unquoted, YAML reads a number)."""
    if isinstance(old, ScalarString):
        return type(old)(text)
    if not isinstance(yaml.safe_load(text), str):
        return DoubleQuotedScalarString(text)
    return text


def _node(tree: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _unpointer(name: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in name.split("/")[1:]]


@dataclass
class Change:
    text: str  # the new file text (the old one, byte for byte, when nothing changed)
    changed: list[str]  # what changed, in words ("accounts.merchant_fees: 6100 → 6101")
    errors: dict[str, str]  # field pointer ("" for the file) → the problem
    typed: dict[str, str]  # what was typed where it did not apply (shown back in the form)


def apply_form(text: str, form: dict[str, str]) -> Change:
    """Apply the form's values to the file's text; validate the result like a run would.

    A field ``/a/b`` holds the new value of ``a.b``; ``+/a/map`` with ``+/a/map:value`` add
    an entry to a map (a value map, reporting categories, tax codes); a blank value in such
    a map removes its entry."""
    tree = load_tree(text)
    changed: list[str] = []
    errors: dict[str, str] = {}
    typed: dict[str, str] = {}
    fields: list[Field] = []
    adds: list[Addable] = []
    _walk(tree, (), fields, adds)
    for f in fields:
        if f.name not in form:
            continue
        new = form[f.name]
        if new.strip() == display(f.value).strip():
            continue
        parent = _node(tree, f.path[:-1])
        in_addable = len(f.path) > 1 and str(f.path[-2]) in ADDABLE
        if in_addable and not new.strip():
            del parent[f.path[-1]]
            changed.append(f"{f.where}: removed (was {display(f.value)!r})")
            continue
        try:
            parent[f.path[-1]] = _convert(new, f.value)
        except ValueError as exc:
            errors[f.name] = f"must be {exc}"
            typed[f.name] = new
            continue
        changed.append(f"{f.where}: {display(f.value)!r} → {new.strip()!r}")
    for a in adds:
        key = form.get("+" + a.name, "").strip()
        value = form.get("+" + a.name + ":value", "").strip()
        if not key and not value:
            continue
        if not key or not value:
            errors["+" + a.name] = "a new entry needs both its Stripe value and its Sage value"
            continue
        target = _node(tree, a.path)
        old = target.get(key)
        target[key] = _string(value, old if old is not None else "")
        changed.append(f"{a.label}.{key}: added {value!r}")
    new_text = dump_tree(tree) if changed else text
    if not errors:
        errors.update(validate(new_text, fields))
    return Change(new_text, changed, errors, typed)


PROBLEM = re.compile(r"line \S+: (?P<where>[^:]+): (?P<msg>.*)$")


def validate(text: str, fields: list[Field] | None = None) -> dict[str, str]:
    """``load_mapping``'s problems, each at the field it names (or the nearest enclosing
    one, or the file as a whole)."""
    try:
        load_mapping(text=text)
    except ConfigurationError as exc:
        names = {f.name for f in fields or []}
        out: dict[str, str] = {}
        for line in str(exc).splitlines()[1:] or [str(exc)]:
            m = PROBLEM.search(line.strip())
            if not m:
                out[""] = (out.get("", "") + " " + line.strip()).strip()
                continue
            parts = m["where"].split(".")
            target = ""
            for n in range(len(parts), 0, -1):
                candidate = pointer(tuple("from" if p == "from_" else p for p in parts[:n]))
                if candidate in names:
                    target = candidate
                    break
                prefix = [x for x in names if x.startswith(candidate + "/")]
                if prefix:
                    target = sorted(prefix)[0]
                    break
            message = f"{m['where']}: {m['msg']}"
            out[target] = f"{out[target]}; {message}" if target in out else message
        return out
    return {}


def with_form(change: Change) -> list[Section]:
    """The sections of the changed file, with each error and what was typed at its field."""
    out = sections(load_tree(change.text))
    for s in out:
        for f in s.fields:
            if f.name in change.errors:
                f.error = change.errors[f.name]
            if f.name in change.typed:
                f.shown = change.typed[f.name]
    return out


def unified_diff(old: str, new: str, name: str) -> str:
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True),
            new.splitlines(keepends=True),
            f"{name} (saved)",
            f"{name} (after this change)",
        )
    )


def parse(text: str) -> Mapping:
    return load_mapping(text=text)


# -- what a change does to planned documents ------------------------------------------------
def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def compare_previews(
    before: list[dict[str, Any]], after: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The preview under the new mapping, each document with what differs from the saved
    mapping's (``changes``: ``[(field, before, after)]``; errors and flags included)."""
    out = []
    for b, a in zip(before, after, strict=False):
        docs = []
        for i, d in enumerate(a["documents"]):
            old = b["documents"][i] if i < len(b["documents"]) else None
            changes = []
            if old is None:
                changes.append(("document", None, d["doc_type"]))
            else:
                fb, fa = _flat(old["payload"]), _flat(d["payload"])
                for k in sorted(set(fb) | set(fa)):
                    if fb.get(k) != fa.get(k):
                        changes.append((k, fb.get(k), fa.get(k)))
                for k in ("error", "flag"):
                    if old.get(k) != d.get(k):
                        changes.append((k, old.get(k), d.get(k)))
            docs.append(
                {
                    **d,
                    "payload_text": json.dumps(d["payload"], indent=2, ensure_ascii=False),
                    "changes": changes,
                }
            )
        out.append({"stripe": a["stripe"], "notes": a.get("notes", []), "documents": docs})
    return out
