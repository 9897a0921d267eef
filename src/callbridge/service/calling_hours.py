"""When a campaign may call someone: a daily window in the person's local time, on some days of the week.

A contact's time zone is given, or derived from the number with ``phonenumbers``. A number may map to several zones
(a US toll-free number maps to dozens): the contact may then be called only when the window is open in every one of
them, which is the latest-starting window that fits them all. Numbers whose zones share no calling hour, and
numbers no zone can be told for, are refused at import, with what to give instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from phonenumbers import timezone as number_zones

DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
WEEKDAYS = DAY_NAMES[:5]
_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``"45s"``, ``"30m"``, ``"2h"`` or ``"1d"``; ``ValueError`` otherwise."""
    found = _DURATION.match(text)
    if found is None:
        raise ValueError(f"{text!r} is not a duration like 30m, 2h, 1d or 45s")
    return float(found.group(1)) * _UNIT_SECONDS[found.group(2)]


def normalize_number(text: str) -> str:
    """A phone number in E.164 (``+14155552671``); ``ValueError`` when it cannot be one."""
    try:
        number = phonenumbers.parse(text.strip(), None)
    except phonenumbers.NumberParseException:
        raise ValueError(f"{text!r} is not a phone number in international form (+ and country code)") from None
    if not phonenumbers.is_possible_number(number):
        raise ValueError(f"{text!r} is not a possible phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def zones_for(number: str, given: str | None = None) -> tuple[str, ...]:
    """The time zones a contact may be in: ``given`` (an IANA name) or those of the number."""
    if given:
        try:
            ZoneInfo(given)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{given!r} is not a time zone name (e.g. America/New_York)") from None
        return (given,)
    try:
        zones = number_zones.time_zones_for_number(phonenumbers.parse(number, None))
    except phonenumbers.NumberParseException:
        raise ValueError(f"{number!r} is not a phone number in international form") from None
    known = tuple(zone for zone in zones if zone != "Etc/Unknown")
    if not known:
        raise ValueError(f"no time zone is known for {number}: give the contact's timezone")
    return known


@dataclass(frozen=True, slots=True)
class CallingHours:
    """A daily window ``[start, end)`` in local time, on ``days`` (0 is Monday)."""

    start: time
    end: time | None
    """``None``: until midnight (``24:00``)."""
    days: frozenset[int]

    @classmethod
    def parse(cls, window: str = "09:00-20:00", days: Sequence[str] | None = None) -> CallingHours:
        """``"09:00-20:00"`` and day names (``mon`` or ``monday``; default Monday to Friday); ``ValueError``."""
        found = _WINDOW.match(window)
        if found is None:
            raise ValueError(f"{window!r} is not a window like 09:00-20:00")
        start_h, start_m, end_h, end_m = (int(part) for part in found.groups())
        if start_h > 23 or start_m > 59 or end_m > 59 or end_h > 24 or (end_h == 24 and end_m):
            raise ValueError(f"{window!r} is not a window of the day: hours run 00:00 to 24:00")
        start = time(start_h, start_m)
        end = None if end_h == 24 else time(end_h, end_m)
        if end is not None and end <= start:
            raise ValueError(f"{window!r} ends before it starts: a window runs within one day")
        return cls(start, end, _days(days if days is not None else WEEKDAYS))

    def is_open(self, at: datetime, zones: Iterable[str]) -> bool:
        """Whether the window is open at ``at`` (an aware datetime) in every one of ``zones``."""
        return all(self._open_in(at.astimezone(ZoneInfo(zone))) for zone in zones)

    def next_open(self, at: datetime, zones: Sequence[str]) -> datetime | None:
        """The first moment from ``at`` on when :meth:`is_open` holds (``at`` itself if it does); ``None`` when
        the zones share no calling hour in a week."""
        if self.is_open(at, zones):
            return at
        candidates = set()
        for zone in zones:
            local = at.astimezone(ZoneInfo(zone))
            for offset in range(8):
                day = local.date() + timedelta(days=offset)
                opening = datetime.combine(day, self.start, tzinfo=ZoneInfo(zone)).astimezone(UTC)
                if opening > at:
                    candidates.add(opening)
        return next((moment for moment in sorted(candidates) if self.is_open(moment, zones)), None)

    def _open_in(self, local: datetime) -> bool:
        if local.weekday() not in self.days:
            return False
        now = local.time().replace(tzinfo=None)
        return self.start <= now and (self.end is None or now < self.end)


def _days(names: Iterable[str]) -> frozenset[int]:
    days = set()
    for name in names:
        matches = [index for index, day in enumerate(DAY_NAMES) if len(name) >= 3 and day.startswith(name.lower())]
        if len(matches) != 1:
            raise ValueError(f"{name!r} is not a day of the week (monday… or mon…)")
        days.add(matches[0])
    if not days:
        raise ValueError("no day to call on")
    return frozenset(days)
