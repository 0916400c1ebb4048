"""The crontab code against cronsim, on random expressions and zones, near DST changes.

cronsim (a test dependency) follows Debian cron on DST, as engine/rules/schedule.py does; the
random comparison runs where the two agree, and the known differences, where pushrules is
right, are listed one by one below.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import cache
from zoneinfo import ZoneInfo

import pytest
from cronsim import CronSim
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.rules.schedule import schedule_for
from tests.helpers import examples

#: Whole-hour DST changes (Troll: two hours), half-hour offsets, no DST, southern summers.
ZONES = (
    "UTC",
    "Europe/Paris",
    "Europe/London",
    "America/New_York",
    "America/St_Johns",
    "America/Sao_Paulo",
    "Australia/Sydney",
    "Antarctica/Troll",
    "Asia/Kolkata",
)
FIRES = 6


@cache
def transitions(zone: str) -> tuple[datetime, ...]:
    """Instants (UTC, to the half hour) where the zone's offset changes, 2020-2030."""
    tz = ZoneInfo(zone)
    found: list[datetime] = []
    day = datetime(2020, 1, 1, tzinfo=UTC)
    while day < datetime(2031, 1, 1, tzinfo=UTC):
        if day.astimezone(tz).utcoffset() != (day + timedelta(days=1)).astimezone(tz).utcoffset():
            steps = (day + timedelta(minutes=30 * n) for n in range(1, 49))
            found.append(
                next(
                    t
                    for t in steps
                    if t.astimezone(tz).utcoffset() != day.astimezone(tz).utcoffset()
                )
            )
        day += timedelta(days=1)
    return tuple(found) or (datetime(2026, 3, 29, 1, tzinfo=UTC),)


def field(lo: int, hi: int) -> st.SearchStrategy[str]:
    """A crontab field: ``*``, or a list of values, ranges, stepped ranges and ``*/n``.

    No one-value range with a step (``1-1/2``): cronsim reads it as ``*`` (listed below).
    """
    value = st.integers(lo, hi)
    step = st.integers(1, hi - lo + 1)
    pair = st.tuples(value, value).map(sorted)
    item = st.one_of(
        value.map(str),
        pair.map(lambda p: f"{p[0]}-{p[1]}"),
        st.tuples(pair.filter(lambda p: p[0] != p[1]), step).map(
            lambda t: f"{t[0][0]}-{t[0][1]}/{t[1]}"
        ),
        step.map(lambda n: f"*/{n}"),
    )
    return st.one_of(st.just("*"), st.lists(item, min_size=1, max_size=3).map(",".join))


EXPRESSIONS = st.tuples(field(0, 59), field(0, 23), field(1, 28), field(1, 12), field(0, 6)).map(
    " ".join
)


@st.composite
def zone_and_start(draw: st.DrawFn) -> tuple[str, datetime]:
    """A zone, and a start up to 36 hours before one of its offset changes (or 2 after)."""
    zone = draw(st.sampled_from(ZONES))
    change = draw(st.sampled_from(transitions(zone)))
    return zone, change + timedelta(minutes=draw(st.integers(-36 * 60, 120)))


def ours(expr: str, tz: ZoneInfo, start: datetime, count: int = FIRES) -> list[datetime]:
    schedule = schedule_for({"cron": expr}, tz)
    fires: list[datetime] = []
    moment = start
    for _ in range(count):
        nxt = schedule.next_after(moment)
        assert nxt is not None
        fires.append(nxt.astimezone(UTC))
        moment = nxt
    return fires


def theirs(expr: str, tz: ZoneInfo, start: datetime, count: int = FIRES) -> list[datetime]:
    fires = CronSim(expr, start.astimezone(tz))
    return [next(fires).astimezone(UTC) for _ in range(count)]


# derandomize: the same 400 examples on every run, so a difference found in cronsim (a library
# we do not control) shows here when it is looked for, not as a random red CI run.
@settings(
    max_examples=examples(400),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(EXPRESSIONS, zone_and_start())
def test_cron_fires_as_cronsim_says(expr: str, zone_start: tuple[str, datetime]) -> None:
    zone, start = zone_start
    tz = ZoneInfo(zone)
    mine, cronsim = ours(expr, tz, start), theirs(expr, tz, start)
    if cronsim[0] <= start:
        # cronsim's known defect inside a repeated hour: an answer before the start (see
        # KNOWN: chatham, paris). Ours must still move forward.
        assert start < mine[0] and mine == sorted(set(mine)), (expr, zone, start.isoformat())
        return
    assert mine == cronsim, (expr, zone, start.isoformat())


# --------------------------------------------------------------------------- known differences
# Each: expression, zone, start, pushrules' first fire (right, and why), cronsim's.

KNOWN = [
    pytest.param(
        "* 15 * * *",
        "Australia/Lord_Howe",  # DST changes by 30 minutes
        "2020-04-05T01:39:00+10:30",
        "2020-04-05T15:00:00+10:30",  # 15:00 exists that day, 13 hours after the change
        "2020-04-05T15:30:00+10:30",  # cronsim loses half an hour after a 30-minute change
        id="lord-howe-30-minute-dst",
    ),
    pytest.param(
        "0 3 * * *",
        "Pacific/Chatham",  # UTC+12:45/+13:45: the repeated hour is 02:45-03:44
        "2020-04-05T02:45:00+12:45",
        "2020-04-06T03:00:00+12:45",  # 03:00 came once already, before the start (Vixie)
        "2020-04-05T03:00:00+13:45",  # cronsim answers an instant before the start
        id="chatham-45-minute-offset",
    ),
    pytest.param(
        "1 2 * * *",
        "Europe/Paris",  # 2020-10-25: 02:00-02:59 comes twice, first CEST then CET
        "2020-10-25T02:00:00+01:00",  # the second 02:00, after 02:01 CEST has fired
        "2020-10-26T02:01:00+01:00",  # a repeated time fires on its first occurrence (Vixie)
        "2020-10-25T02:01:00+02:00",  # cronsim answers an instant before the start
        id="paris-repeated-hour",
    ),
    pytest.param(
        "* * * * 0-0/1",
        "UTC",
        "2015-01-01T00:00:00+00:00",  # a Thursday
        "2015-01-04T00:00:00+00:00",  # 0-0/1 is Sunday only
        "2015-01-01T00:01:00+00:00",  # cronsim reads a one-value stepped range as *
        id="one-value-stepped-range",
    ),
]


@pytest.mark.parametrize(("expr", "zone", "start", "right", "cronsim"), KNOWN)
def test_known_differences_with_cronsim(
    expr: str, zone: str, start: str, right: str, cronsim: str
) -> None:
    tz = ZoneInfo(zone)
    moment = datetime.fromisoformat(start)
    assert ours(expr, tz, moment, 1) == [datetime.fromisoformat(right)]
    # Still a difference: if cronsim changes, move the case into the random comparison.
    assert theirs(expr, tz, moment, 1) == [datetime.fromisoformat(cronsim)]
