"""Calling hours in the contact's local time, time zones from numbers, durations."""

from __future__ import annotations

from datetime import UTC, datetime, time

import pytest

from callbridge.service.calling_hours import CallingHours, normalize_number, parse_duration, zones_for

NEW_YORK = ("America/New_York",)
# Monday 7 December 2026.
MONDAY_NOON_UTC = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def test_a_window_opens_and_closes_in_local_time() -> None:
    hours = CallingHours.parse("09:00-20:00")
    # 12:00 UTC is 07:00 in New York in December: closed until 14:00 UTC.
    assert not hours.is_open(MONDAY_NOON_UTC, NEW_YORK)
    assert hours.next_open(MONDAY_NOON_UTC, NEW_YORK) == datetime(2026, 12, 7, 14, 0, tzinfo=UTC)
    assert hours.is_open(datetime(2026, 12, 7, 14, 0, tzinfo=UTC), NEW_YORK)
    assert not hours.is_open(datetime(2026, 12, 8, 1, 0, tzinfo=UTC), NEW_YORK)  # 20:00 local: the end is out


def test_an_open_window_is_open_now() -> None:
    at = datetime(2026, 12, 7, 15, 30, tzinfo=UTC)
    assert CallingHours.parse("09:00-20:00").next_open(at, NEW_YORK) == at


def test_weekends_are_skipped_by_default() -> None:
    friday_evening = datetime(2026, 12, 12, 2, 0, tzinfo=UTC)  # Friday 21:00 in New York
    assert CallingHours.parse("09:00-20:00").next_open(friday_evening, NEW_YORK) == datetime(
        2026, 12, 14, 14, 0, tzinfo=UTC
    )
    weekend = CallingHours.parse("10:00-16:00", ["sat", "Sunday"])
    assert weekend.next_open(friday_evening, NEW_YORK) == datetime(2026, 12, 12, 15, 0, tzinfo=UTC)


def test_several_zones_share_the_latest_starting_window() -> None:
    zones = ("America/New_York", "America/Chicago")
    hours = CallingHours.parse("09:00-20:00")
    # Open at 09:00 in Chicago (15:00 UTC), not at 09:00 in New York; closed at 20:00 in New York (01:00 UTC).
    assert hours.next_open(MONDAY_NOON_UTC, zones) == datetime(2026, 12, 7, 15, 0, tzinfo=UTC)
    assert not hours.is_open(datetime(2026, 12, 8, 1, 30, tzinfo=UTC), zones)


def test_zones_without_a_common_hour_never_open() -> None:
    assert CallingHours.parse("09:00-12:00").next_open(MONDAY_NOON_UTC, ("Pacific/Guam", "America/Halifax")) is None


def test_midnight_ends_a_window() -> None:
    hours = CallingHours.parse("18:00-24:00", ["mon"])
    assert hours.end is None
    assert hours.is_open(datetime(2026, 12, 7, 23, 59, tzinfo=UTC), ("UTC",))


@pytest.mark.parametrize(
    ("window", "reason"),
    [
        ("25:00-09:00", "hours run 00:00 to 24:00"),
        ("20:00-09:00", "ends before it starts"),
        ("09:00-09:00", "ends before it starts"),
        ("9-17", "not a window"),
        ("09:60-10:00", "hours run"),
        ("24:30-24:45", "hours run"),
    ],
)
def test_bad_windows_are_refused(window: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        CallingHours.parse(window)


@pytest.mark.parametrize("days", [["funday"], ["t"], ["tu"], []])
def test_bad_days_are_refused(days: list[str]) -> None:
    with pytest.raises(ValueError):
        CallingHours.parse("09:00-17:00", days)


def test_time_zones_come_from_the_number_or_the_contact() -> None:
    assert zones_for("+12025550123") == NEW_YORK
    assert zones_for("+61291234567") == ("Australia/Sydney",)
    assert len(zones_for("+447911123456")) > 1  # the United Kingdom and the Crown Dependencies
    assert zones_for("+12025550123", "Europe/Paris") == ("Europe/Paris",)
    with pytest.raises(ValueError, match="not a time zone"):
        zones_for("+12025550123", "Mars/Olympus")
    with pytest.raises(ValueError, match="give the contact's timezone"):
        zones_for("+15550100002")


def test_numbers_are_normalized_or_refused() -> None:
    assert normalize_number(" +1 (202) 555-0123 ") == "+12025550123"
    for bad in ("555-0123", "+1 202", "not a number", "+999 1234"):
        with pytest.raises(ValueError):
            normalize_number(bad)


def test_durations() -> None:
    assert parse_duration("30m") == 1800
    assert parse_duration("2h") == 7200
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("1d") == 86400
    for bad in ("30", "m", "2 hours", "-1s"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_window_times() -> None:
    hours = CallingHours.parse(" 08:30 - 17:45 ")
    assert (hours.start, hours.end) == (time(8, 30), time(17, 45))
