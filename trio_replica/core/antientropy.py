"""Digest anti-entropy: which ranges of a replicated state two nodes must exchange.

Sans-IO, like the HyParView and Plumtree cores: functions of a state's digest and a
received round, returning the next round and the ranges whose entries to send. The
runtime (`trio_replica.runtime.replica`) moves the rounds and streams the entries.

The digest tree. A state (a `trio_replica.core.ormap.ORMap`, or any store that implements
`DigestSource`) puts every key in one of ``2**LEAF_BITS`` leaves by a hash of the key that
is the same on every node. Level ``l`` of the tree splits the leaves into ``16**l``
ranges by their leading bits: level 0 is the whole state, `LEAF_LEVEL` the single leaves.
For each range the state keeps the count of its entries and the sum, modulo 2**64, of a
64-bit hash of each entry's identity (key and version). Two replicas with the same
entries in a range have the same digest there; a difference shows at every level above
it (unless 64-bit sums collide).

A comparison (learned from Merkle-tree anti-entropy in Dynamo and Cassandra, here with sums
that are kept up to date on every write instead of rebuilt). The initiator sends the
digests of the root's children (`opening`). The receiver compares each child with its own
(`answer`): equal ranges are done; a differing range small enough (`exchange_below`
entries on both sides together), at the leaf level, or empty on one side is *exchanged*:
each side sends its entries of that range (the receiver at once, and it asks the other
for theirs with `want`); any other differing range is *descended*: the receiver sends the
digests of its children, and the other side compares those the same way. Rounds go back
and forth, one level deeper each time, until no range is left to descend. The entries
moved are those of the differing ranges only: for two replicas of a million keys that
differ in a few keys, a few leaves of about 15 entries each and about 16 digests per
level per difference. A brand-new replica (empty everywhere) exchanges at the first level:
the whole state streams once, range by range; if that stream breaks, the next comparison
finds the ranges that arrived equal and moves only the rest, so a full sync resumes
instead of starting over.

The receiver of a round keeps no state: a round carries everything needed to answer it,
every answer is bounded (`max_parents` ranges descended per round), and a *bare* round
(nothing to compare, nothing wanted) ends the exchange. Entries go out before the round
that follows them, on one ordered stream: whoever receives the bare round holds all the
other side sent, and whoever sends it has received all it asked for. The runtime keeps
the initiator's session (one at a time per peer and instance, with a deadline) and bounds
what it serves (`want`s are coalesced and rate-limited per peer).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import attrs

__all__ = [
    "FANOUT",
    "FANOUT_BITS",
    "LEAF_BITS",
    "LEAF_LEVEL",
    "AntiEntropyConfig",
    "DigestRound",
    "DigestSource",
    "Range",
    "answer",
    "check_round",
    "opening",
    "ranges_in",
]

#: Leaves of the digest tree: a key's leaf is the top `LEAF_BITS` bits of its hash.
LEAF_BITS = 16
#: Each level splits a range into ``2**FANOUT_BITS`` children.
FANOUT_BITS = 4
FANOUT = 1 << FANOUT_BITS
#: The deepest level (the single leaves); level 0 is the whole state.
LEAF_LEVEL = LEAF_BITS // FANOUT_BITS
#: A range of the tree: ``(level, index)`` with ``0 <= index < 16**level``.
Range = tuple[int, int]
#: A range's digest as it travels: ``(index, sum, count)`` (the level is the round's).
Digest = tuple[int, int, int]


class DigestSource(Protocol):
    """What a replicated state offers for comparison (the `ORMap` implements it)."""

    def range_digest(self, level: int, index: int) -> tuple[int, int]:
        """``(sum, count)`` of range `index` of `level`; ``(0, 0)`` when empty."""

    def child_digests(self, level: int, index: int) -> list[Digest]:
        """The non-empty children (at ``level + 1``) of range `index` of `level`."""


@attrs.frozen
class AntiEntropyConfig:
    """Bounds of a comparison (the same on both sides is best, but not required)."""

    #: A differing range with at most this many entries on both sides together is
    #: exchanged whole instead of descended: a round trip costs more than a few entries.
    exchange_below: int = 64
    #: Ranges descended per round (each costs 16 digests in the answer, about 300 bytes);
    #: more become further rounds.
    max_parents: int = 256


@attrs.frozen
class DigestRound:
    """One round of a comparison: what a `SyncDigest` message carries.

    `parents` are ranges at ``level - 1`` whose children the receiver compares; `digests`
    are the sender's non-empty children of those parents (a child left out is empty at
    the sender). `want` asks the receiver for its entries of those ranges.
    """

    level: int
    parents: tuple[int, ...]
    digests: tuple[Digest, ...]
    want: tuple[Range, ...] = ()

    @property
    def bare(self) -> bool:
        """Nothing to compare and nothing wanted: the comparison is over, no answer."""
        return not self.parents and not self.want


def opening(source: DigestSource) -> DigestRound:
    """The first round of a comparison: the root's children."""
    return DigestRound(1, (0,), tuple(source.child_digests(0, 0)))


