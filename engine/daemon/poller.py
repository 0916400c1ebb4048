"""Polled feeds: GET a JSON feed, and hand each item whose key is new to the firing path once.

``trigger: {poll: {url, every, items, key, timeout, on_first_poll}}``:

* ``items`` is a dot path to the list in the body (``offers``, ``data.offers``; a number
  indexes a list); without it the body itself is the list. Items that are not JSON objects
  are skipped and logged.
* ``key`` is a Jinja text (``"{{ item.id }}"``, rendered with ``item``, ``now``, ``rule`` and
  ``vars`` as when the rule fires) or, when it holds no template, a field path of the item
  (``id``, ``ref.code``). An item whose key cannot be made is skipped and logged.
* Seen keys live in the store (``see_keys("feed:<rule>", keys, now)``): each key fires at most
  once, across restarts and instances. The fire's idempotency key is ``item:<key>``. A poll
  moves the ``seen_at`` of the keys it finds (about daily, :data:`REFRESH`), then that of the
  feed's ``feed-primed:<rule>`` key (its last good read); retention forgets only keys no
  good poll found for ``retention.feed_keys`` (see engine/outbox/retention.py).
* The first poll of a feed only records what is already there (``on_first_poll: record``,
  the default), so a new rule does not blast the existing feed; ``send`` fires for it too.

``when`` is the firing path's business, not ours: a key is marked seen even when the rule's
``when`` turns the item down, so an item that is filtered out is not reconsidered when it
changes later (a feed that wants that puts what changes into ``key``, e.g.
``"{{ item.id }}-{{ item.price }}"``). This keeps "each key fires at most once" simple and
cheap: deciding ``when`` here would need the rule compiled on every poll of every item.

A feed that fails (timeout, non-2xx, not JSON, no list at ``items``, too large) is logged,
counted in :meth:`Poller.status`, and retried at the next turn: :meth:`Poller.poll` never raises.

Order, for a feed already primed: the new keys are read, their items fired, and only then
are the keys recorded. A process killed in between (400 items take seconds to fire) leaves
them unrecorded: the next poll, by whichever instance leads, fires them again, and the outbox
refuses each as a duplicate of its idempotency key (``item:<key>``), so nothing is lost or
sent twice. An item whose firing raised is not recorded either: the next poll tries it again,
and this process keeps it (up to :data:`MAX_RETRY`) should the feed drop it meanwhile. The
items of one poll are fired together, so the daemon writes them in a few transactions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

import httpx

from engine import __version__
from engine.daemon.clock import Clock
from engine.errors import PushrulesError
from engine.outbox.retention import REFRESH, feed_scope, primed_scope
from engine.render.compiler import FireContext, template_context
from engine.rules import templating
from engine.rules.rule import Rule
from engine.rules.schedule import TriggerError, parse_duration, parse_timezone

__all__ = [
    "FeedError",
    "FeedStatus",
    "ItemCallback",
    "PollConfig",
    "PollResult",
    "Poller",
    "Seen",
    "feed_scope",
    "item_key",
    "items_at",
]

log = logging.getLogger("pushrules.poller")

ItemCallback = Callable[[Rule, Mapping[str, Any], str], Awaitable[None]]
"""(rule, item, idempotency key ``item:<key>``): the firing path, which applies ``when``."""

#: Longest item key kept (the store's keys are at most 1,000 characters with the prefix).
MAX_ITEM_KEY = 900
#: Items whose fire failed, kept per rule for the next turn (beyond, the oldest are dropped).
MAX_RETRY = 1000
#: Feed items fired together (the daemon writes what is fired together in one transaction).
DELIVER_AT_ONCE = 200


class Seen(Protocol):
    """engine/outbox/store.py's Store: which keys a poll finds are new, and records them."""

    def unseen_keys(self, scope: str, keys: Sequence[str]) -> list[str]: ...

    def see_keys(self, scope: str, keys: Sequence[str], now: datetime) -> list[str]: ...


class FeedError(PushrulesError):
    """Why a poll failed, in a few words for the log and /healthz."""


@dataclass(frozen=True, slots=True)
class PollConfig:
    url: str
    items: str | None
    key: str
    timeout: float
    on_first_poll: Literal["record", "send"]

    @property
    def primed_key(self) -> str:
        """The key (in the rule's ``feed-primed:`` scope) saying this feed was primed: a rule
        pointed at another feed, or keying it differently, starts with a first poll again
        instead of sending all it finds."""
        what = json.dumps([self.url, self.items, self.key]).encode()
        return hashlib.blake2b(what, digest_size=8).hexdigest()

    @classmethod
    def of(cls, rule: Rule, default_timeout: float) -> PollConfig:
        poll = rule.trigger.get("poll")
        if not isinstance(poll, Mapping) or "url" not in poll or "key" not in poll:
            raise FeedError("the rule has no poll trigger with a url and a key")
        timeout = float(default_timeout)
        if poll.get("timeout") is not None:
            try:
                timeout = parse_duration(str(poll["timeout"])).total_seconds()
            except TriggerError as exc:
                raise FeedError(f"poll.timeout: {exc}") from None
        items = poll.get("items")
        first = str(poll.get("on_first_poll") or "record")
        return cls(
            url=str(poll["url"]),
            items=str(items) if items not in (None, "") else None,
            key=str(poll["key"]),
            timeout=timeout,
            on_first_poll="send" if first == "send" else "record",
        )


