"""A campaign's contacts, as the host application sends them (JSON or CSV), checked whole before any is kept.

Every problem names its row (the CSV line as a spreadsheet shows it, the header being line 1; or the index in the
JSON list) and its field, and one bad row keeps the whole import out: nothing is half-imported.
"""

from __future__ import annotations

import csv
import io
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from callbridge.service.calling_hours import CallingHours, normalize_number, zones_for

CSV_COLUMNS = ("to", "reference", "name", "timezone")
"""The CSV columns a contact is made of; any other column goes to the contact's metadata."""


class ContactContext(BaseModel):
    """What the agent knows of the person, for each of their calls."""

    model_config = ConfigDict(extra="forbid")

    instructions: str | None = Field(default=None, max_length=1500, description="Instructions for their calls")
    greeting: str | None = Field(default=None, max_length=300, description="What the agent says first")
    items: list[tuple[Literal["system", "user", "assistant"], str]] = Field(
        default=[], max_length=10, description="Conversation items given to the model first: [role, text] pairs"
    )


class ContactSpec(BaseModel):
    """One contact as the API takes it."""

    model_config = ConfigDict(extra="forbid")

    to: str = Field(min_length=1, max_length=64, description="The number to call, in international form (+…)")
    reference: str | None = Field(default=None, max_length=200, description="Your reference for the person")
    name: str | None = Field(default=None, max_length=200, description="The person's name")
    timezone: str | None = Field(
        default=None, max_length=64, description="Their IANA time zone (default: the zones of the number)"
    )
    context: ContactContext = Field(default=ContactContext(), description="What the agent knows of the person")
    metadata: dict[str, Any] = Field(
        default={}, description="Anything of yours: kept with each call, and named by the voicemail's placeholders"
    )


@dataclass(frozen=True, slots=True)
class Contact:
    """A contact ready to be dialed: its number in E.164 and the time zones its calling hours are read in."""

    number: str
    zones: tuple[str, ...]
    reference: str | None = None
    name: str | None = None
    context: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def placeholder_values(self) -> dict[str, str]:
        return placeholder_values(self.name, self.reference, self.number, self.context, self.metadata)


def placeholder_values(
    name: str | None, reference: str | None, number: str | None, context: Mapping[str, Any], metadata: Mapping[str, Any]
) -> dict[str, str]:
    """What a message template may name: the person's name, reference and number (``to``), then their metadata,
    then their context's plain values."""
    values = {key: str(value) for key, value in context.items() if isinstance(value, str | int | float)}
    values |= {key: str(value) for key, value in metadata.items() if value is not None}
    for key, value in (("name", name), ("reference", reference), ("to", number)):
        if value is not None:
            values[key] = value
    return values


@dataclass(frozen=True, slots=True)
class ContactProblem:
    row: str
    """``"line 3"`` of a CSV file, or ``"contacts[2]"`` of a JSON list."""
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.row}: {self.field}: {self.message}"


Row = tuple[str, ContactSpec | ContactProblem]
"""One row of an import: where it is (``line 3``, ``contacts[2]``), and the contact, or what keeps it out."""


class ContactsRefused(ValueError):
    """An import with at least one bad row; none of it is kept."""

    def __init__(self, problems: Sequence[ContactProblem]) -> None:
        super().__init__("; ".join(str(problem) for problem in problems[:5]))
        self.problems = list(problems)


def placeholders(template: str) -> list[str]:
    """The names a message template uses (``{name}``); ``ValueError`` for anything but plain names."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"not a message template: {exc}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"{{{name}}} is not a placeholder: use plain names like {{name}}")
        names.append(name)
    return names


def render(template: str, values: Mapping[str, str]) -> str:
    """The template with its placeholders filled (every one must be in ``values``; see :func:`missing`)."""
    return template.format_map(dict(values))


def missing(template: str, values: Mapping[str, str]) -> list[str]:
    return [name for name in placeholders(template) if name not in values]


def from_csv(text: str) -> list[Row]:
    """Rows of a CSV file (a header naming ``to`` and any of ``reference, name, timezone``; other columns are
    metadata), each a spec or the problem that keeps it out."""
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    header = [column.strip() for column in reader.fieldnames or ()]
    if "to" not in header:
        return [("line 1", ContactProblem("line 1", "to", "the header must name a 'to' column"))]
    rows: list[Row] = []
    for values in reader:
        row = f"line {reader.line_num}"
        extra = values.get(None) or []  # cells past the header's columns
        if not any((value or "").strip() for value in [*values.values(), *extra] if isinstance(value, str)):
            continue  # a blank line
        if extra:  # more cells than the header has columns
            rows.append((row, ContactProblem(row, "row", "more cells than the header has columns")))
            continue
        cells = {key.strip(): (value or "").strip() for key, value in values.items() if key is not None}
        known = {key: cells[key] or None for key in CSV_COLUMNS if key in cells}
        metadata = {key: value for key, value in cells.items() if key not in CSV_COLUMNS and value}
        rows.append((row, _spec(row, {**known, "to": cells.get("to", ""), "metadata": metadata})))
    return rows


def from_json(items: Iterable[ContactSpec]) -> list[Row]:
    return [(f"contacts[{index}]", item) for index, item in enumerate(items)]


def check(
    rows: Sequence[Row],
    *,
    hours: CallingHours,
    now: datetime,
    template: str | None = None,
    known_numbers: Iterable[str] = (),
) -> list[Contact]:
    """The contacts of an import, or :class:`ContactsRefused` with every problem: a number that is not one, a number
    twice (in the import, or already in the campaign), a time zone that cannot be told or shares no calling hour,
    a placeholder of ``template`` the contact cannot fill."""
    problems: list[ContactProblem] = []
    contacts: list[Contact] = []
    seen = {number: "the campaign" for number in known_numbers}
    for row, spec in rows:
        if isinstance(spec, ContactProblem):
            problems.append(spec)
            continue
        try:
            number = normalize_number(spec.to)
        except ValueError as exc:
            problems.append(ContactProblem(row, "to", str(exc)))
            continue
        if number in seen:
            problems.append(ContactProblem(row, "to", f"{number} is already in {seen[number]}"))
            continue
        seen[number] = row
        try:
            zones = zones_for(number, spec.timezone)
        except ValueError as exc:
            problems.append(ContactProblem(row, "timezone", str(exc)))
            continue
        if hours.next_open(now, zones) is None:
            message = f"the zones of {number} ({', '.join(zones[:3])}…) share no calling hour: give its timezone"
            problems.append(ContactProblem(row, "timezone", message))
            continue
        context = spec.context.model_dump(exclude_defaults=True)
        contact = Contact(number, zones, spec.reference, spec.name, context, spec.metadata)
        for name in missing(template, contact.placeholder_values()) if template else ():
            message = f"the voicemail message needs {{{name}}} and the contact has none"
            problems.append(ContactProblem(row, name, message))
        contacts.append(contact)
    if problems:
        raise ContactsRefused(problems)
    return contacts


def _spec(row: str, values: dict[str, Any]) -> ContactSpec | ContactProblem:
    try:
        return ContactSpec.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "row"
        return ContactProblem(row, where, str(error["msg"]))
