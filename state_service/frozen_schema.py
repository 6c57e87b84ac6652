"""Protobuf message classes for data statecar has already stored, pinned here.

Stored bytes outlive any version of the API: items written before the log had
its own encoding are protobuf bytes laid out as the API's ``Item`` was then,
and workflow bodies are protobuf bytes. Decoding them with the API's generated
messages would tie stored data to the API (a renumbered or retyped field
would silently misread it), so each stored layout is declared here once,
frozen, in a private descriptor pool. Parsing still runs in protobuf's C code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {"int64": _F.TYPE_INT64, "bytes": _F.TYPE_BYTES, "string": _F.TYPE_STRING}
# google.protobuf.Timestamp's wire layout, declared locally so no import of
# the well-known type's file is needed.
_TIME_FIELDS = (("seconds", 1, _F.TYPE_INT64), ("nanos", 2, _F.TYPE_INT32))


def message_class(package: str, name: str, fields: Sequence[tuple[str, int, str]]) -> Any:
    """A message class with `fields` (name, number, kind); kinds are int64,
    bytes, string, timestamp and map (string to string)."""
    file = descriptor_pb2.FileDescriptorProto(
        name=f"{package.replace('.', '/')}/{name.lower()}.proto", package=package, syntax="proto3"
    )
    message = file.message_type.add(name=name)
    optional = _F.LABEL_OPTIONAL
    for field_name, number, kind in fields:
        if kind in _SCALARS:
            message.field.add(name=field_name, number=number, type=_SCALARS[kind], label=optional)
            continue
        nested = message.nested_type.add()
        if kind == "map":
            nested.name = f"{field_name.title().replace('_', '')}Entry"
            nested.options.map_entry = True
            for key_or_value, key_number in (("key", 1), ("value", 2)):
                nested.field.add(
                    name=key_or_value, number=key_number, type=_F.TYPE_STRING, label=optional
                )
            label = _F.LABEL_REPEATED
        elif kind == "timestamp":
            nested.name = f"{field_name.title().replace('_', '')}Time"
            for part, part_number, part_type in _TIME_FIELDS:
                nested.field.add(name=part, number=part_number, type=part_type, label=optional)
            label = optional
        else:
            raise ValueError(f"unknown field kind {kind!r}")
        message.field.add(
            name=field_name,
            number=number,
            type=_F.TYPE_MESSAGE,
            label=label,
            type_name=f".{package}.{name}.{nested.name}",
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))
