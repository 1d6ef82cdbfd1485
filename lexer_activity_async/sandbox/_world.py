"""The sandbox's world: one deterministic account history per token, generated a day at a time.

Each token (by its `limits.token_key`) owns a stream of conversations. A conversation starts
at a random second of a UTC day, is routed to a group, and brings one to three customer
messages within 12 hours. Handled conversations (most of them) are assigned to a member of
their group, who answers each message after a wait of 30 s to 5 days (log-uniform, so most
answers come within hours), publicly or in private; the messages then close. Those form a
*case*: from the first customer message to the last agent response, closed 24 hours after
its last activity. Unhandled conversations stay new or assigned, or end irrelevant,
duplicate, redirected or no-response-required. Survey invitations of every NPS form go out
during the day; about half come back with a score (0-10) within two hours.

A day is a pure function of (token key, UTC day, daily volume): `day` builds it from a
seeded generator and keeps the last `DAY_CACHE_SIZE` days built in an LRU, so memory is
bounded however many tokens and years are queried, and any range is the union of its days.
Everything after an event's arrival happens within `LAG_DAYS` days, so a query looks that
far back for cases and that far ahead of "now" for nothing: an event later than the
sandbox's "now" is not visible yet (a message not yet answered counts as unanswered, its
state is the last one reached).
"""

from __future__ import annotations

import hashlib
import math
import random
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from functools import lru_cache
from itertools import accumulate
from typing import Generic, NamedTuple, TypeVar

__all__ = [
    "DAY_CACHE_SIZE",
    "STATES",
    "LAG_DAYS",
    "SLA_SECONDS",
    "ACTION_SLA_SECONDS",
    "GROUP_MEMBERS",
    "Message",
    "Case",
    "Survey",
    "Day",
    "Filters",
    "day",
    "messages",
    "cases",
    "surveys",
    "epoch",
    "Answers",
    "AgentDigest",
    "CaseDigest",
    "SurveyDigest",
    "Digest",
    "digest",
    "case_digest",
]

T = TypeVar("T")

DAY = 86_400
DAY_CACHE_SIZE = 1024
"""Generated days kept in memory, all tokens together (about 25 KB each at the default
volume: some 25 MB; a 12-month query of one token needs 373)."""
LAG_DAYS = 7
"""Every event of a conversation happens within this many days of its start."""
SLA_SECONDS = 3600
"""A customer wait over this breaks the SLA (``broke_sla``)."""
ACTION_SLA_SECONDS = 900
"""An agent response time (assignment to response) over this breaks ``broke_action_sla``."""

STATES = (
    "new",
    "assigned",
    "in_progress",
    "responded",
    "awaiting_approval",
    "redirected",
    "irrelevant",
    "duplicate",
    "closed",
    "no_response_required",
)
"""The workflow states, in the reports' order; a digest codes each by its index."""
_STATE_CODE = {state: code for code, state in enumerate(STATES)}

GROUP_MEMBERS: dict[int, tuple[int, ...]] = {
    123: (12345, 123),
    456: (12345, 789),
    789: (12345, 4242),
}
"""Group id -> ids of the users in it (the same as the users list's ``groups``)."""
_GROUPS = (123, 456, 789)
_GROUP_WEIGHTS = (5, 2, 2)
_CLASS_IDS = (123, 143, 466, 526, 528, 1246, 1465, 1467, 1472)
_CLASS_WEIGHTS = (2, 6, 4, 2, 3, 1, 2, 2, 1)
_SCORE_WEIGHTS = (1, 1, 1, 1, 1, 2, 2, 4, 5, 8, 9)
_LOG_MIN_WAIT = math.log(30.0)
_LOG_MAX_WAIT = math.log(5.0 * DAY)
_NPS_FORMS = (55, 56, 123)
_CHANNELS = ("twitter", "facebook", "instagram", "email", "webchat")
_CUSTOMERS = ("@jsmith", "Renée O'Brien", "李小龍", "Smith, John", '"Big" Bob', "anonymous")
_NOTES = (
    "Thanks, all sorted",
    'Customer said "this is the worst" twice',
    "Line one\nline two",
    "Café crème — très bien",
    "日本語のコメントです",
    "Great service 🎉👍",
    "",
    "plain note",
    'Refund, "urgent"\r\nsecond line, with émoji 😀',
)
"""Free text that exercises CSV parsing: commas, doubled quotes, newlines, non-ASCII."""
_UNHANDLED_END = ("new", "assigned", "irrelevant", "duplicate", "redirected", "closed")
_UNHANDLED_WEIGHTS = (3, 2, 2, 1, 1, 1)