@dataclass(slots=True)
class FeedStatus:
    """One feed's health, for /healthz."""

    url: str
    last_ok_at: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    consecutive_failures: int = 0
    items_seen_last: int = 0  # items in the feed at the last good poll
    new_items_last: int = 0  # of which were new
    waiting_retry: int = 0  # new items whose fire failed, retried next turn


@dataclass(frozen=True, slots=True)
class PollResult:
    rule: str
    ok: bool
    items: int = 0  # items with a key in the feed
    new: int = 0  # keys never seen before
    sent: int = 0  # items handed to on_item
    recorded: bool = False  # first poll: keys recorded without sending
    skipped: int = 0  # items without a usable key, or not objects
    error: str | None = None


# --------------------------------------------------------------------------- pure helpers


def items_at(body: Any, path: str | None) -> list[Any]:
    """The list at ``path`` (dot separated) in a JSON body; FeedError says what is there instead."""
    node = body
    walked: list[str] = []
    for step in path.split(".") if path else ():
        where = ".".join(walked) or "the top level"
        if isinstance(node, Mapping) and step in node:
            node = node[step]
        elif isinstance(node, list) and step.isdigit() and int(step) < len(node):
            node = node[int(step)]
        elif isinstance(node, Mapping):
            keys = ", ".join(sorted(map(str, node))[:8]) or "none"
            raise FeedError(f"no '{step}' at {where} of the feed (keys there: {keys})")
        else:
            raise FeedError(f"no '{step}' at {where}: it is {_json_kind(node)}")
        walked.append(step)
    if not isinstance(node, list):
        place = f"'{path}'" if path else "the top level (set poll.items to its path)"
        raise FeedError(f"{place} is {_json_kind(node)}, not a list")
    return node


def _json_kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "text"
    if value is None:
        return "null"
    return "a boolean" if isinstance(value, bool) else "a number"


def item_key(spec: str, item: Mapping[str, Any], context: Mapping[str, Any]) -> str:
    """The item's key: ``spec`` rendered as Jinja, or read as a field path when plain text."""
    if templating.is_template(spec):
        key = templating.render(spec, context)
    else:
        value: Any = item
        for step in spec.split("."):
            if not isinstance(value, Mapping) or step not in value:
                raise ValueError(f"the item has no field '{spec}'")
            value = value[step]
        if value is None or isinstance(value, (Mapping, list)):
            raise ValueError(f"field '{spec}' is {_json_kind(value)}, not a value")
        key = str(value)
    if not key.strip():
        raise ValueError("the key is empty")
    if len(key) > MAX_ITEM_KEY:
        raise ValueError(f"the key is {len(key)} characters long (at most {MAX_ITEM_KEY})")
    return key


