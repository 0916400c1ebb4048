"""Triggers: parse ``cron``, ``every`` and ``at``, and compute when they fire (no APScheduler:
``pushrules validate`` and ``next`` never load it; its adapter is engine/daemon/scheduler.py).

Everything here is pure: callers pass the instants, nothing reads the clock, so the
daemon can inject one in tests and ``pushrules next`` shows exactly what will happen.

Cron follows Vixie cron, including across daylight saving time changes:

* a *fixed-time* job (minute and hour fields do not begin with ``*``) fires once for
  each local time it names, at the first instant the local clock reaches that time:
  a time skipped in spring fires at the end of the gap (``30 2 * * *`` in
  Europe/Paris fires at 03:00+02:00 on 2026-03-29), a time repeated in autumn fires
  on its first occurrence only;
* a *real-time* job (``*`` first in the minute or hour field, e.g. ``*/15 * * * *``
  or ``0 * * * *``) fires at every real instant whose local time matches: twice in
  the repeated autumn hour, never in the spring gap.

Fire times come back aware in the rule's timezone. Compare them through UTC or
``.timestamp()``: Python compares two datetimes sharing a tzinfo by wall clock,
which gets the repeated autumn hour wrong.
"""

from __future__ import annotations

import calendar
import difflib
import os
import re
import zoneinfo
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from functools import lru_cache
from typing import Protocol, runtime_checkable

from engine.errors import PushrulesError

__all__ = [
    "MISSED_LIMIT",
    "AtSchedule",
    "CronSchedule",
    "EverySchedule",
    "Schedule",
    "TriggerError",
    "ZonedCronSchedule",
    "fire_times",
    "missed_fires",
    "parse_at",
    "parse_duration",
    "parse_timezone",
    "schedule_for",
]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
SECOND = timedelta(seconds=1)
# Offsets are probed this far apart when looking for a DST change; two changes that
# cancel out within one probe step would go unseen (tzdb has none in practice).
_PROBE = timedelta(days=1)
# A schedule that passes the parse checks fires within 28 years (the weekday cycle
# of a date), 40 across a non-leap century year; searching further is pointless.
_SEARCH_YEARS = 400


class TriggerError(PushrulesError, ValueError):
    """A trigger a rule author must fix; the message says what and how."""


# --------------------------------------------------------------------------- timezones

_OFFSET_LIKE = re.compile(r"^(?:UTC|GMT|Z)?\s*[+\-\u2212]\s*\d{1,2}(?::?\d{2})?$", re.IGNORECASE)
_ABBREVIATION = re.compile(r"^[A-Z]{2,5}$")


# Present in some zoneinfo folders but not places: they would make a rule depend on
# the server's own setting, or mean "unknown".
_NOT_PLACES = frozenset({"localtime", "Factory", "posixrules", "posix", "right"})


@lru_cache(maxsize=1)
def _zone_keys() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones()) - _NOT_PLACES


