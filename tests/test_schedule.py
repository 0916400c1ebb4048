"""engine.rules.schedule: crontab meaning, Vixie DST behaviour, every/at, errors."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from engine.rules.schedule import (
    AtSchedule,
    CronSchedule,
    EverySchedule,
    Schedule,
    TriggerError,
    ZonedCronSchedule,
    fire_times,
    missed_fires,
    parse_at,
    parse_duration,
    parse_timezone,
    schedule_for,
)
from tests.helpers import examples

PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")
UTC_ZONE = ZoneInfo("UTC")
MINUTE = timedelta(minutes=1)

FAST = settings(
    deadline=None, max_examples=examples(60), suppress_health_check=[HealthCheck.too_slow]
)


def cron(expr: str, tz: ZoneInfo = UTC_ZONE) -> Schedule:
    return schedule_for({"cron": expr}, tz)


def iso(fires: list[datetime]) -> list[str]:
    return [f.isoformat() for f in fires]


def local(text: str, tz: ZoneInfo = UTC_ZONE, fold: int = 0) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=tz, fold=fold)


# --------------------------------------------------------------------------- crontab meaning

CRON_TABLE = [
    # expr, after (UTC), next fires (UTC, naive iso)
    ("0 9 * * MON", "2026-01-01T00:00", ["2026-01-05T09:00", "2026-01-12T09:00"]),
    ("0 9 * * mon", "2026-01-01T00:00", ["2026-01-05T09:00", "2026-01-12T09:00"]),
    ("0 9 * * 0", "2026-01-01T00:00", ["2026-01-04T09:00", "2026-01-11T09:00"]),
    ("0 9 * * 7", "2026-01-01T00:00", ["2026-01-04T09:00", "2026-01-11T09:00"]),
    ("0 9 * * Sun", "2026-01-01T00:00", ["2026-01-04T09:00", "2026-01-11T09:00"]),
    (
        "0 9 * * 5-7",
        "2026-01-01T00:00",
        ["2026-01-02T09:00", "2026-01-03T09:00", "2026-01-04T09:00"],
    ),
    ("0 9 * * MON-FRI", "2026-01-02T10:00", ["2026-01-05T09:00", "2026-01-06T09:00"]),
    (
        "*/15 * * * *",
        "2026-01-01T10:07",
        ["2026-01-01T10:15", "2026-01-01T10:30", "2026-01-01T10:45", "2026-01-01T11:00"],
    ),
    (
        "5-20/5 * * * *",
        "2026-01-01T10:00",
        [
            "2026-01-01T10:05",
            "2026-01-01T10:10",
            "2026-01-01T10:15",
            "2026-01-01T10:20",
            "2026-01-01T11:05",
        ],
    ),
    (
        "1-5/2 * * * *",
        "2026-01-01T10:00",
        ["2026-01-01T10:01", "2026-01-01T10:03", "2026-01-01T10:05", "2026-01-01T11:01"],
    ),
    (
        "0,30 8-9 * * *",
        "2026-01-01T00:00",
        [
            "2026-01-01T08:00",
            "2026-01-01T08:30",
            "2026-01-01T09:00",
            "2026-01-01T09:30",
            "2026-01-02T08:00",
        ],
    ),
    (
        "0 0 1,15 * *",
        "2026-01-01T00:00",
        ["2026-01-15T00:00", "2026-02-01T00:00", "2026-02-15T00:00"],
    ),
    (
        "0 12 1 JAN-MAR/2 *",
        "2026-01-01T00:00",
        ["2026-01-01T12:00", "2026-03-01T12:00", "2027-01-01T12:00"],
    ),
    ("0 12 1 jan,Jul *", "2026-01-02T00:00", ["2026-07-01T12:00", "2027-01-01T12:00"]),
    (
        "0 0 31 * *",
        "2026-01-31T00:00",
        ["2026-03-31T00:00", "2026-05-31T00:00", "2026-07-31T00:00"],
    ),
    ("30 23 31 12 *", "2026-06-01T00:00", ["2026-12-31T23:30", "2027-12-31T23:30"]),
    (
        "59 23 * * SAT,SUN",
        "2026-01-01T00:00",
        ["2026-01-03T23:59", "2026-01-04T23:59", "2026-01-10T23:59"],
    ),
    # both day fields restricted: either matches (Vixie); 13 Mar 2026 is a Friday
    (
        "0 0 13 * FRI",
        "2026-03-01T00:00",
        [
            "2026-03-06T00:00",
            "2026-03-13T00:00",
            "2026-03-20T00:00",
            "2026-03-27T00:00",
            "2026-04-03T00:00",
            "2026-04-10T00:00",
            "2026-04-13T00:00",
            "2026-04-17T00:00",
        ],
    ),
    # a day field starting with * makes it AND again (Vixie): odd days that are Fridays
    (
        "0 0 */2 * FRI",
        "2026-01-01T00:00",
        ["2026-01-09T00:00", "2026-01-23T00:00", "2026-02-13T00:00"],
    ),
    ("0 0 1 * */7", "2026-01-02T00:00", ["2026-02-01T00:00", "2026-03-01T00:00"]),
    # leap day, and across the non-leap year 2100
    ("0 0 29 2 *", "2026-01-01T00:00", ["2028-02-29T00:00", "2032-02-29T00:00"]),
    ("0 0 29 2 *", "2096-03-01T00:00", ["2104-02-29T00:00"]),
    ("0 0 29 2 MON", "2026-03-01T00:00", ["2027-02-01T00:00", "2027-02-08T00:00"]),
    ("@yearly", "2026-05-05T00:00", ["2027-01-01T00:00", "2028-01-01T00:00"]),
    ("@annually", "2026-05-05T00:00", ["2027-01-01T00:00"]),
    ("@monthly", "2026-05-05T00:00", ["2026-06-01T00:00", "2026-07-01T00:00"]),
    ("@weekly", "2026-01-01T00:00", ["2026-01-04T00:00", "2026-01-11T00:00"]),
    ("@daily", "2026-01-01T00:00", ["2026-01-02T00:00", "2026-01-03T00:00"]),
    ("@midnight", "2026-01-01T12:00", ["2026-01-02T00:00"]),
    ("@hourly", "2026-01-01T10:59", ["2026-01-01T11:00", "2026-01-01T12:00"]),
    ("@DAILY", "2026-01-01T00:00", ["2026-01-02T00:00"]),
    ("  0   9  *  * MON ", "2026-01-01T00:00", ["2026-01-05T09:00"]),
]


@pytest.mark.parametrize(("expr", "after", "expected"), CRON_TABLE)
def test_cron_table(expr: str, after: str, expected: list[str]) -> None:
    fires = fire_times(cron(expr), local(after), len(expected))
    assert [f.strftime("%Y-%m-%dT%H:%M") for f in fires] == expected


def test_parsed_values() -> None:
    parsed = CronSchedule.parse("1-5/2 */6 1,15 JAN-MAR 5-7")
    assert parsed.minutes == (1, 3, 5)
    assert parsed.hours == (0, 6, 12, 18)
    assert parsed.days == (1, 15)
    assert parsed.months == (1, 2, 3)
    assert parsed.weekdays == (0, 5, 6)
    assert parsed.day_or
    assert parsed.real_time
    assert not CronSchedule.parse("0 9 * * *").real_time
    assert CronSchedule.parse("* 9 * * *").real_time
    assert not CronSchedule.parse("0 0-23 * * *").real_time  # Vixie only looks for a leading *
    assert not CronSchedule.parse("0 0 */2 * FRI").day_or
    hourly = CronSchedule.parse("@hourly")
    assert (hourly.minutes, hourly.hours, hourly.real_time) == ((0,), tuple(range(24)), True)
    assert str(hourly) == "@hourly"


def test_cron_returns_aware_in_rule_timezone() -> None:
    after = datetime(2026, 3, 20, 12, tzinfo=UTC)
    fire = cron("0 9 * * SUN", PARIS).next_after(after)
    assert fire is not None
    assert fire.tzinfo is PARIS
    assert fire.isoformat() == "2026-03-22T09:00:00+01:00"
    assert cron("0 9 * * SUN", PARIS).next_after(fire).isoformat() == "2026-03-29T09:00:00+02:00"
    # the instant counts, not the zone it is written in
    assert cron("0 9 * * SUN", PARIS).next_after(after.astimezone(NEW_YORK)) == fire


def test_next_after_is_strict() -> None:
    at_nine = local("2026-01-05T09:00")
    schedule = cron("0 9 * * MON")
    assert schedule.next_after(at_nine) == local("2026-01-12T09:00")
    assert schedule.next_after(at_nine - timedelta(microseconds=1)) == at_nine


def test_naive_datetime_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        cron("0 9 * * MON").next_after(datetime(2026, 1, 1))


def test_far_future_ends() -> None:
    assert cron("0 0 1 1 *").next_after(datetime(9999, 6, 1, tzinfo=UTC)) is None
    assert cron("0 0 1 1 *").next_after(datetime(9998, 6, 1, tzinfo=UTC)).year == 9999


def test_search_skips_instead_of_scanning() -> None:
    """Rare schedules stay cheap: whole months and days are skipped."""
    begin = time.thread_time()  # processor time: a busy machine does not slow the search
    fires = fire_times(cron("0 0 29 2 MON", PARIS), datetime(2026, 1, 1, tzinfo=UTC), 200)
    rare = fire_times(cron("0 0 */10 2 MON"), datetime(2026, 1, 1, tzinfo=UTC), 20)
    yearly = fire_times(cron("* * 29 2 *", NEW_YORK), datetime(2026, 1, 1, tzinfo=UTC), 3)
    assert time.thread_time() - begin < 3
    assert len(fires) == 200 and len(rare) == 20
    assert iso(yearly)[0] == "2028-02-29T00:00:00-05:00"


CRON_ERRORS = [
    ("", "cron is empty"),
    ("0 9 * *", "has 4 fields but needs 5 (minute hour day-of-month month day-of-week)"),
    ("0 0 9 * * MON", "has 6 fields but needs 5"),
    ("0 0 9 * * MON 2026", "seconds and years are not supported"),
    ("0 9 * * 8", "cron field 'day of week' value 8 is out of range 0-7 (0 and 7 are Sunday)"),
    ("60 9 * * *", "cron field 'minute' value 60 is out of range 0-59"),
    ("0 24 * * *", "cron field 'hour' value 24 is out of range 0-23"),
    ("0 0 0 * *", "cron field 'day of month' value 0 is out of range 1-31"),
    ("0 0 32 * *", "value 32 is out of range 1-31"),
    ("0 0 1 13 *", "cron field 'month' value 13 is out of range 1-12"),
    ("0 9 * * MONDAY", "did you mean MON?"),
    ("0 9 * * LUN", "name 'LUN' is not known"),
    ("0 9 * JANUARY *", "did you mean JAN?"),
    ("0 MON * * *", "'MON' in '0 MON * * *' is a day of week name"),
    ("0 9 * * 1,,2", "empty value"),
    ("0 9 * * 1,", "empty value"),
    ("*/0 * * * *", "step '0'"),
    ("*/x * * * *", "step 'x'"),
    ("5/15 * * * *", "a step needs a range, e.g. 5-59/15 or */15"),
    ("0 9 * * FRI-MON", "runs backwards"),
    ("0 9 * * FRI-MON", "FRI-SAT,SUN-MON"),
    ("0 9 ? * MON", "use * instead"),
    ("0 9 L * *", "not standard cron"),
    ("0 9 * * 5#2", "not standard cron"),
    ("0 0 30 2 *", "would never fire: February has no day 30"),
    ("0 0 31 2,4 *", "February and April have no day 31"),
    ("0 0 30,31 FEB *", "February has no day 30, 31"),
    ("@reboot", "use an event trigger"),
    ("@dayly", "did you mean '@daily'?"),
    ("9:00 * * * *", "cron field 'minute' '9:00'"),
    ("-5 * * * *", "'-5' in '-5 * * * *' is not understood"),
    ("1-2-3 * * * *", "is not understood"),
]


@pytest.mark.parametrize(("expr", "message"), CRON_ERRORS)
def test_cron_errors(expr: str, message: str) -> None:
    with pytest.raises(TriggerError) as error:
        CronSchedule.parse(expr)
    assert message in str(error.value)


def test_cron_must_be_text() -> None:
    with pytest.raises(TriggerError, match="must be text"):
        CronSchedule.parse(9)  # type: ignore[arg-type]


def test_impossible_day_with_weekday_or_is_possible() -> None:
    """Both day fields restricted: the weekday alone can match, so this is not an error."""
    fires = fire_times(cron("0 0 31 2 MON"), local("2026-01-01T00:00"), 2)
    assert [f.date() for f in fires] == [date(2026, 2, 2), date(2026, 2, 9)]


# --------------------------------------------------------------------------- DST, Vixie style

DST_TABLE = [
    # Paris spring: 02:00 CET -> 03:00 CEST on 2026-03-29 (01:00 UTC)
    (
        "30 2 * * *",
        PARIS,
        "2026-03-28T12:00+01:00",
        ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"],
    ),
    (
        "0 2 * * *",
        PARIS,
        "2026-03-28T12:00+01:00",
        ["2026-03-29T03:00:00+02:00", "2026-03-30T02:00:00+02:00"],
    ),
    (
        "0,30 2 * * *",
        PARIS,
        "2026-03-28T12:00+01:00",
        ["2026-03-29T03:00:00+02:00", "2026-03-30T02:00:00+02:00"],
    ),
    (
        "0 2,3 * * *",
        PARIS,
        "2026-03-28T12:00+01:00",
        ["2026-03-29T03:00:00+02:00", "2026-03-30T02:00:00+02:00"],
    ),
    (
        "0 * * * *",
        PARIS,
        "2026-03-29T00:30+01:00",
        ["2026-03-29T01:00:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-29T04:00:00+02:00"],
    ),
    (
        "*/15 * * * *",
        PARIS,
        "2026-03-29T01:30+01:00",
        ["2026-03-29T01:45:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-29T03:15:00+02:00"],
    ),
    ("* 2 * * *", PARIS, "2026-03-29T00:00+01:00", ["2026-03-30T02:00:00+02:00"]),
    # Paris autumn: 03:00 CEST -> 02:00 CET on 2026-10-25 (01:00 UTC)
    (
        "30 2 * * *",
        PARIS,
        "2026-10-24T12:00+02:00",
        ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"],
    ),
    (
        "0 2,3 * * *",
        PARIS,
        "2026-10-24T12:00+02:00",
        ["2026-10-25T02:00:00+02:00", "2026-10-25T03:00:00+01:00", "2026-10-26T02:00:00+01:00"],
    ),
    (
        "0 * * * *",
        PARIS,
        "2026-10-25T00:30+02:00",
        [
            "2026-10-25T01:00:00+02:00",
            "2026-10-25T02:00:00+02:00",
            "2026-10-25T02:00:00+01:00",
            "2026-10-25T03:00:00+01:00",
        ],
    ),
    (
        "*/15 * * * *",
        PARIS,
        "2026-10-25T02:30+02:00",
        [
            "2026-10-25T02:45:00+02:00",
            "2026-10-25T02:00:00+01:00",
            "2026-10-25T02:15:00+01:00",
            "2026-10-25T02:30:00+01:00",
            "2026-10-25T02:45:00+01:00",
            "2026-10-25T03:00:00+01:00",
        ],
    ),
    # New York spring: 02:00 EST -> 03:00 EDT on 2026-03-08 (07:00 UTC)
    (
        "30 2 * * *",
        NEW_YORK,
        "2026-03-07T12:00-05:00",
        ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"],
    ),
    (
        "0 * * * *",
        NEW_YORK,
        "2026-03-08T00:30-05:00",
        ["2026-03-08T01:00:00-05:00", "2026-03-08T03:00:00-04:00"],
    ),
    (
        "*/15 * * * *",
        NEW_YORK,
        "2026-03-08T01:40-05:00",
        ["2026-03-08T01:45:00-05:00", "2026-03-08T03:00:00-04:00"],
    ),
    # New York autumn: 02:00 EDT -> 01:00 EST on 2026-11-01 (06:00 UTC)
    (
        "30 1 * * *",
        NEW_YORK,
        "2026-10-31T12:00-04:00",
        ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"],
    ),
    (
        "0 * * * *",
        NEW_YORK,
        "2026-11-01T00:30-04:00",
        ["2026-11-01T01:00:00-04:00", "2026-11-01T01:00:00-05:00", "2026-11-01T02:00:00-05:00"],
    ),
    (
        "*/15 * * * *",
        NEW_YORK,
        "2026-11-01T01:40-04:00",
        ["2026-11-01T01:45:00-04:00", "2026-11-01T01:00:00-05:00", "2026-11-01T01:15:00-05:00"],
    ),
]


@pytest.mark.parametrize(("expr", "tz", "after", "expected"), DST_TABLE)
def test_dst_like_vixie(expr: str, tz: ZoneInfo, after: str, expected: list[str]) -> None:
    fires = fire_times(cron(expr, tz), datetime.fromisoformat(after), len(expected))
    assert iso(fires) == expected
    assert all(f.tzinfo is tz for f in fires)


def test_gap_fire_is_the_instant_of_the_change() -> None:
    fire = cron("30 2 * * *", PARIS).next_after(datetime(2026, 3, 28, 12, tzinfo=UTC))
    assert fire is not None
    assert fire.astimezone(UTC) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)


def test_repeated_hour_fires_a_fixed_job_once() -> None:
    """From inside the repeated hour, a fixed time already reached is not run again."""
    schedule = cron("45 2 * * *", PARIS)
    first_pass = datetime(2026, 10, 25, 2, 40, tzinfo=PARIS, fold=0)  # 02:40 CEST
    second_pass = datetime(2026, 10, 25, 2, 10, tzinfo=PARIS, fold=1)  # 02:10 CET
    assert schedule.next_after(first_pass).isoformat() == "2026-10-25T02:45:00+02:00"
    assert schedule.next_after(second_pass).isoformat() == "2026-10-26T02:45:00+01:00"
    assert cron("0 3 * * *", PARIS).next_after(second_pass).isoformat() == (
        "2026-10-25T03:00:00+01:00"
    )


def test_a_day_in_the_repeated_hour() -> None:
    """Every minute of 02:xx runs twice in autumn and never in spring."""
    schedule = cron("* 2 * * *", PARIS)
    autumn = missed_fires(
        schedule, datetime(2026, 10, 24, 23, tzinfo=UTC), datetime(2026, 10, 25, 23, tzinfo=UTC)
    )
    assert len(autumn) == 120
    assert len({f.astimezone(UTC) for f in autumn}) == 120
    spring = missed_fires(
        schedule, datetime(2026, 3, 28, 23, tzinfo=UTC), datetime(2026, 3, 29, 22, tzinfo=UTC)
    )
    assert spring == []


def _vixie_reference(
    parsed: CronSchedule, tz: ZoneInfo, start: datetime, end: datetime
) -> list[datetime]:
    """Vixie's own algorithm, minute by minute of real time, as an independent oracle.

    Real-time jobs run when the local minute matches; fixed-time jobs run for every
    local minute newly reached by the running maximum of the local clock (Vixie's
    "virtual time"), so a skipped minute runs at the change, a repeated one never.
    """
    fires = []
    moment = start - timedelta(days=1)
    reached = (moment.astimezone(tz).replace(tzinfo=None)).replace(second=0)
    while moment <= end:
        wall = moment.astimezone(tz).replace(tzinfo=None)
        if parsed.real_time:
            due = parsed.matches(wall)
        else:
            due = False
            probe = reached + MINUTE
            while probe <= wall and not due:
                due = parsed.matches(probe)
                probe += MINUTE
            reached = max(reached, wall)
        if due and moment > start:
            fires.append(moment)
        moment += MINUTE
    return fires


def _field(values: st.SearchStrategy[int], step_max: int) -> st.SearchStrategy[str]:
    single = values.map(str)
    ranged = st.tuples(values, values).map(lambda p: f"{min(p)}-{max(p)}")
    stepped = st.tuples(values, values, st.integers(1, step_max)).map(
        lambda p: f"{min(p[0], p[1])}-{max(p[0], p[1])}/{p[2]}"
    )
    star = st.sampled_from(["*"]) | st.integers(1, step_max).map(lambda s: f"*/{s}")
    listed = st.lists(single | ranged, min_size=2, max_size=3).map(",".join)
    return star | single | ranged | stepped | listed


DST_DAYS = [
    (PARIS, datetime(2026, 3, 29, 1, tzinfo=UTC)),
    (PARIS, datetime(2026, 10, 25, 1, tzinfo=UTC)),
    (NEW_YORK, datetime(2026, 3, 8, 7, tzinfo=UTC)),
    (NEW_YORK, datetime(2026, 11, 1, 6, tzinfo=UTC)),
]


@pytest.mark.parametrize(
    ("tz", "change"), DST_DAYS, ids=["paris-spring", "paris-autumn", "ny-spring", "ny-autumn"]
)
@settings(deadline=None, max_examples=examples(25), suppress_health_check=[HealthCheck.too_slow])
@given(
    minute=_field(st.integers(0, 59), 30),
    hour=_field(st.integers(0, 4), 3),
)
def test_dst_matches_vixie_reference(
    tz: ZoneInfo, change: datetime, minute: str, hour: str
) -> None:
    parsed = CronSchedule.parse(f"{minute} {hour} * * *")
    start, end = change - timedelta(hours=6), change + timedelta(hours=6)
    expected = _vixie_reference(parsed, tz, start, end)
    actual = [f.astimezone(UTC) for f in missed_fires(cron(parsed.expr, tz), start, end, 10_000)]
    assert actual == expected


# --------------------------------------------------------------------------- properties

CRON_EXPRS = st.builds(
    lambda *fields: " ".join(fields),
    _field(st.integers(0, 59), 30),
    _field(st.integers(0, 23), 12),
    _field(st.integers(1, 31), 15) | st.just("*"),
    _field(st.integers(1, 12), 6) | st.just("*"),
    _field(st.integers(0, 7), 3) | st.just("*"),
)
INSTANTS = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2060, 12, 31), timezones=st.just(UTC)
)
ZONES = st.sampled_from([UTC_ZONE, PARIS, NEW_YORK, ZoneInfo("Australia/Lord_Howe")])


def _parse_or_skip(expr: str) -> CronSchedule:
    try:
        return CronSchedule.parse(expr)
    except TriggerError:
        assume(False)
        raise


@FAST
@given(expr=CRON_EXPRS, after=INSTANTS)
def test_next_fire_matches_and_nothing_is_skipped_in_utc(expr: str, after: datetime) -> None:
    parsed = _parse_or_skip(expr)
    fire = parsed.next_after(after, UTC_ZONE)
    assert fire is not None
    assert fire > after
    assert parsed.matches(fire.replace(tzinfo=None))
    if fire - after <= timedelta(hours=6):  # nothing matching in between
        probe = after.replace(second=0, microsecond=0) + MINUTE
        while probe < fire:
            assert not parsed.matches(probe.replace(tzinfo=None))
            probe += MINUTE


@FAST
@given(expr=CRON_EXPRS, tz=ZONES, after=INSTANTS, data=st.data())
def test_next_after_is_strict_consistent_and_monotonic(
    expr: str, tz: ZoneInfo, after: datetime, data: st.DataObject
) -> None:
    parsed = _parse_or_skip(expr)
    fire = parsed.next_after(after, tz)
    assert fire is not None
    fire_utc = fire.astimezone(UTC)
    assert fire_utc > after
    assert fire.tzinfo is tz
    # any instant before the fire leads to the same fire: none was skipped
    span = (fire_utc - after) // timedelta(microseconds=1)
    offset = timedelta(microseconds=data.draw(st.integers(0, span - 1)))
    assert parsed.next_after(after + offset, tz).astimezone(UTC) == fire_utc
    # later start, later (or same) fire
    later = after + data.draw(st.timedeltas(timedelta(0), timedelta(days=40)))
    later_fire = parsed.next_after(later, tz)
    assert later_fire is not None
    assert later_fire.astimezone(UTC) >= fire_utc
    # the local time matches unless a spring gap moved a fixed-time job
    moved_by_gap = not parsed.real_time and _just_after_a_gap(fire_utc, tz)
    assert parsed.matches(fire.replace(tzinfo=None)) or moved_by_gap


def _just_after_a_gap(instant: datetime, tz: ZoneInfo) -> bool:
    before = (instant - timedelta(seconds=1)).astimezone(tz).utcoffset()
    return before is not None and before < instant.astimezone(tz).utcoffset()


@FAST
@given(expr=CRON_EXPRS, tz=ZONES, after=INSTANTS)
def test_fire_times_strictly_increase(expr: str, tz: ZoneInfo, after: datetime) -> None:
    parsed = _parse_or_skip(expr)
    fires = [f.astimezone(UTC) for f in fire_times(ZonedCronSchedule(parsed, tz), after, 5)]
    assert len(fires) == 5
    assert fires == sorted(set(fires))
    assert all(f > after for f in fires)


# --------------------------------------------------------------------------- every


def test_every_from_anchor() -> None:
    anchor = datetime(2026, 1, 1, 10, 7, 30, tzinfo=PARIS)
    schedule = schedule_for({"every": "15m"}, PARIS, anchor=anchor)
    assert isinstance(schedule, EverySchedule)
    assert iso(fire_times(schedule, anchor - timedelta(days=1), 3)) == [
        "2026-01-01T10:22:30+01:00",
        "2026-01-01T10:37:30+01:00",
        "2026-01-01T10:52:30+01:00",
    ]
    assert schedule.next_after(anchor + timedelta(minutes=15)).isoformat() == (
        "2026-01-01T10:37:30+01:00"
    )
    assert schedule.next_after(datetime(2026, 1, 1, 10, 30, tzinfo=PARIS)).isoformat() == (
        "2026-01-01T10:37:30+01:00"
    )


def test_every_without_anchor_counts_from_the_epoch() -> None:
    schedule = schedule_for({"every": "15m"}, PARIS)
    assert iso(fire_times(schedule, datetime(2026, 1, 1, 10, 7, tzinfo=PARIS), 2)) == [
        "2026-01-01T10:15:00+01:00",
        "2026-01-01T10:30:00+01:00",
    ]


def test_every_counts_real_time_across_dst() -> None:
    anchor = datetime(2026, 3, 28, 9, tzinfo=PARIS)
    day = schedule_for({"every": "1d"}, PARIS, anchor=anchor)
    assert iso(fire_times(day, anchor, 2)) == [
        "2026-03-29T10:00:00+02:00",
        "2026-03-30T10:00:00+02:00",
    ]
    hourly = schedule_for({"every": "1h"}, PARIS, anchor=datetime(2026, 10, 24, 23, tzinfo=UTC))
    assert iso(fire_times(hourly, datetime(2026, 10, 24, 23, tzinfo=UTC), 2)) == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:00:00+01:00",
    ]


@FAST
@given(
    seconds=st.integers(1, 10 * 86400),
    anchor=INSTANTS,
    after=INSTANTS,
)
def test_every_property(seconds: int, anchor: datetime, after: datetime) -> None:
    interval = timedelta(seconds=seconds)
    schedule = EverySchedule(interval, anchor, PARIS)
    local_fire = schedule.next_after(after)
    assert local_fire is not None and local_fire.tzinfo is PARIS
    fire = local_fire.astimezone(UTC)  # arithmetic in Paris time would be by wall clock
    assert fire > after and fire > anchor
    steps, remainder = divmod(fire - anchor, interval)
    assert remainder == timedelta(0) and steps >= 1
    assert fire - interval <= max(after, anchor)


# --------------------------------------------------------------------------- at


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-24 18:00", "2026-12-24T18:00:00+01:00"),
        ("2026-12-24T18:00", "2026-12-24T18:00:00+01:00"),
        ("2026-12-24T18:00:30", "2026-12-24T18:00:30+01:00"),
        ("2026-07-14 09:30", "2026-07-14T09:30:00+02:00"),
        # an explicit offset wins over the rule's timezone (same instant, shown in Paris)
        ("2026-12-24T18:00:00+00:00", "2026-12-24T19:00:00+01:00"),
        ("2026-12-24T18:00Z", "2026-12-24T19:00:00+01:00"),
        ("2026-12-24T18:00-0500", "2026-12-25T00:00:00+01:00"),
        # skipped by the spring change: moves to the end of the gap; repeated: first one
        ("2026-03-29 02:30", "2026-03-29T03:00:00+02:00"),
        ("2026-10-25 02:30", "2026-10-25T02:30:00+02:00"),
    ],
)
def test_parse_at(text: str, expected: str) -> None:
    moment = parse_at(text, PARIS)
    assert moment.isoformat() == expected
    assert moment.tzinfo is PARIS


def test_parse_at_new_york_gap() -> None:
    assert parse_at("2026-03-08 02:15", NEW_YORK).isoformat() == "2026-03-08T03:00:00-04:00"
    assert parse_at("2026-11-01 01:15", NEW_YORK).isoformat() == "2026-11-01T01:15:00-04:00"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2026-12-24", "is not understood"),
        ("24/12/2026 18:00", "is not understood"),
        ("2026-02-30 10:00", "is not a real date and time"),
        ("2026-12-24 25:00", "is not a real date and time"),
        ("tomorrow", "is not understood"),
        (date(2026, 12, 24), "has no time"),
        (1800, "must be a date and time"),
    ],
)
def test_parse_at_errors(text: object, message: str) -> None:
    with pytest.raises(TriggerError, match=message):
        parse_at(text, PARIS)  # type: ignore[arg-type]


def test_at_schedule_fires_once() -> None:
    schedule = schedule_for({"at": "2026-12-24 18:00"}, PARIS)
    assert isinstance(schedule, AtSchedule)
    before = datetime(2026, 12, 1, tzinfo=UTC)
    assert iso(fire_times(schedule, before, 5)) == ["2026-12-24T18:00:00+01:00"]
    assert schedule.next_after(datetime(2026, 12, 24, 17, tzinfo=UTC)) is None


def test_at_from_yaml_datetimes() -> None:
    """PyYAML turns an unquoted timestamp with seconds into a datetime."""
    naive = schedule_for({"at": datetime(2026, 12, 24, 18, 0)}, PARIS)
    aware = schedule_for({"at": datetime(2026, 12, 24, 18, 0, tzinfo=UTC)}, PARIS)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert naive.next_after(start).isoformat() == "2026-12-24T18:00:00+01:00"
    assert aware.next_after(start).isoformat() == "2026-12-24T19:00:00+01:00"
    with pytest.raises(TriggerError, match="has no time"):
        schedule_for({"at": date(2026, 12, 24)}, PARIS)


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10s", timedelta(seconds=10)),
        ("1s", timedelta(seconds=1)),
        ("15m", timedelta(minutes=15)),
        ("2h", timedelta(hours=2)),
        ("2d", timedelta(days=2)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1h 30m", timedelta(hours=1, minutes=30)),
        ("1d2h3m4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        (" 90m ", timedelta(minutes=90)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("15", "has no unit: write e.g. 15s, 15m or 15h"),
        (15, "has no unit: write it as 15s, 15m, 15h or 15d"),
        ("0m", "must be at least 1s"),
        ("0s", "must be at least 1s"),
        ("-5m", "must be positive"),
        ("1.5h", "write e.g. 1h30m instead of 1.5h"),
        ("15min", "write 15m instead of 15min"),
        ("2 hours", "write 2h instead of 2 hours"),
        ("1M", "m is minutes; months are not supported"),
        ("1H", "units are lowercase, write 1h"),
        ("3w", "unknown unit 'w'"),
        ("500ms", "unknown unit 'ms'"),
        ("30m1h", "largest first"),
        ("1h1h", "largest first"),
        ("m15", "is not understood"),
        ("fifteen minutes", "is not understood"),
        (None, "must be text"),
        (True, "must be text"),
        ("99999999999999d", "too long"),
    ],
)
def test_parse_duration_errors(text: object, message: str) -> None:
    with pytest.raises(TriggerError) as error:
        parse_duration(text)  # type: ignore[arg-type]
    assert message in str(error.value)


@FAST
@given(
    days=st.integers(0, 30),
    hours=st.integers(0, 23),
    minutes=st.integers(0, 59),
    seconds=st.integers(0, 59),
)
def test_parse_duration_round_trip(days: int, hours: int, minutes: int, seconds: int) -> None:
    expected = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    assume(expected >= timedelta(seconds=1))
    text = "".join(
        f"{n}{u}" for n, u in zip((days, hours, minutes, seconds), "dhms", strict=True) if n
    )
    assert parse_duration(text) == expected


# --------------------------------------------------------------------------- timezones


@pytest.mark.parametrize("name", ["Europe/Paris", "America/New_York", "UTC", "Etc/GMT-2", "CET"])
def test_parse_timezone(name: str) -> None:
    assert parse_timezone(name) == ZoneInfo(name)


def test_the_zones_taken_without_the_full_set_are_in_it() -> None:
    """parse_timezone takes a zone the tzdata package lists without asking for every zone
    (10 ms a start): each of them is one the full set holds, so the answer is the same."""
    from engine.rules import schedule

    listed = schedule._listed_zones()
    assert "Europe/Paris" in listed
    assert listed - schedule._NOT_PLACES <= schedule._zone_keys()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("Europe/Pari", "did you mean 'Europe/Paris'?"),
        ("Europa/Paris", "did you mean 'Europe/Paris'?"),
        ("europe/paris", "did you mean 'Europe/Paris'?"),
        ("Paris", "did you mean 'Europe/Paris'?"),
        ("New York", "did you mean 'America/New_York'?"),
        ("America/NewYork", "did you mean 'America/New_York'?"),
        ("+02:00", "is a fixed offset"),
        ("GMT+2", "is a fixed offset"),
        ("UTC-05:00", "is a fixed offset"),
        ("CEST", "looks like an abbreviation"),
        ("Mars/Olympus_Mons", "unknown timezone 'Mars/Olympus_Mons'"),
        ("", "IANA name"),
        ("../../etc/passwd", "unknown timezone"),
        ("localtime", "unknown timezone"),
        (None, "IANA name"),
    ],
)
def test_parse_timezone_errors(name: object, message: str) -> None:
    with pytest.raises(TriggerError) as error:
        parse_timezone(name)  # type: ignore[arg-type]
    assert message in str(error.value)


# --------------------------------------------------------------------------- schedule_for


def test_schedule_for_kinds() -> None:
    assert isinstance(schedule_for({"cron": "0 9 * * MON"}, PARIS), ZonedCronSchedule)
    assert isinstance(schedule_for({"every": "5m"}, PARIS), Schedule)
    poll = schedule_for({"poll": {"url": "https://x.invalid", "every": "5m"}}, PARIS)
    assert isinstance(poll, EverySchedule) and poll.interval == timedelta(minutes=5)
    in_new_york = schedule_for({"cron": "0 9 * * *", "timezone": "America/New_York"}, PARIS)
    fire = in_new_york.next_after(datetime(2026, 1, 1, tzinfo=UTC))
    assert fire.isoformat() == "2026-01-01T09:00:00-05:00"
    assert str(schedule_for({"cron": "0 9 * * MON"}, PARIS)) == "cron '0 9 * * MON' in Europe/Paris"
    assert str(schedule_for({"every": "90m"}, PARIS)) == "every 1h30m"
    assert str(schedule_for({"at": "2026-12-24 18:00"}, PARIS)) == "at 2026-12-24T18:00:00+01:00"


@pytest.mark.parametrize(
    ("trigger", "message"),
    [
        ({}, "exactly one of cron, every, at, event or poll (found none)"),
        ({"cron": "0 9 * * *", "every": "5m"}, "(found cron and every)"),
        ({"crn": "0 9 * * *"}, "did you mean 'cron'?"),
        ({"event": "flight.canceled"}, "not on a schedule"),
        ({"poll": {"url": "https://x.invalid"}}, "poll needs 'every'"),
        ({"every": 30}, "has no unit"),
        ({"every": "0s"}, "at least 1s"),
        ({"cron": "0 0 30 2 *"}, "would never fire"),
        ({"at": "soon"}, "is not understood"),
        ({"cron": "0 9 * * *", "timezone": "Europe/Pari"}, "did you mean 'Europe/Paris'?"),
        ("0 9 * * *", "must be a mapping"),
    ],
)
def test_schedule_for_errors(trigger: object, message: str) -> None:
    with pytest.raises(TriggerError) as error:
        schedule_for(trigger, PARIS)  # type: ignore[arg-type]
    assert message in str(error.value)


def test_trigger_error_is_a_value_error() -> None:
    assert issubclass(TriggerError, ValueError)


# ------------------------------------------------------------- fire_times, missed_fires


def test_fire_times() -> None:
    schedule = cron("0 9 * * MON", PARIS)
    assert iso(fire_times(schedule, datetime(2026, 3, 20, tzinfo=UTC), 3)) == [
        "2026-03-23T09:00:00+01:00",
        "2026-03-30T09:00:00+02:00",
        "2026-04-06T09:00:00+02:00",
    ]
    assert fire_times(schedule, datetime(2026, 3, 20, tzinfo=UTC), 0) == []


def test_missed_fires_window_is_open_closed() -> None:
    schedule = cron("0 * * * *")
    fires = missed_fires(schedule, local("2026-01-01T10:00"), local("2026-01-01T13:00"))
    assert [f.hour for f in fires] == [11, 12, 13]
    assert missed_fires(schedule, local("2026-01-01T13:00"), local("2026-01-01T10:00")) == []
    assert missed_fires(schedule, local("2026-01-01T10:00"), local("2026-01-01T13:00"), 0) == []


def test_missed_fires_keeps_the_most_recent_and_is_fast() -> None:
    schedule = cron("* * * * *")
    since, until = local("2025-01-01T00:00"), local("2026-01-01T00:00")
    begin = time.thread_time()  # processor time, as above
    fires = missed_fires(schedule, since, until, limit=5)
    assert time.thread_time() - begin < 1
    assert [f.strftime("%H:%M") for f in fires] == ["23:56", "23:57", "23:58", "23:59", "00:00"]
    rare = missed_fires(cron("0 9 1 1 *"), since - timedelta(days=3650), until, limit=3)
    assert [f.year for f in rare] == [2023, 2024, 2025]


def test_missed_fires_of_a_one_off() -> None:
    schedule = schedule_for({"at": "2026-06-01 12:00"}, PARIS)
    window = (datetime(2026, 6, 1, 9, tzinfo=UTC), datetime(2026, 6, 1, 11, tzinfo=UTC))
    assert iso(missed_fires(schedule, *window)) == ["2026-06-01T12:00:00+02:00"]
