"""Command output as kubectl prints it: `-o table|wide|json|yaml|name`.

Machine formats (json, yaml) carry integers as numbers (protobuf's JSON mapping would print
int64 fields as strings) and keys in one stable order: the .proto declaration order, every field
present (zero values too), enums by name.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

import yaml
from google.protobuf.descriptor import FieldDescriptor  # type: ignore[import-untyped]
from google.protobuf.message import Message  # type: ignore[import-untyped]

FORMATS = ("table", "wide", "json", "yaml", "name")


def message_dict(msg: Message) -> dict[str, Any]:
    """A protobuf message as plain data: proto field names, declaration order, integers as ints."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.is_repeated:
            out[field.name] = [_scalar(field, v) for v in value]
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not msg.HasField(field.name):
            out[field.name] = None
        elif field.has_presence and field.containing_oneof is not None and not msg.HasField(field.name):
            out[field.name] = None  # an unset `optional` scalar
        else:
            out[field.name] = _scalar(field, value)
    return out


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_dict(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name if value in field.enum_type.values_by_number else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value


def dump(obj: Any, fmt: str, out: TextIO | None = None) -> None:
    """Print `obj` (plain data) as json or yaml."""
    out = out or sys.stdout
    if fmt == "json":
        out.write(json.dumps(obj, indent=2) + "\n")
    elif fmt == "yaml":
        out.write(yaml.safe_dump(obj, sort_keys=False, default_flow_style=False))
    else:
        raise ValueError(f"not a machine format: {fmt}")


def names(kind: str, items: Iterable[str], out: TextIO | None = None) -> None:
    """`-o name`: one `kind/name` a line, as kubectl prints them."""
    out = out or sys.stdout
    for item in items:
        out.write(f"{kind}/{item}\n")


def table(rows: Sequence[Sequence[str]], out: TextIO | None = None) -> None:
    """Columns padded to the widest cell, two spaces apart (kubectl's look)."""
    out = out or sys.stdout
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")