@lru_cache(maxsize=1)
def _listed_zones() -> frozenset[str]:
    """The zones the tzdata package lists, each one of ``available_timezones()``, read
    without it: it imports importlib.resources and walks the system's zone folders, 10 ms of
    every ``validate`` for the one timezone a project names. Empty when the list is not
    there (then the full set decides)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("tzdata")
        folders = spec.submodule_search_locations if spec is not None else None
        if not folders:
            return frozenset()
        with open(os.path.join(next(iter(folders)), "zones"), encoding="utf-8") as listing:
            return frozenset(line.strip() for line in listing if line.strip())
    except (ImportError, OSError, ValueError):
        return frozenset()


def zone_names() -> frozenset[str]:
    """The IANA names :func:`parse_timezone` takes (the editor schema lists them)."""
    return _zone_keys()


def parse_timezone(name: str) -> zoneinfo.ZoneInfo:
    """An IANA zone; offsets and abbreviations are refused because they ignore DST."""
    if not isinstance(name, str) or not name.strip():
        raise TriggerError(f"timezone must be an IANA name such as Europe/Paris, not {name!r}")
    name = name.strip()
    if name in _listed_zones() and name not in _NOT_PLACES:
        return zoneinfo.ZoneInfo(name)  # what the full set says of it, for less
    keys = _zone_keys()
    if name in keys or (not keys and name not in _NOT_PLACES and _zoneinfo_accepts(name)):
        return zoneinfo.ZoneInfo(name)
    if _OFFSET_LIKE.match(name):
        raise TriggerError(
            f"timezone '{name}' is a fixed offset, which ignores daylight saving time: "
            "use an IANA name such as Europe/Paris or America/New_York"
        )
    if _ABBREVIATION.match(name) and name.lower() not in {k.lower() for k in keys}:
        raise TriggerError(
            f"timezone '{name}' looks like an abbreviation: use an IANA name such as "
            "Europe/Paris or America/New_York, which follows daylight saving time"
        )
    suggestions = _suggest_zones(name, keys)
    if suggestions:
        raise TriggerError(f"unknown timezone '{name}': did you mean {_either(suggestions)}?")
    raise TriggerError(
        f"unknown timezone '{name}': use an IANA name such as Europe/Paris or America/New_York"
    )


def _either(options: list[str]) -> str:
    quoted = [f"'{o}'" for o in options]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _zoneinfo_accepts(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _suggest_zones(name: str, keys: Iterable[str]) -> list[str]:
    """Close IANA names: the city is compared first, within the region when it is known."""
    keys = sorted(keys)
    wanted = name.replace(" ", "_")
    by_lower = {k.lower(): k for k in keys}
    if wanted.lower() in by_lower:
        return [by_lower[wanted.lower()]]
    region, _, city = wanted.lower().rpartition("/")
    known_region = any(k.lower().startswith(region + "/") for k in keys) if region else False
    cities: dict[str, list[str]] = {}
    for key in keys:
        key_region, _, key_city = key.lower().rpartition("/")
        if not known_region or key_region == region:
            cities.setdefault(key_city, []).append(key)
    if city in cities:
        return cities[city][:3]
    close = difflib.get_close_matches(city, list(cities), n=3, cutoff=0.7)
    found = [k for c in close for k in cities[c]]
    if not found:
        found = [
            by_lower[c] for c in difflib.get_close_matches(wanted.lower(), list(by_lower), n=3)
        ]
    return list(dict.fromkeys(found))[:3]


# --------------------------------------------------------------------------- durations

_UNITS = {"d": timedelta(days=1), "h": timedelta(hours=1), "m": MINUTE, "s": SECOND}
MILLISECOND = timedelta(milliseconds=1)
_UNITS_MS = {**_UNITS, "ms": MILLISECOND}
_UNIT_ORDER = ("d", "h", "m", "s", "ms")
_LONG_UNITS = {
    "sec": "s",
    "secs": "s",
    "second": "s",
    "seconds": "s",
    "min": "m",
    "mins": "m",
    "minute": "m",
    "minutes": "m",
    "hr": "h",
    "hrs": "h",
    "hour": "h",
    "hours": "h",
    "day": "d",
    "days": "d",
}
_DURATION = re.compile(r"(?:\d+\s*[A-Za-z]+\s*)+")
_DURATION_PART = re.compile(r"(\d+)\s*([A-Za-z]+)")


def parse_duration(text: str, *, milliseconds: bool = False) -> timedelta:
    """``15m``, ``1h30m``, ``10s``, ``2d``: whole numbers, lowercase units, largest first.

    Lowercase only, so ``1M`` (a month?) is refused rather than read as one minute.
    ``milliseconds`` also takes ``ms`` (``500ms``, ``1s500ms``) down to 1 ms: for the
    daemon's timing settings, never for rules, whose times are whole seconds.
    """
    units = _UNITS_MS if milliseconds else _UNITS
    floor = MILLISECOND if milliseconds else SECOND
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise TriggerError(f"duration must be text such as 15m or 1h30m, not {text!r}")
    if isinstance(text, (int, float)):
        raise TriggerError(
            f"duration {text} has no unit: write it as {text}s, {text}m, {text}h or {text}d"
        )
    raw = text.strip()
    if not raw:
        raise TriggerError("duration is empty: write it as e.g. 15m, 1h30m, 10s or 2d")
    if raw[0] in "-\u2212":
        raise TriggerError(f"duration '{raw}' must be positive")
    if re.search(r"\d[.,]\d", raw):
        raise TriggerError(
            f"duration '{raw}' must use whole numbers: write e.g. 1h30m instead of 1.5h"
        )
    if raw.isdigit():
        raise TriggerError(f"duration '{raw}' has no unit: write e.g. {raw}s, {raw}m or {raw}h")
    if not _DURATION.fullmatch(raw):
        raise TriggerError(
            f"duration '{raw}' is not understood: write a whole number and a unit "
            "(s, m, h or d), e.g. 15m, 1h30m, 10s or 2d"
        )
    total = timedelta()
    seen: list[str] = []
    for part in _DURATION_PART.finditer(raw):
        number, unit = part.groups()
        if unit not in units:
            if unit.lower() in units:
                raise TriggerError(
                    f"duration '{raw}': units are lowercase, write {number}{unit.lower()}"
                    + (" (m is minutes; months are not supported)" if unit == "M" else "")
                )
            if unit.lower() in _LONG_UNITS:
                short = _LONG_UNITS[unit.lower()]
                raise TriggerError(
                    f"duration '{raw}': write {number}{short} instead of {part.group(0).strip()}"
                )
            raise TriggerError(
                f"duration '{raw}': unknown unit '{unit}'; use "
                + ("ms (milliseconds), " if milliseconds else "")
                + "s (seconds), m (minutes), h (hours) or d (days)"
            )
        if seen and _UNIT_ORDER.index(unit) <= _UNIT_ORDER.index(seen[-1]):
            raise TriggerError(f"duration '{raw}': write each unit once, largest first, e.g. 1h30m")
        seen.append(unit)
        try:
            total += int(number) * units[unit]
        except OverflowError:
            raise TriggerError(f"duration '{raw}' is too long") from None
    if total < floor:
        raise TriggerError(f"duration '{raw}' must be at least {'1ms' if milliseconds else '1s'}")
    return total


# --------------------------------------------------------------------------- instants


def _utc(moment: datetime) -> datetime:
    if not isinstance(moment, datetime) or moment.utcoffset() is None:
        raise ValueError(f"expected a timezone-aware datetime, got {moment!r}")
    return moment.astimezone(UTC)


def _offset(tz: tzinfo, instant: datetime) -> timedelta:
    offset = instant.astimezone(tz).utcoffset()
    assert offset is not None
    return offset


def _wall(instant: datetime, tz: tzinfo) -> datetime:
    """The naive local clock reading at ``instant``."""
    return instant.astimezone(tz).replace(tzinfo=None)


def _seconds(instant: datetime) -> int:
    return (instant - EPOCH) // SECOND


def _first_change(tz: tzinfo, lo: datetime, hi: datetime) -> datetime:
    """The first instant in (lo, hi] whose offset differs from lo's (hi's must differ).

    tzdb changes happen on whole seconds, so a bisection on seconds is exact.
    """
    base = _offset(tz, lo)
    lo_s, hi_s = _seconds(lo), _seconds(hi)
    while hi_s - lo_s > 1:
        mid = (lo_s + hi_s) // 2
        if _offset(tz, EPOCH + mid * SECOND) == base:
            lo_s = mid
        else:
            hi_s = mid
    return EPOCH + hi_s * SECOND


def _change_between(tz: tzinfo, lo: datetime, hi: datetime) -> datetime | None:
    """The first offset change in (lo, hi], if any."""
    base = _offset(tz, lo)
    previous, probe = lo, lo
    while probe < hi:
        probe = min(probe + _PROBE, hi)
        if _offset(tz, probe) != base:
            return _first_change(tz, previous, probe)
        previous = probe
    return None


def _first_reach(wall: datetime, tz: tzinfo) -> datetime:
    """The first instant (UTC) at which the local clock reads ``wall`` or later.

    That is the wall time's first occurrence, or the end of the DST gap it falls in.
    """
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if _wall(first, tz) == wall:
        return first
    # In a gap fold=0 uses the offset before the change (a later instant) and fold=1
    # the offset after it (an earlier one); the change lies between the two.
    other = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    return _first_change(tz, min(first, other), max(first, other))


def _floor_minute(wall: datetime) -> datetime:
    return wall.replace(second=0, microsecond=0)


def _ceil_minute(wall: datetime) -> datetime:
    floor = _floor_minute(wall)
    return floor if floor == wall else floor + MINUTE


def _tz_name(tz: tzinfo) -> str:
    return str(getattr(tz, "key", None) or tz)


# --------------------------------------------------------------------------- at

_AT = re.compile(
    r"(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}(?::\d{2})?)\s*(Z|[+-]\d{2}:?\d{2})?",
    re.IGNORECASE,
)


def parse_at(text: object, tz: tzinfo) -> datetime:
    """A one-off local date-time; an explicit offset in the text wins over ``tz``.

    A local time skipped by DST moves to the end of the gap, a repeated one takes
    its first occurrence, as cron's fixed times do.
    """
    if isinstance(text, datetime):
        return _at_datetime(text, tz)
    if isinstance(text, date):
        raise TriggerError(f"at: {text.isoformat()} has no time: write e.g. '{text} 09:00'")
    if not isinstance(text, str):
        raise TriggerError(f"at: must be a date and time such as '2026-12-24 18:00', not {text!r}")
    match = _AT.fullmatch(text.strip())
    if not match:
        raise TriggerError(
            f"at: '{text}' is not understood: write a local date and time such as "
            "'2026-12-24 18:00' or '2026-12-24T18:00:00', optionally with an offset "
            "like +01:00"
        )
    day, clock, offset = match.groups()
    iso = f"{day}T{clock}{'+00:00' if offset and offset.upper() == 'Z' else offset or ''}"
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError as exc:
        raise TriggerError(f"at: '{text}' is not a real date and time ({exc})") from None
    return _at_datetime(moment, tz)


def _at_datetime(moment: datetime, tz: tzinfo) -> datetime:
    if moment.utcoffset() is not None:
        return moment.astimezone(tz)
    return _first_reach(moment, tz).astimezone(tz)


# --------------------------------------------------------------------------- cron

# English names whatever the locale (calendar.month_abbr follows LC_TIME).
_MONTHS = (
    "January February March April May June July August September October November December"
).split()
_MONTH_NAMES = {name[:3].upper(): i for i, name in enumerate(_MONTHS, start=1)}
_DAY_NAMES = {"SUN": 0, "MON": 1, "TUE": 2, "WED": 3, "THU": 4, "FRI": 5, "SAT": 6}
# February counts 29 days: a schedule naming the 29th fires in leap years.
_MAX_DAYS = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30, 12: 31}
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: Mapping[str, int]
    allowed: str


_FIELDS = (
    _Field("minute", 0, 59, {}, "0-59"),
    _Field("hour", 0, 23, {}, "0-23"),
    _Field("day of month", 1, 31, {}, "1-31"),
    _Field("month", 1, 12, _MONTH_NAMES, "1-12 (or JAN-DEC)"),
    _Field("day of week", 0, 7, _DAY_NAMES, "0-7 (0 and 7 are Sunday)"),
)
_FIELD_LIST = "minute hour day-of-month month day-of-week"


def _first_at_least(values: tuple[int, ...], value: int) -> int | None:
    i = bisect_left(values, value)
    return values[i] if i < len(values) else None


@dataclass(frozen=True, slots=True)
class CronSchedule:
    """A parsed crontab line: the allowed values of each field, and Vixie's two flags.

    ``day_or``: both day fields restricted, so a day matches either (Vixie).
    ``real_time``: ``*`` first in minute or hour, so DST is followed in real time.
    """

    expr: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: tuple[int, ...]
    months: tuple[int, ...]
    weekdays: tuple[int, ...]  # 0 = Sunday
    day_or: bool
    real_time: bool

    @classmethod
    def parse(cls, expr: str) -> CronSchedule:
        """Parse five fields or an ``@`` macro; refuse what could never fire."""
        if not isinstance(expr, str):
            raise TriggerError(f'cron must be text such as "0 9 * * MON", not {expr!r}')
        text = " ".join(expr.split())
        if not text:
            raise TriggerError(
                f"cron is empty: write five fields ({_FIELD_LIST}), e.g. 0 9 * * MON"
            )
        fields_text = _expand_macro(text).split()
        if len(fields_text) != 5:
            extra = "; seconds and years are not supported" if len(fields_text) in (6, 7) else ""
            raise TriggerError(
                f"cron '{text}' has {len(fields_text)} field{'s' * (len(fields_text) != 1)} "
                f"but needs 5 ({_FIELD_LIST}){extra}"
            )
        values = [
            _parse_field(part, spec, text) for part, spec in zip(fields_text, _FIELDS, strict=True)
        ]
        minute, hour, dom, _, dow = fields_text
        schedule = cls(
            expr=text,
            minutes=values[0],
            hours=values[1],
            days=values[2],
            months=values[3],
            weekdays=tuple(sorted({v % 7 for v in values[4]})),
            day_or=not dom.startswith("*") and not dow.startswith("*"),
            real_time=minute.startswith("*") or hour.startswith("*"),
        )
        schedule._check_possible()
        return schedule

    def matches(self, wall: datetime) -> bool:
        """Whether a local (naive) clock reading, to the minute, is one the job names."""
        return (
            wall.second == 0
            and wall.microsecond == 0
            and wall.minute in self.minutes
            and wall.hour in self.hours
            and wall.month in self.months
            and self._day_matches(wall.day, (wall.weekday() + 1) % 7)
        )

    def next_after(self, after: datetime, tz: tzinfo) -> datetime | None:
        """The first fire strictly after ``after``, aware in ``tz``; None past year 9999."""
        start = _utc(after)
        try:
            fire = (
                self._next_real_time(start, tz) if self.real_time else self._next_fixed(start, tz)
            )
        except OverflowError:
            return None
        return None if fire is None else fire.astimezone(tz)

    def _next_fixed(self, after: datetime, tz: tzinfo) -> datetime | None:
        """First named wall time whose first reach by the local clock is after ``after``.

        Usually the next wall time after the local reading; during a repeated autumn
        hour, the named times already reached in its first pass are passed over.
        """
        start = _floor_minute(_wall(after, tz)) + MINUTE
        while (wall := self._next_wall(start)) is not None:
            fire = _first_reach(wall, tz)
            if fire > after:
                return fire
            start = wall + MINUTE
        return None

    def _next_real_time(self, after: datetime, tz: tzinfo) -> datetime | None:
        """Walk the stretches of constant UTC offset; in each the local clock is linear."""
        moment, inclusive = after, False
        while True:
            offset = _offset(tz, moment)
            wall = (moment + offset).replace(tzinfo=None)
            start = _ceil_minute(wall) if inclusive else _floor_minute(wall) + MINUTE
            found = self._next_wall(start)
            if found is None:
                return None
            candidate = (found - offset).replace(tzinfo=UTC)
            change = _change_between(tz, moment, candidate)
            if change is None:
                return candidate
            moment, inclusive = change, True

    def _next_wall(self, start: datetime) -> datetime | None:
        """First matching naive wall time at or after ``start``, skipping whole units."""
        year, month, day, hour, minute = (
            start.year,
            start.month,
            start.day,
            start.hour,
            start.minute,
        )
        last_year = min(year + _SEARCH_YEARS, 9999)
        while year <= last_year:
            if month not in self.months:
                following = _first_at_least(self.months, month)
                year, month = (
                    (year, following) if following is not None else (year + 1, self.months[0])
                )
                day, hour, minute = 1, 0, 0
                continue
            found_day = self._first_day(year, month, day)
            if found_day is None:
                year, month = (year, month + 1) if month < 12 else (year + 1, 1)
                day, hour, minute = 1, 0, 0
                continue
            if found_day != day:
                day, hour, minute = found_day, 0, 0
            found_hour = _first_at_least(self.hours, hour)
            if found_hour is None:
                day, hour, minute = day + 1, 0, 0
                continue
            if found_hour != hour:
                hour, minute = found_hour, 0
            found_minute = _first_at_least(self.minutes, minute)
            if found_minute is None:
                hour, minute = hour + 1, 0
                continue
            return datetime(year, month, day, hour, found_minute)
        return None

    def _first_day(self, year: int, month: int, day: int) -> int | None:
        first_weekday, length = calendar.monthrange(year, month)
        for candidate in range(day, length + 1):
            if self._day_matches(candidate, (first_weekday + candidate) % 7):
                return candidate
        return None

    def _day_matches(self, day: int, weekday: int) -> bool:
        if self.day_or:
            return day in self.days or weekday in self.weekdays
        return day in self.days and weekday in self.weekdays

    def _check_possible(self) -> None:
        """Refuse a day that no named month has, e.g. ``0 0 30 2 *``."""
        if self.day_or:
            return  # the weekday alone makes some day match
        if any(d <= _MAX_DAYS[m] for m in self.months for d in self.days):
            return
        months = [_MONTHS[m - 1] for m in self.months]
        month_text = (
            months[0] if len(months) == 1 else ", ".join(months[:-1]) + " and " + months[-1]
        )
        days = ", ".join(str(d) for d in self.days)
        verb = "has" if len(months) == 1 else "have"
        raise TriggerError(
            f"cron '{self.expr}' would never fire: {month_text} {verb} no day {days}"
        )

    def __str__(self) -> str:
        return self.expr


def _expand_macro(text: str) -> str:
    if not text.startswith("@"):
        return text
    name = text.lower()
    if name in _MACROS:
        return _MACROS[name]
    if name == "@reboot":
        raise TriggerError("cron '@reboot' is not a schedule: use an event trigger instead")
    close = difflib.get_close_matches(name, list(_MACROS), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise TriggerError(
        f"cron '{text}' is not known: {hint}use @yearly, @monthly, @weekly, @daily or @hourly"
    )


#: One copy of each field's values, which most crons repeat ("every day", "every month": 31
#: and 12 values); 5,000 loaded rules kept 2.6 MB of equal tuples. Emptied when this full.
_FIELD_VALUES: dict[tuple[int, ...], tuple[int, ...]] = {}
_FIELD_VALUES_MAX = 4096


def _parse_field(text: str, spec: _Field, expr: str) -> tuple[int, ...]:
    values: set[int] = set()
    for item in text.split(","):
        values.update(_parse_item(item, spec, expr))
    kept = tuple(sorted(values))
    if len(_FIELD_VALUES) >= _FIELD_VALUES_MAX:
        _FIELD_VALUES.clear()
    return _FIELD_VALUES.setdefault(kept, kept)


def _parse_item(item: str, spec: _Field, expr: str) -> range:
    where = f"cron field '{spec.name}'"
    if not item:
        raise TriggerError(f"{where} has an empty value in '{expr}' (look for a doubled comma)")
    base, slash, step_text = item.partition("/")
    if base == "*":
        low, high = spec.low, spec.high
    elif "-" in base:
        first, _, last = base.partition("-")
        if not first or not last or "-" in last:
            raise TriggerError(
                f"{where} '{item}' in '{expr}' is not understood: write a number, a range "
                "like 1-5, a list like 1,3,5 or a step like */15"
            )
        low, high = _parse_value(first, spec, expr), _parse_value(last, spec, expr)
        if low > high:
            top, bottom = _wrap_bounds(spec, named=not first.isdigit())
            raise TriggerError(
                f"{where} range {base} runs backwards in '{expr}': write it as two ranges, "
                f"e.g. {first}-{top},{bottom}-{last}"
            )
    else:
        low = high = _parse_value(base, spec, expr)
        if slash:
            raise TriggerError(
                f"{where} '{item}' in '{expr}': a step needs a range, e.g. {base}-{spec.high}/"
                f"{step_text} or */{step_text}"
            )
    if not slash:
        return range(low, high + 1)
    if not step_text.isdigit() or int(step_text) < 1:
        raise TriggerError(
            f"{where} step '{step_text}' in '{expr}' must be a whole number of at least 1"
        )
    return range(low, high + 1, int(step_text))


def _wrap_bounds(spec: _Field, *, named: bool) -> tuple[str, str]:
    """The field's last and first values, spelled like the user's range (SAT, not 7)."""
    high = min(spec.high, 6) if spec.names is _DAY_NAMES else spec.high
    if named and spec.names:
        by_value = {v: k for k, v in spec.names.items()}
        return by_value[high], by_value[spec.low]
    return str(high), str(spec.low)


def _is_extension(token: str) -> bool:
    """Quartz-style ``?``, ``L``, ``W``, ``#`` that Vixie cron does not have."""
    return token in {"?", "L", "W"} or "#" in token or bool(re.fullmatch(r"\d+[LW]", token, re.I))