class _Weighted(Generic[T]):
    """A population with its cumulative weights, precomputed once: ``draw`` makes the draw
    ``rng.choices(population, weights)[0]`` makes (one ``random()``, the same element), without
    summing the weights again on each of a day's thousands of draws."""

    __slots__ = ("cumulative", "hi", "population", "total")

    def __init__(self, population: Sequence[T], weights: Sequence[int]) -> None:
        self.population = tuple(population)
        self.cumulative = tuple(accumulate(weights))
        self.total = self.cumulative[-1] + 0.0
        self.hi = len(self.population) - 1

    def draw(self, rng: random.Random) -> T:
        return self.population[bisect_right(self.cumulative, rng.random() * self.total, 0, self.hi)]


_GROUP_DRAW = _Weighted(_GROUPS, _GROUP_WEIGHTS)
_CLASS_DRAW = _Weighted(_CLASS_IDS, _CLASS_WEIGHTS)
_SCORE_DRAW = _Weighted(range(11), _SCORE_WEIGHTS)
_UNHANDLED_DRAW = _Weighted(_UNHANDLED_END, _UNHANDLED_WEIGHTS)


class Message(NamedTuple):
    """One customer message. Times are epoch seconds; 0 means "never"."""

    id: int
    at: int
    group: int
    agent: int
    assigned_at: float
    responded_at: float
    private: bool
    classes: tuple[int, ...]
    history: tuple[tuple[float, str], ...]
    """(time, state) entries in time order, starting with (at, "new")."""
    case: int
    channel: str
    customer: str
    note: str

    def state(self, now: float) -> str:
        """The workflow state reached at ``now``."""
        last_at, last_state = self.history[-1]
        if last_at <= now:  # the usual case: the history is over by "now"
            return last_state
        current = "new"
        for moment, name in self.history:
            if moment > now:
                break
            current = name
        return current


class Case(NamedTuple):
    """One case: the handled messages of a conversation."""

    id: int
    created_at: int
    first_reply_at: float
    last_reply_at: float
    closed_at: float
    group: int
    agents: tuple[int, ...]
    """The agent of each reply, in order."""
    classes: tuple[int, ...]
    channel: str
    customer: str
    note: str


class Survey(NamedTuple):
    """One NPS invitation; ``submitted_at`` 0 (and ``score`` -1) when never answered."""

    id: int
    form: int
    sent_at: int
    submitted_at: float
    score: int
    agent: int
    group: int
    customer: str
    comment: str


class Day(NamedTuple):
    """The conversations started on one UTC day of a token's world, each list sorted by its
    time (a conversation's later messages may arrive up to 12 hours into the next day)."""

    messages: tuple[Message, ...]
    message_times: tuple[int, ...]
    cases: tuple[Case, ...]
    """Cases by ``created_at`` (conversations that started this day)."""
    surveys: tuple[Survey, ...]
    survey_times: tuple[int, ...]


class Filters(NamedTuple):
    """The users/groups filters of a request (None: not filtered)."""

    users: frozenset[int] | None = None
    groups: frozenset[int] | None = None

    @property
    def unfiltered(self) -> bool:
        """True when no filter is set: every record passes."""
        return self.users is None and self.groups is None

    def message(self, m: Message) -> bool:
        if self.users is not None and m.agent not in self.users:
            return False
        return self.groups is None or m.group in self.groups

    def case(self, c: Case) -> bool:
        if self.users is not None and self.users.isdisjoint(c.agents):
            return False
        return self.groups is None or c.group in self.groups

    def survey(self, s: Survey) -> bool:
        if self.users is not None and s.agent not in self.users:
            return False
        return self.groups is None or s.group in self.groups


def epoch(moment: datetime) -> int:
    """Whole epoch seconds of an aware datetime."""
    return math.floor(moment.astimezone(timezone.utc).timestamp())


def _seed(key: str, ordinal: int, volume: int) -> int:
    blob = f"world|{key}|{ordinal}|{volume}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:16], "big")


