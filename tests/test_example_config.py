"""``gateway.example.toml`` documents every setting: each key of the configuration
schema (``gateway.config_schema.Settings`` and the models under it) appears in the
example, set or commented out, in its own section."""

from __future__ import annotations

import inspect
import re
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from gateway.config_schema import Settings

EXAMPLE = Path(__file__).resolve().parent.parent / "gateway.example.toml"
_HEADER = re.compile(r"^#?\s*\[\[?([a-z_.]+)\]\]?\s*(#.*)?$")


def _model(annotation: object) -> type[BaseModel] | None:
    """The model a field holds (itself, in a list, or optional), else ``None``."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model(arg)
            if found is not None:
                return found
    return None


def schema_keys(model: type[BaseModel] = Settings, section: str = "") -> list[tuple[str, str]]:
    """(section, key) for every setting; "" is the top level. A model nested inside a
    section (a rule's ``require``, ``[sp.metadata]``) has its keys in that section: set
    inline there, or in a sub-section of it."""
    keys: list[tuple[str, str]] = []
    for name, info in model.model_fields.items():
        if info.exclude:
            continue
        sub = _model(info.annotation)
        is_dict = typing.get_origin(info.annotation) is dict
        if not section and (sub is not None or is_dict):
            keys.append((name, ""))  # the section itself
            if sub is not None:
                keys += schema_keys(sub, name)
            continue
        keys.append((section, name))
        if sub is not None:
            keys += schema_keys(sub, section)
    return keys


def example_sections() -> dict[str, str]:
    """Section name → its text (set or commented out); "" is the top level."""
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in EXAMPLE.read_text().splitlines():
        match = _HEADER.match(line.strip())
        if match:
            current = match.group(1)
            sections.setdefault(current, [])
            continue
        sections[current].append(line)
    return {name: "\n".join(lines) for name, lines in sections.items()}


def section_text(sections: dict[str, str], section: str) -> str:
    """A section's text with that of its sub-sections (``[sp]`` with ``[sp.metadata]``
    and ``[[sp.metadata.contacts]]``)."""
    if not section:
        return sections[""]
    return "\n".join(text for name, text in sections.items()
                     if name == section or name.startswith(section + "."))


def test_every_setting_of_the_schema_is_in_the_example() -> None:
    sections = example_sections()
    missing = []
    for section, key in schema_keys():
        if not key:
            if section not in sections:
                missing.append(f"[{section}]")
            continue
        text = section_text(sections, section)
        if any(name.startswith(section + ".") and name.endswith("." + key)
               for name in sections):
            continue  # a sub-section of its own: [sp.metadata], [[sp.metadata.contacts]]
        if not re.search(rf"(^|[\s{{,#]){re.escape(key)}\s*=", text, re.M):
            missing.append(f"{section or '(top level)'}: {key}")
    assert missing == []


def test_the_walk_sees_nested_and_listed_models() -> None:
    keys = set(schema_keys())
    assert {("server", "shutdown_timeout"), ("idps", "allow_unsolicited"),
            ("rules", "entitlement"), ("rules", "require"), ("attributes", ""),
            ("", "public_url")} <= keys
    assert ("", "source") not in keys