def check_round(round_: DigestRound, config: AntiEntropyConfig | None = None) -> str | None:
    """Why a received round is malformed, or None. The wire decoder has checked types and
    value ranges; this checks the structure: parents at the level above, digests only for
    their children and each once, bounded counts."""
    config = config or AntiEntropyConfig()
    level = round_.level
    if not 1 <= level <= LEAF_LEVEL:
        return f"level {level} out of range"
    if len(round_.parents) > config.max_parents:
        return f"{len(round_.parents)} parents (at most {config.max_parents})"
    parents = set(round_.parents)
    if len(parents) != len(round_.parents):
        return "a parent named twice"
    if any(not 0 <= p < FANOUT ** (level - 1) for p in parents):
        return "a parent out of range"
    seen: set[int] = set()
    for index, _, count in round_.digests:
        if index >> FANOUT_BITS not in parents or index in seen or count <= 0:
            return f"digest of range {index} is not a child of a parent, twice, or empty"
        seen.add(index)
    for want_level, index in round_.want:
        if not 1 <= want_level <= LEAF_LEVEL or not 0 <= index < FANOUT**want_level:
            return f"wanted range ({want_level}, {index}) out of range"
    return None


def answer(
    source: DigestSource, received: DigestRound, config: AntiEntropyConfig | None = None
) -> tuple[list[DigestRound], list[Range]]:
    """Compare a received (checked) round with our state.

    Returns the rounds to send back and the ranges whose entries we send (those wanted,
    and our side of the ranges exchanged here). Every round gets an answer but a bare one:
    the runtime sends the entries first and the rounds after them on the same ordered
    stream, so a node that receives a bare round holds everything the other side sent.
    """
    config = config or AntiEntropyConfig()
    send: list[Range] = list(received.want)
    if received.bare:
        return [], send
    if not received.parents:
        # Only wants: served above; the bare answer says they were sent.
        return [DigestRound(received.level, (), ())], send
    level = received.level
    theirs = {index: (total, count) for index, total, count in received.digests}
    descend: list[int] = []
    want: list[Range] = []
    for parent in received.parents:
        first = parent << FANOUT_BITS
        for child in range(first, first + FANOUT):
            other_sum, other_count = theirs.get(child, (0, 0))
            our_sum, our_count = source.range_digest(level, child)
            if our_count == other_count and our_sum == other_sum:
                continue
            if (
                level == LEAF_LEVEL
                or our_count + other_count <= config.exchange_below
                or not our_count
                or not other_count
            ):
                if our_count:
                    send.append((level, child))
                if other_count:
                    want.append((level, child))
            else:
                descend.append(child)
    rounds: list[DigestRound] = []
    for start in range(0, len(descend), config.max_parents):
        parents = descend[start : start + config.max_parents]
        digests = tuple(d for p in parents for d in source.child_digests(level, p))
        rounds.append(DigestRound(level + 1, tuple(parents), digests))
    if rounds:
        rounds[0] = attrs.evolve(rounds[0], want=tuple(want))
    else:
        rounds.append(DigestRound(level + 1 if level < LEAF_LEVEL else level, (), (), tuple(want)))
    return rounds, send


def ranges_in(ranges: Iterable[Range]) -> list[Range]:
    """`ranges` without duplicates and without those inside another of them, in order."""
    out: list[Range] = []
    chosen = set()
    for level, index in sorted(set(ranges)):
        covered = False
        for up in range(level):
            if (up, index >> (FANOUT_BITS * (level - up))) in chosen:
                covered = True
                break
        if not covered:
            chosen.add((level, index))
            out.append((level, index))
    return out