@lru_cache(maxsize=DAY_CACHE_SIZE)
def day(key: str, ordinal: int, volume: int) -> Day:
    """UTC day ``ordinal`` (days since 1970-01-01) of token ``key``'s world, with about
    ``volume`` messages (fewer at weekends)."""
    rng = random.Random(_seed(key, ordinal, volume))
    start = ordinal * DAY
    weekend = (ordinal + 3) % 7 >= 5  # 1970-01-01 was a Thursday
    target = round(volume * (0.6 if weekend else 1.0) * rng.uniform(0.7, 1.3))
    base_id = (int(key[:8], 16) if _is_hex(key[:8]) else 0) % 1000 * 10**9 + ordinal * 1000
    msgs: list[Message] = []
    found: list[Case] = []
    conversation = 0
    while len(msgs) < target:
        conversation += 1
        begun = start + rng.randrange(DAY)
        group = _GROUP_DRAW.draw(rng)
        agent = rng.choice(GROUP_MEMBERS[group])
        handled = rng.random() < 0.8
        channel = rng.choice(_CHANNELS)
        customer = rng.choice(_CUSTOMERS)
        count = rng.choice((1, 1, 1, 2, 2, 3))
        arrivals = sorted([begun] + [begun + rng.randrange(1, 43_200) for _ in range(count - 1)])
        case_id = base_id + conversation if handled else 0
        replies: list[tuple[float, int]] = []
        classes_seen: set[int] = set()
        for index, at in enumerate(arrivals):
            mid = (base_id + conversation) * 10 + index
            classes = tuple(
                sorted({_CLASS_DRAW.draw(rng) for _ in range(rng.choice((0, 1, 1, 2)))})
            )
            classes_seen.update(classes)
            note = rng.choice(_NOTES)
            if handled and rng.random() < 0.85:
                wait = math.exp(rng.uniform(_LOG_MIN_WAIT, _LOG_MAX_WAIT))
                responded = at + wait
                assigned = at + wait * rng.uniform(0.02, 0.8)
                history: list[tuple[float, str]] = [(at, "new"), (assigned, "assigned")]
                if rng.random() < 0.5:
                    history.append((assigned + (responded - assigned) / 4, "in_progress"))
                if rng.random() < 0.1:
                    history.append((responded - (responded - assigned) / 4, "awaiting_approval"))
                history.append((responded, "responded"))
                history.append((responded + rng.uniform(60.0, 43_200.0), "closed"))
                private = rng.random() < 0.35
                replies.append((responded, agent))
                msgs.append(
                    Message(
                        mid, at, group, agent, assigned, responded, private, classes,
                        tuple(history), case_id, channel, customer, note,
                    )
                )  # fmt: skip
            elif handled:
                history = [(at, "new"), (at + rng.randrange(60, 3600), "no_response_required")]
                msgs.append(
                    Message(
                        mid, at, group, 0, 0, 0, False, classes, tuple(history), case_id,
                        channel, customer, note,
                    )
                )  # fmt: skip
            else:
                end = _UNHANDLED_DRAW.draw(rng)
                history = [(at, "new")]
                owner, assigned = 0, 0
                if end != "new":
                    assigned = at + rng.randrange(60, 7200)
                    if end == "assigned":
                        owner = agent
                    history.append((assigned, end))
                    assigned = assigned if owner else 0
                msgs.append(
                    Message(
                        mid, at, group, owner, assigned, 0, False, classes, tuple(history), 0,
                        channel, customer, note,
                    )
                )  # fmt: skip
        if replies:
            replies.sort()
            closing = max(m.history[-1][0] for m in msgs if m.case == case_id)
            last = max(replies[-1][0], arrivals[-1])
            found.append(
                Case(
                    case_id,
                    begun,
                    replies[0][0],
                    replies[-1][0],
                    max(last + DAY, closing),
                    group,
                    tuple(a for _, a in replies),
                    tuple(sorted(classes_seen)),
                    channel,
                    customer,
                    rng.choice(_NOTES),
                )
            )
    msgs.sort(key=lambda m: (m.at, m.id))
    found.sort(key=lambda c: (c.created_at, c.id))
    sent: list[Survey] = []
    for form in _NPS_FORMS:
        for index in range(rng.randint(1, max(2, volume // 3))):
            at = start + rng.randrange(DAY)
            group = _GROUP_DRAW.draw(rng)
            answered = rng.random() < 0.55
            score = _SCORE_DRAW.draw(rng) if answered else -1
            sent.append(
                Survey(
                    (base_id + index) * 1000 + form,
                    form,
                    at,
                    at + rng.uniform(60.0, 7200.0) if answered else 0.0,
                    score,
                    rng.choice(GROUP_MEMBERS[group]),
                    group,
                    rng.choice(_CUSTOMERS),
                    rng.choice(_NOTES),
                )
            )
    sent.sort(key=lambda s: (s.sent_at, s.id))
    return Day(
        tuple(msgs),
        tuple(m.at for m in msgs),
        tuple(found),
        tuple(sent),
        tuple(s.sent_at for s in sent),
    )


def _is_hex(text: str) -> bool:
    return bool(text) and all(ch in "0123456789abcdef" for ch in text)


def _days(first: int, last: int) -> range:
    return range(first // DAY, last // DAY + 1)


def messages(
    key: str, volume: int, first: int, last: int, now: int, filters: Filters
) -> Iterator[Message]:
    """Messages arriving in [first, last] (epoch seconds) and by ``now``, that pass ``filters``."""
    last = min(last, now)
    if last < first:
        return
    # A conversation's later messages may arrive the next day: look one day back.
    for ordinal in range(first // DAY - 1, last // DAY + 1):
        d = day(key, ordinal, volume)
        lo = bisect_left(d.message_times, first) if ordinal <= first // DAY else 0
        hi = bisect_right(d.message_times, last) if ordinal >= last // DAY - 1 else None
        if filters.unfiltered:
            yield from d.messages[lo:hi]
            continue
        for m in d.messages[lo:hi]:
            if filters.message(m):
                yield m


def cases(
    key: str, volume: int, first: int, last: int, now: int, filters: Filters
) -> Iterator[Case]:
    """Cases created by ``last`` and not closed before ``first`` (closed_at >= first), visible
    by ``now`` (created), that pass ``filters``; callers pick closed or open ones."""
    last = min(last, now)
    if last < first:
        return
    for ordinal in range(first // DAY - LAG_DAYS, last // DAY + 1):
        for c in day(key, ordinal, volume).cases:
            if c.created_at <= last and c.closed_at >= first and filters.case(c):
                yield c


def surveys(
    key: str, volume: int, form: int, first: int, last: int, now: int, filters: Filters
) -> Iterator[Survey]:
    """Invitations of ``form`` sent in [first, last] and by ``now``, passing ``filters``."""
    last = min(last, now)
    if last < first:
        return
    for ordinal in _days(first, last):
        d = day(key, ordinal, volume)
        lo = bisect_left(d.survey_times, first) if ordinal == first // DAY else 0
        hi = bisect_right(d.survey_times, last) if ordinal == last // DAY else len(d.surveys)
        for s in d.surveys[lo:hi]:
            if s.form == form and filters.survey(s):
                yield s


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (0.0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# -- per-day digests -------------------------------------------------------------------------
#
# A report over months touches thousands of records; a digest holds, for one day of one
# token's world, the columns the reports read (times, coded states, response times ...), in
# the order `messages`, `cases` and `surveys` yield them, so a report slices and counts them
# in C instead of walking the records. Values are the same floats in the same order, so sums
# come out bit for bit as the record by record computation's.

CLASS_IDS = _CLASS_IDS
"""Classification ids; a digest's ``pairs`` code (classification, state) as
``CLASS_IDS.index(cid) * len(STATES) + state code``."""
_CLASS_INDEX = {cid: index for index, cid in enumerate(_CLASS_IDS)}


class Answers(NamedTuple):
    """Messages answered by "now", by arrival: times, waits (responded_at - at), agent
    response times (responded_at - assigned_at), and whether each answer was private (1/0)."""

    times: tuple[int, ...]
    waits: array[float]
    actions: array[float]
    private: bytes


class AgentDigest(NamedTuple):
    """One agent's messages assigned by "now": arrival times and state codes; the answered."""

    times: tuple[int, ...]
    states: bytes
    answers: Answers


class CaseDigest(NamedTuple):
    """A day's cases (by creation, as `Day.cases`); nothing here depends on "now"."""

    created: tuple[int, ...]
    closed: array[float]
    closed_sorted: array[float]
    first_replies: array[float]
    """first_reply_at - created_at"""
    resolutions: array[float]
    """last_reply_at - created_at"""
    interactions: tuple[int, ...]
    """len(agents)"""
    involved: tuple[int, ...]
    """len(set(agents))"""
    classes: tuple[tuple[int, ...], ...]
    class_counts: tuple[tuple[int, int], ...]
    """(classification id, cases) over the whole day, by id."""


class SurveyDigest(NamedTuple):
    """One form's invitations of the day by time; ``codes``: 0 not received by "now",
    1 promoter, 2 passive, 3 detractor."""

    times: tuple[int, ...]
    codes: bytes


class Digest(NamedTuple):
    """The columns of one day of a token's world as seen at some "now"."""

    settled_at: float
    """The day's last event: from then on the day no longer changes."""
    times: tuple[int, ...]
    """Message arrivals (`Day.message_times`)."""
    states: bytes
    """Each message's state code."""
    pair_times: tuple[int, ...]
    pairs: bytes
    """One (classification, state) code per classification of each message, by arrival."""
    answers: Answers
    agents: dict[int, AgentDigest]
    """By agent id: the messages assigned to them by "now"."""
    cases: CaseDigest
    surveys: dict[int, SurveyDigest]
    """By form id."""


_NO_ANSWERS = Answers((), array("d"), array("d"), b"")


def _answers(rows: list[Message]) -> Answers:
    return Answers(
        tuple(m.at for m in rows),
        array("d", [m.responded_at - m.at for m in rows]),
        array("d", [m.responded_at - m.assigned_at for m in rows]),
        bytes(1 if m.private else 0 for m in rows),
    )


def _case_digest(d: Day) -> CaseDigest:
    found = d.cases
    closed = [c.closed_at for c in found]
    counts: Counter[int] = Counter()
    for c in found:
        counts.update(c.classes)
    return CaseDigest(
        tuple(c.created_at for c in found),
        array("d", closed),
        array("d", sorted(closed)),
        array("d", [c.first_reply_at - c.created_at for c in found]),
        array("d", [c.last_reply_at - c.created_at for c in found]),
        tuple(len(c.agents) for c in found),
        tuple(len(set(c.agents)) for c in found),
        tuple(c.classes for c in found),
        tuple(sorted(counts.items())),
    )


def _category_code(score: int) -> int:
    return 1 if score >= 9 else 2 if score >= 7 else 3


def _digest_of(d: Day, now: float, cases: CaseDigest) -> Digest:
    states = bytearray()
    pair_times: list[int] = []
    pairs = bytearray()
    answered: list[Message] = []
    assigned: dict[int, list[Message]] = {}
    settled = 0.0
    width = len(STATES)
    for m in d.messages:
        code = _STATE_CODE[m.state(now)]
        states.append(code)
        settled = max(settled, m.history[-1][0])
        for cid in m.classes:
            pair_times.append(m.at)
            pairs.append(_CLASS_INDEX[cid] * width + code)
        if 0 < m.responded_at <= now:
            answered.append(m)
        if m.agent and 0 < m.assigned_at <= now:
            assigned.setdefault(m.agent, []).append(m)
    agents = {
        agent: AgentDigest(
            tuple(m.at for m in rows),
            bytes(_STATE_CODE[m.state(now)] for m in rows),
            _answers([m for m in rows if 0 < m.responded_at <= now]),
        )
        for agent, rows in sorted(assigned.items())
    }
    forms: dict[int, tuple[list[int], bytearray]] = {}
    for s in d.surveys:
        settled = max(settled, s.submitted_at)
        times, codes = forms.setdefault(s.form, ([], bytearray()))
        times.append(s.sent_at)
        codes.append(_category_code(s.score) if 0 < s.submitted_at <= now else 0)
    return Digest(
        settled,
        d.message_times,
        bytes(states),
        tuple(pair_times),
        bytes(pairs),
        _answers(answered) if answered else _NO_ANSWERS,
        agents,
        cases,
        {form: SurveyDigest(tuple(t), bytes(c)) for form, (t, c) in forms.items()},
    )


_DIGESTS: OrderedDict[tuple[str, int, int], Digest] = OrderedDict()
_PROVISIONAL: OrderedDict[tuple[str, int, int, int], Digest] = OrderedDict()
_PROVISIONAL_SIZE = 64


def _final(key: str, ordinal: int, volume: int) -> Digest:
    whole = (key, ordinal, volume)
    found = _DIGESTS.get(whole)
    if found is None:
        d = day(key, ordinal, volume)
        found = _digest_of(d, math.inf, _case_digest(d))
        _DIGESTS[whole] = found
        limit = day.cache_info().maxsize or DAY_CACHE_SIZE
        while len(_DIGESTS) > limit:
            _DIGESTS.popitem(last=False)
    else:
        _DIGESTS.move_to_end(whole)
    return found


def case_digest(key: str, ordinal: int, volume: int) -> CaseDigest:
    """The cases of `day` ``(key, ordinal, volume)`` (the same at any "now")."""
    return _final(key, ordinal, volume).cases


def digest(key: str, ordinal: int, volume: int, now: int) -> Digest:
    """The digest of `day` ``(key, ordinal, volume)`` as it stands at ``now``.

    A day over by ``now`` has one digest, kept in an LRU as large as the day LRU (so it
    follows `day`'s size); a day still changing gets one per second of "now", a few kept."""
    found = _final(key, ordinal, volume)
    if now >= found.settled_at:
        return found
    at = (key, ordinal, volume, now)
    seen = _PROVISIONAL.get(at)
    if seen is None:
        seen = _digest_of(day(key, ordinal, volume), now, found.cases)
        _PROVISIONAL[at] = seen
        if len(_PROVISIONAL) > _PROVISIONAL_SIZE:
            _PROVISIONAL.popitem(last=False)
    return seen