def _parse_value(token: str, spec: _Field, expr: str) -> int:
    where = f"cron field '{spec.name}'"
    if token.isdigit():
        value = int(token)
        if not spec.low <= value <= spec.high:
            raise TriggerError(f"{where} value {value} is out of range {spec.allowed} in '{expr}'")
        return value
    upper = token.upper()
    if upper in spec.names:
        return spec.names[upper]
    if _is_extension(token):
        raise TriggerError(
            f"{where} '{token}' in '{expr}' is not standard cron"
            + (": use * instead" if token == "?" else "")
        )
    if spec.names:
        close = (
            [upper[:3]]
            if upper[:3] in spec.names
            else difflib.get_close_matches(upper, list(spec.names), n=1)
        )
        hint = f"did you mean {close[0]}? " if close else ""
        names = ", ".join(spec.names)
        raise TriggerError(
            f"{where} name '{token}' is not known in '{expr}': {hint}use {names} "
            f"or numbers {spec.allowed}"
        )
    for other in _FIELDS:
        if upper in other.names:
            raise TriggerError(
                f"{where} '{token}' in '{expr}' is a {other.name} name; fields are "
                f"{_FIELD_LIST}, in that order"
            )
    raise TriggerError(f"{where} '{token}' in '{expr}' is not a number in {spec.allowed}")


