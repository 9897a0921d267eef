"""A campaign's contacts: CSV and JSON imports, checked whole, every problem named by row and field."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from callbridge.service.calling_hours import CallingHours
from callbridge.service.contacts import (
    ContactSpec,
    ContactsRefused,
    check,
    from_csv,
    from_json,
    placeholders,
    render,
)

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
HOURS = CallingHours.parse("09:00-20:00")
TEMPLATE = "Hi {name}, this is Bright Dental about your appointment tomorrow at {time}."


def test_a_csv_import_becomes_contacts_with_metadata() -> None:
    text = "to,name,reference,time,timezone\n+1 202 555 0123,Ada,b-1,10 am,\n+14155552671,Bo,b-2,3 pm,Europe/Paris\n"
    contacts = check(from_csv(text), hours=HOURS, now=NOW, template=TEMPLATE)
    assert [contact.number for contact in contacts] == ["+12025550123", "+14155552671"]
    assert contacts[0].zones == ("America/New_York",)
    assert contacts[1].zones == ("Europe/Paris",)
    assert contacts[0].metadata == {"time": "10 am"}
    assert render(TEMPLATE, contacts[0].placeholder_values()) == (
        "Hi Ada, this is Bright Dental about your appointment tomorrow at 10 am."
    )


def test_every_bad_row_is_named_and_nothing_is_kept() -> None:
    text = (
        "to,name,time\n"
        "+12025550123,Ada,10 am\n"  # line 2: fine
        "not a number,Bo,11 am\n"  # line 3: malformed
        "+1 (202) 555-0123,Cy,noon\n"  # line 4: the same number as line 2
        "+14155552671,,1 pm\n"  # line 5: no name for {name}
        "+15550100002,Di,2 pm\n"  # line 6: no time zone can be told
    )
    with pytest.raises(ContactsRefused) as refused:
        check(from_csv(text), hours=HOURS, now=NOW, template=TEMPLATE)
    found = [(problem.row, problem.field) for problem in refused.value.problems]
    assert found == [("line 3", "to"), ("line 4", "to"), ("line 5", "name"), ("line 6", "timezone")]
    assert "line 4: to: +12025550123 is already in line 2" in str(refused.value)


def test_numbers_already_in_the_campaign_are_refused() -> None:
    rows = from_json([ContactSpec(to="+12025550123")])
    with pytest.raises(ContactsRefused, match=r"contacts\[0\]: to: \+12025550123 is already in the campaign"):
        check(rows, hours=HOURS, now=NOW, known_numbers={"+12025550123"})


def test_zones_without_a_shared_hour_need_a_timezone() -> None:
    rows = from_json([ContactSpec(to="+18005550100")])  # toll-free: from Guam to Newfoundland
    with pytest.raises(ContactsRefused, match="share no calling hour"):
        check(rows, hours=CallingHours.parse("09:00-12:00"), now=NOW)
    given = from_json([ContactSpec(to="+18005550100", timezone="America/Chicago")])
    assert check(given, hours=CallingHours.parse("09:00-12:00"), now=NOW)[0].zones == ("America/Chicago",)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("name\nAda\n", ("line 1", "to")),
        ("to,name\n+12025550123,Ada,extra\n", ("line 2", "row")),
        ("to,timezone\n+12025550123,Mars/Base\n", ("line 2", "timezone")),
    ],
)
def test_malformed_csv(text: str, where: tuple[str, str]) -> None:
    with pytest.raises(ContactsRefused) as refused:
        check(from_csv(text), hours=HOURS, now=NOW)
    assert (refused.value.problems[0].row, refused.value.problems[0].field) == where


def test_blank_lines_and_a_byte_order_mark_are_fine() -> None:
    contacts = check(from_csv("\ufeffto\n+12025550123\n,\n\n"), hours=HOURS, now=NOW)
    assert len(contacts) == 1


def test_templates_take_plain_names_only() -> None:
    assert placeholders("Hi {name} at {time}") == ["name", "time"]
    for bad in ("{name.__class__}", "{0}", "{name!r}", "{name:>10}", "{unclosed"):
        with pytest.raises(ValueError):
            placeholders(bad)
