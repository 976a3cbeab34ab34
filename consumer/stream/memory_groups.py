"""Consumer groups of the in-memory broker: membership, sticky assignment, rebalance steps.

The group keeps a *target* assignment per member, recomputed at every join, leave or new
partition, and the partitions each member *owns* (what its client was given). A client
walks from owned to target one step per poll, running its rebalance callback for each:

- cooperative (``partition.assignment.strategy=cooperative-sticky``): it revokes what it
  must give up, and is assigned what it gains only once the previous owner has revoked it
  (the two phases of KIP-429), so a partition never has two owners;
- eager (range, roundrobin): at each new generation it revokes everything, then is
  assigned its whole target at once, when every partition of it is free.

Assignment is sticky and deterministic: members keep what they had up to an even share,
and the rest goes, in topic and partition order, to the member with the fewest.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TP = tuple[str, int]
PartitionCount = Callable[[str], int]


@dataclass(eq=False)
class Member:
    member_id: str
    client: Any  # the MemoryConsumer that joined
    topics: tuple[str, ...]
    instance_id: str | None
    index: int  # join order: ties go to earlier members
    owned: set[TP] = field(default_factory=set)
    target: set[TP] = field(default_factory=set)
    synced_generation: int = -1
    away_since: float | None = None  # a static member whose client closed, keeping its slot


class Group:
    """One consumer group: committed offsets, members and their assignment."""

    def __init__(self, group_id: str, cooperative: bool) -> None:
        self.group_id = group_id
        self.cooperative = cooperative
        self.generation = 0
        self.members: dict[str, Member] = {}
        self.committed: dict[TP, int] = {}
        self._joins = 0

    def join(
        self,
        client: Any,
        topics: tuple[str, ...],
        instance_id: str | None,
        partitions: PartitionCount,
    ) -> tuple[Member, Member | None]:
        """A new member; and an active static member it replaces (to be fenced), if any."""
        self._joins += 1
        prefix = instance_id or "rdkafka"
        member = Member(f"{prefix}-{uuid.uuid4()}", client, topics, instance_id, self._joins)
        fenced = None
        previous = next(
            (m for m in self.members.values() if instance_id and m.instance_id == instance_id),
            None,
        )
        if previous is not None:
            # Static membership: the same slot, the same assignment, no rebalance of others.
            del self.members[previous.member_id]
            member.index, member.target = previous.index, set(previous.target)
            if previous.away_since is None:
                fenced = previous
        self.members[member.member_id] = member
        self.rebalance(partitions)
        return member, fenced

    def leave(self, member: Member, partitions: PartitionCount) -> None:
        if self.members.pop(member.member_id, None) is not None:
            self.rebalance(partitions)

    def owner(self, tp: TP) -> Member | None:
        return next((m for m in self.members.values() if tp in m.owned), None)

    def rebalance(self, partitions: PartitionCount) -> None:
        """A new generation with a new target assignment."""
        self.generation += 1
        targets = sticky_assignment(list(self.members.values()), partitions)
        for member in self.members.values():
            member.target = targets[member.member_id]

    def next_step(self, member: Member) -> tuple[str, list[TP]] | None:
        """The member's next rebalance callback: ("revoke" | "assign", partitions).

        An assignment is reserved (owned) at once; a revocation ends with `revoked()`,
        after the client's callback had its chance to commit.
        """
        if self.cooperative:
            gone = member.owned - member.target
            if gone:
                return "revoke", sorted(gone)
            new = sorted(tp for tp in member.target - member.owned if self.owner(tp) is None)
            if new:
                member.owned.update(new)
                return "assign", new
            return None
        if member.synced_generation == self.generation:
            return None
        if member.owned:
            return "revoke", sorted(member.owned)
        if any(self.owner(tp) is not None for tp in member.target):
            return None  # wait for the others to revoke
        member.owned = set(member.target)
        member.synced_generation = self.generation
        return "assign", sorted(member.owned)

    @staticmethod
    def revoked(member: Member, partitions: list[TP]) -> None:
        member.owned.difference_update(partitions)


def sticky_assignment(members: list[Member], partitions: PartitionCount) -> dict[str, set[TP]]:
    """Member id -> partitions: an even share each, keeping as much of the old target."""
    ordered = sorted(members, key=lambda m: m.index)
    targets: dict[str, set[TP]] = {m.member_id: set() for m in ordered}
    if not ordered:
        return targets
    topics = sorted({t for m in ordered for t in m.topics})
    every = [(t, p) for t in topics for p in range(partitions(t))]
    existing = set(every)
    base, extra = divmod(len(every), len(ordered))
    # The members that keep the most get the larger shares: fewer partitions move.
    by_kept = sorted(ordered, key=lambda m: (-len(m.target & existing), m.index))
    share = {m.member_id: base + (1 if i < extra else 0) for i, m in enumerate(by_kept)}
    taken: set[TP] = set()
    for member in ordered:
        for tp in sorted(member.target & existing):
            if len(targets[member.member_id]) >= share[member.member_id]:
                break
            if tp not in taken and tp[0] in member.topics:
                targets[member.member_id].add(tp)
                taken.add(tp)
    for tp in every:
        if tp in taken:
            continue
        eligible = [m for m in ordered if tp[0] in m.topics]
        room = [m for m in eligible if len(targets[m.member_id]) < share[m.member_id]]
        if eligible:
            chosen = min(room or eligible, key=lambda m: (len(targets[m.member_id]), m.index))
            targets[chosen.member_id].add(tp)
    return targets