# --------------------------------------------------------------------------- schedules


@runtime_checkable
class Schedule(Protocol):
    """When a rule fires: the first fire strictly after an instant, or None if no more."""

    def next_after(self, after: datetime) -> datetime | None: ...


@dataclass(frozen=True, slots=True)
class ZonedCronSchedule:
    cron: CronSchedule
    tz: tzinfo

    def next_after(self, after: datetime) -> datetime | None:
        return self.cron.next_after(after, self.tz)

    def __str__(self) -> str:
        return f"cron '{self.cron.expr}' in {_tz_name(self.tz)}"


@dataclass(frozen=True, slots=True)
class EverySchedule:
    """Fires at ``anchor + k * interval`` for k >= 1, in real elapsed time.

    Elapsed time, not wall time: across a DST change ``every: 1d`` keeps its UTC
    time and moves an hour on the local clock (use cron for a fixed local time).
    """

    interval: timedelta
    anchor: datetime  # aware
    tz: tzinfo

    def next_after(self, after: datetime) -> datetime | None:
        anchor, moment = _utc(self.anchor), _utc(after)
        steps = 1 if moment < anchor else (moment - anchor) // self.interval + 1
        try:
            return (anchor + steps * self.interval).astimezone(self.tz)
        except OverflowError:
            return None

    def __str__(self) -> str:
        start = "" if _utc(self.anchor) == EPOCH else f" from {self.anchor.isoformat()}"
        return f"every {format_duration(self.interval)}{start}"


