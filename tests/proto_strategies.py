"""Hypothesis strategies that build any message of the contract from its descriptor: every
field, every oneof case (or none), repeated fields, open enums (unknown numbers too),
proto3 ``optional`` fields set or not. Chosen fields can be given their own strategy, so
generated requests are often valid and reach the models, not only the validator."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

Strategy = st.SearchStrategy[Any]

_INTEGERS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(field: FieldDescriptor) -> Strategy:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=40)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        known = [value.number for value in field.enum_type.values]
        # proto3 enums are open: a number the server never heard of must be handled too.
        return st.one_of(st.sampled_from(known), st.integers(-3, 64))
    low, high = _INTEGERS[kind]
    # Small numbers are where the limits are; the extremes are where overflows are.
    return st.one_of(st.integers(0, 8), st.integers(0, 5000), st.integers(low, high)).filter(
        lambda n: low <= n <= high
    )


class MessageStrategies:
    """``of(descriptor)`` builds messages of that type. ``fields`` maps a field's full
    name (``embedgate.v1.Image.uri``) to the strategy for its value (for a repeated
    field: one element's); ``max_items`` bounds every repeated field."""

    def __init__(self, fields: Mapping[str, Strategy] | None = None, max_items: int = 5) -> None:
        self._fields = dict(fields or {})
        self._max_items = max_items
        self._built: dict[str, Strategy] = {}

    def of(self, descriptor: Descriptor) -> st.SearchStrategy[Message]:
        name = descriptor.full_name
        if name not in self._built:
            # Deferred, so a message that holds itself (directly or not) terminates.
            self._built[name] = st.deferred(lambda: self._message(descriptor))
        built: st.SearchStrategy[Message] = self._built[name]
        return built

    def _value(self, field: FieldDescriptor) -> Strategy:
        if field.full_name in self._fields:
            return self._fields[field.full_name]
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            assert field.message_type is not None
            return self.of(field.message_type)
        return _scalar(field)

    def _message(self, descriptor: Descriptor) -> st.SearchStrategy[Message]:
        cls = message_factory.GetMessageClass(descriptor)
        # Each real oneof: one of its fields, or none. proto3 `optional` fields sit in a
        # synthetic oneof of their own: set or not.
        parts: dict[str, Strategy] = {}
        for oneof in descriptor.oneofs:
            choices = [st.just(None)] + [
                st.tuples(st.just(field.name), self._value(field)) for field in oneof.fields
            ]
            parts[f"oneof:{oneof.name}"] = st.one_of(choices)
        for field in descriptor.fields:
            if field.containing_oneof is not None:
                continue
            if field.is_repeated:
                parts[field.name] = st.lists(self._value(field), max_size=self._max_items)
            else:
                parts[field.name] = st.one_of(st.none(), self._value(field))

        def build(values: dict[str, Any]) -> Message:
            message = cls()
            for key, value in values.items():
                if value is None:
                    continue
                if key.startswith("oneof:"):
                    key, value = value
                    _assign(message, descriptor.fields_by_name[key], value)
                elif descriptor.fields_by_name[key].is_repeated:
                    _extend(message, descriptor.fields_by_name[key], value)
                else:
                    _assign(message, descriptor.fields_by_name[key], value)
            return message

        return st.fixed_dictionaries(parts).map(build)


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
        getattr(message, field.name).SetInParent()
    else:
        setattr(message, field.name, value)


def _extend(message: Message, field: FieldDescriptor, values: list[Any]) -> None:
    container = getattr(message, field.name)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        for value in values:
            container.add().CopyFrom(value)
    else:
        container.extend(values)