def parse_feed(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        start = raw[:40].decode("utf-8", "replace").strip()
        raise FeedError(f"not JSON ({exc}); it starts with {start!r}") from None


# --------------------------------------------------------------------------- the poller


@dataclass(slots=True)
class _Marked:
    """What recording a poll's keys did: the store's error, or whether it moved the feed's
    primed key (which happens about once a day, :data:`REFRESH`)."""

    error: BaseException | None
    primed_touched: bool = False


class Poller:
    """Fetches feeds for poll rules; one instance serves every poll rule of the daemon."""

    def __init__(
        self,
        store_marks: Seen,
        on_item: ItemCallback,
        clock: Clock,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
        max_bytes: int = 5 * 2**20,
    ) -> None:
        self._seen = store_marks
        self._on_item = on_item
        self._clock = clock
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(
            follow_redirects=True,
            headers={"User-Agent": f"pushrules/{__version__}", "Accept": "application/json"},
        )
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._status: dict[str, FeedStatus] = {}
        # Keys of the last good poll, each with when this process last wrote its seen_at, and
        # feeds known primed with when: a poll of an unchanged feed writes nothing, but once
        # a day (REFRESH), when it moves the seen_at of what it finds.
        self._known: dict[str, dict[str, datetime]] = {}
        self._primed: dict[tuple[str, str], datetime] = {}
        self._retry: dict[str, dict[str, Mapping[str, Any]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def status(self) -> dict[str, FeedStatus]:
        return {rule_id: dataclasses.replace(s) for rule_id, s in sorted(self._status.items())}

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    async def poll(self, rule: Rule, now: datetime) -> PollResult:
        """One turn of a feed; never raises (but for cancellation)."""
        lock = self._locks.setdefault(rule.id, asyncio.Lock())
        async with lock:
            try:
                return await self._poll(rule, now)
            except Exception as exc:  # a bug here must not take the daemon down
                log.exception("rule %s: polling its feed failed unexpectedly", rule.id)
                return self._failed(rule, None, f"{type(exc).__name__}: {exc}")

    async def _poll(self, rule: Rule, now: datetime) -> PollResult:
        try:
            config = PollConfig.of(rule, self._timeout)
        except FeedError as exc:
            return self._failed(rule, None, str(exc))
        status = self._status.setdefault(rule.id, FeedStatus(config.url))
        status.url = config.url
        try:
            body = await self._fetch(config)
            items = items_at(body, config.items)
        except FeedError as exc:
            return self._failed(rule, config, str(exc))

        keyed, skipped = self._keys(rule, config, items, now)
        known = self._known.get(rule.id, {})
        seen_now = self._clock.now()
        stale = [key for key in keyed if key not in known or seen_now - known[key] >= REFRESH]
        fresh = [key for key in stale if key not in known]  # only these can be new
        read = await asyncio.to_thread(self._unseen, rule.id, config.primed_key, fresh)
        if isinstance(read, BaseException):
            return self._failed(rule, config, _store_failed(read))
        new, primed = read
        recorded = not primed and config.on_first_poll == "record"
        waiting = self._retry.pop(rule.id, {})
        if recorded:
            waiting = {}
        else:
            waiting.update((key, keyed[key]) for key in new)
        # Fired before they are recorded: see the module's docstring.
        sent, failed = await self._deliver(rule, waiting)
        self._keep_for_retry(rule.id, failed)
        mark = [key for key in stale if key not in failed]
        marked = await asyncio.to_thread(self._mark, rule.id, config.primed_key, mark, seen_now)
        if marked.error is not None:
            return self._failed(rule, config, _store_failed(marked.error))
        if marked.primed_touched:
            self._primed[(rule.id, config.primed_key)] = seen_now
        written = set(mark)
        self._known[rule.id] = {
            k: seen_now if k in written else known[k] for k in keyed if k in written or k in known
        }
        if recorded:
            log.info(
                "rule %s: first poll of %s: %d items recorded as seen, not sent "
                "(on_first_poll: record); new items will fire from the next poll",
                rule.id,
                config.url,
                len(keyed),
            )
        self._succeeded(rule.id, config, len(keyed), len(new))
        return PollResult(
            rule.id,
            ok=True,
            items=len(keyed),
            new=len(new),
            sent=sent,
            recorded=recorded,
            skipped=skipped,
        )

    def _unseen(
        self, rule_id: str, primed_key: str, keys: Sequence[str]
    ) -> tuple[list[str], bool] | BaseException:
        """The keys never recorded, and whether the feed was primed (in a thread)."""
        try:
            new = self._seen.unseen_keys(feed_scope(rule_id), keys) if keys else []
            if (rule_id, primed_key) in self._primed:
                return new, True
            primed = not self._seen.unseen_keys(primed_scope(rule_id), [primed_key])
        except Exception as exc:
            return exc
        return new, primed

    async def _fetch(self, config: PollConfig) -> Any:
        """The feed's JSON body, read in chunks so an oversized one is refused early."""
        try:
            async with asyncio.timeout(config.timeout):
                async with self._client.stream("GET", config.url, timeout=config.timeout) as resp:
                    if not resp.is_success:
                        raise FeedError(f"HTTP {resp.status_code} {resp.reason_phrase}".strip())
                    length = resp.headers.get("content-length", "")
                    if length.isdigit() and int(length) > self._max_bytes:
                        raise FeedError(self._too_large())
                    body = bytearray()
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) > self._max_bytes:
                            raise FeedError(self._too_large())
        except (TimeoutError, httpx.TimeoutException):
            raise FeedError(f"no complete answer within {config.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise FeedError(f"{type(exc).__name__}: {exc or 'request failed'}") from None
        except httpx.InvalidURL as exc:
            raise FeedError(f"bad URL: {exc}") from None
        return parse_feed(bytes(body))

    def _too_large(self) -> str:
        return f"the answer is larger than {self._max_bytes:,} bytes (max_bytes)"

    def _keys(
        self, rule: Rule, config: PollConfig, items: Sequence[Any], now: datetime
    ) -> tuple[dict[str, Mapping[str, Any]], int]:
        """Items by key (the first of duplicates wins), and how many were skipped."""
        local_now = now.astimezone(parse_timezone(rule.timezone))
        keyed: dict[str, Mapping[str, Any]] = {}
        problems: list[str] = []
        for index, item in enumerate(items):
            if not isinstance(item, Mapping):
                problems.append(f"item {index} is {_json_kind(item)}, not an object")
                continue
            context = template_context(rule, FireContext(now=local_now, item=item))
            try:
                key = item_key(config.key, item, context)
            except (templating.RenderError, ValueError) as exc:
                problems.append(f"item {index}: key '{config.key}': {exc}")
                continue
            keyed.setdefault(key, item)
        if problems:
            log.warning(
                "rule %s: %d items of %s skipped (first: %s)",
                rule.id,
                len(problems),
                config.url,
                problems[0],
            )
        return keyed, len(problems)

    def _mark(self, rule_id: str, primed_key: str, keys: Sequence[str], now: datetime) -> _Marked:
        """Record the keys found, then the feed's primed key (in a thread). Whether the feed was
        new and which keys are new were read before the items fired (:meth:`_unseen`).

        Keys first: a crash in between leaves the feed unprimed, so the next poll records
        again rather than sending what was already there; and the feed's last good read never
        runs ahead of its keys' ``seen_at``, which retention relies on.
        """
        try:
            if keys:
                self._seen.see_keys(feed_scope(rule_id), keys, now)
        except Exception as exc:
            return _Marked(exc)
        primed_at = self._primed.get((rule_id, primed_key))
        if primed_at is not None and now - primed_at < REFRESH:
            return _Marked(None)
        try:
            self._seen.see_keys(primed_scope(rule_id), [primed_key], now)
        except Exception as exc:
            return _Marked(exc)
        return _Marked(None, primed_touched=True)

    async def _deliver(
        self, rule: Rule, items: Mapping[str, Mapping[str, Any]]
    ) -> tuple[int, dict[str, Mapping[str, Any]]]:
        """Fire the items, :data:`DELIVER_AT_ONCE` at a time: fired together, they are
        written together (one item at a time, each in its own transaction, 400 took 2 s)."""
        sent = 0
        failed: dict[str, Mapping[str, Any]] = {}
        pairs = list(items.items())
        for start in range(0, len(pairs), DELIVER_AT_ONCE):
            part = pairs[start : start + DELIVER_AT_ONCE]
            done = await asyncio.gather(
                *(self._on_item(rule, item, f"item:{key}") for key, item in part),
                return_exceptions=True,
            )
            for (key, item), outcome in zip(part, done, strict=True):
                if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                    raise outcome  # cancelled, or the process ends: nothing more is recorded
                if isinstance(outcome, BaseException):
                    log.error(
                        "rule %s: firing feed item %r failed; it is retried at the next poll",
                        rule.id,
                        key,
                        exc_info=outcome,
                    )
                    failed[key] = item
                else:
                    sent += 1
        return sent, failed

    def _keep_for_retry(self, rule_id: str, items: dict[str, Mapping[str, Any]]) -> None:
        if len(items) > MAX_RETRY:
            dropped = list(items)[: len(items) - MAX_RETRY]
            log.error(
                "rule %s: %d feed items could not be fired and are dropped (first key %r)",
                rule_id,
                len(dropped),
                dropped[0],
            )
            items = {k: items[k] for k in list(items)[-MAX_RETRY:]}
        if items:
            self._retry[rule_id] = items
        status = self._status.get(rule_id)
        if status is not None:
            status.waiting_retry = len(items)

    def _succeeded(self, rule_id: str, config: PollConfig, items: int, new: int) -> None:
        status = self._status.setdefault(rule_id, FeedStatus(config.url))
        if status.consecutive_failures:
            log.info(
                "rule %s: feed %s answers again, after %d failed polls",
                rule_id,
                config.url,
                status.consecutive_failures,
            )
        status.last_ok_at = self._clock.now()
        status.consecutive_failures = 0
        status.items_seen_last = items
        status.new_items_last = new

    def _failed(self, rule: Rule, config: PollConfig | None, reason: str) -> PollResult:
        poll = rule.trigger.get("poll")
        url = str(poll.get("url", "?")) if isinstance(poll, Mapping) else "?"
        if config is not None:
            url = config.url
        status = self._status.setdefault(rule.id, FeedStatus(url))
        status.last_error = reason
        status.last_error_at = self._clock.now()
        status.consecutive_failures += 1
        log.warning(
            "rule %s: feed %s failed: %s; retried at the next poll (%d failures in a row)",
            rule.id,
            url,
            reason,
            status.consecutive_failures,
        )
        return PollResult(rule.id, ok=False, error=reason)


def _store_failed(exc: BaseException) -> str:
    return f"the store could not read or record seen items ({type(exc).__name__}: {exc})"