@dataclass(frozen=True, slots=True)
class AtSchedule:
    when: datetime  # aware
    tz: tzinfo

    def next_after(self, after: datetime) -> datetime | None:
        return self.when.astimezone(self.tz) if _utc(self.when) > _utc(after) else None

    def __str__(self) -> str:
        return f"at {self.when.astimezone(self.tz).isoformat()}"


def format_duration(interval: timedelta) -> str:
    """A duration as a rule writes it: ``1h30m``."""
    seconds = int(interval.total_seconds())
    parts = []
    for unit, step in _UNITS.items():  # largest first
        size = int(step.total_seconds())
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"


#: Trigger kinds that fire on a schedule (a feed is polled on one, but fires on what it finds).
SCHEDULED = ("cron", "every", "at")
_KINDS = (*SCHEDULED, "event", "poll")


def schedule_for(
    trigger: Mapping[str, object], tz: zoneinfo.ZoneInfo, *, anchor: datetime | None = None
) -> Schedule:
    """The schedule of a rule's ``trigger`` mapping.

    ``timezone`` in the mapping overrides ``tz``. ``poll`` is scheduled by its
    ``every``. ``every`` counts from ``anchor`` (the caller's rule load time);
    without one it counts from the Unix epoch, so ``every: 15m`` falls on :00,
    :15, :30, :45 and the phase survives restarts.
    """
    if not isinstance(trigger, Mapping):
        raise TriggerError(
            f"trigger must be a mapping such as {{cron: '0 9 * * MON'}}, not {trigger!r}"
        )
    unknown = [k for k in trigger if k not in (*_KINDS, "timezone")]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), _KINDS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise TriggerError(
            f"trigger key '{unknown[0]}' is not known: {hint}use one of cron, every, at, "
            "event or poll (and optionally timezone)"
        )
    kinds = [k for k in _KINDS if k in trigger]
    if len(kinds) != 1:
        found = " and ".join(kinds) if kinds else "none"
        raise TriggerError(
            f"a trigger needs exactly one of cron, every, at, event or poll (found {found})"
        )
    if "timezone" in trigger:
        tz = parse_timezone(trigger["timezone"])  # type: ignore[arg-type]
    kind, value = kinds[0], trigger[kinds[0]]
    if kind == "event":
        raise TriggerError("an event trigger fires when its event arrives, not on a schedule")
    if kind == "poll":
        if not isinstance(value, Mapping) or "every" not in value:
            raise TriggerError("poll needs 'every', e.g. poll: {url: ..., every: 5m, ...}")
        kind, value = "every", value["every"]
    if kind == "cron":
        return ZonedCronSchedule(CronSchedule.parse(value), tz)  # type: ignore[arg-type]
    if kind == "every":
        start = EPOCH if anchor is None else _utc(anchor)
        return EverySchedule(parse_duration(value), start.astimezone(tz), tz)  # type: ignore[arg-type]
    return AtSchedule(parse_at(value, tz), tz)


def fire_times(schedule: Schedule, start: datetime, count: int) -> list[datetime]:
    """The next ``count`` fires strictly after ``start`` (fewer if the schedule ends)."""
    fires: list[datetime] = []
    moment: datetime | None = start
    while len(fires) < count and moment is not None:
        moment = schedule.next_after(moment)
        if moment is not None:
            fires.append(moment)
    return fires


def next_fires(
    trigger: Mapping[str, object], timezone: str, start: datetime, count: int
) -> list[datetime]:
    """The next ``count`` fires of a scheduled rule after ``start``, in its ``timezone``: what
    ``pushrules next`` lists (``every`` counted from the epoch)."""
    tz = parse_timezone(timezone)
    schedule = schedule_for(trigger, tz)
    return [t.astimezone(tz) for t in fire_times(schedule, start.astimezone(tz), count)]


#: Missed fires listed at most per rule: catch-up sends only the newest, the rest are logged.
MISSED_LIMIT = 1000


def missed_fires(
    schedule: Schedule, since: datetime, until: datetime, limit: int = MISSED_LIMIT
) -> list[datetime]:
    """Fires in (since, until], oldest first; past ``limit``, the most recent ``limit``.

    The most recent, because catch-up only sends young fires. The window is widened
    backwards from ``until`` by doubling, so a long outage of a frequent schedule
    costs about ``limit`` steps, not one per missed fire.
    """
    if limit <= 0:
        return []
    since, until = _utc(since), _utc(until)
    window = timedelta(hours=1)
    while since < until:
        start = since if window >= until - since else until - window
        fires = _fires_between(schedule, start, until, limit)
        if len(fires) >= limit or start == since:
            return fires
        window *= 2
    return []


def _fires_between(
    schedule: Schedule, since: datetime, until: datetime, limit: int
) -> list[datetime]:
    kept: deque[datetime] = deque(maxlen=limit)
    moment = schedule.next_after(since)
    while moment is not None and _utc(moment) <= until:
        kept.append(moment)
        moment = schedule.next_after(moment)
    return list(kept)
