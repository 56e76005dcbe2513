"""The leader's view of the cluster: the configuration (voters, learners) and a Progress per
member, plus the votes of an ongoing election."""

from __future__ import annotations

from trio_raft.core.messages import ConfState
from trio_raft.core.progress import Progress
from trio_raft.core.quorum import VoteResult, committed_index, vote_result


class ProgressTracker:
    __slots__ = ("learners", "max_inflight", "progress", "voters", "votes")

    def __init__(self, max_inflight: int) -> None:
        self.max_inflight = max_inflight
        self.voters: set[int] = set()
        self.learners: set[int] = set()
        self.progress: dict[int, Progress] = {}
        self.votes: dict[int, bool] = {}

    def conf_state(self) -> ConfState:
        return ConfState(voters=sorted(self.voters), learners=sorted(self.learners))

    def is_singleton(self) -> bool:
        return len(self.voters) == 1

    def committed(self) -> int:
        prs = self.progress

        def acked(i: int) -> int | None:
            pr = prs.get(i)
            return pr.match if pr is not None else None

        return committed_index(self.voters, acked)

    def reset_votes(self) -> None:
        self.votes = {}

    def record_vote(self, node_id: int, granted: bool) -> None:
        self.votes.setdefault(node_id, granted)

    def tally_votes(self) -> tuple[int, int, VoteResult]:
        granted = sum(1 for v, g in self.votes.items() if g and v in self.voters)
        rejected = sum(1 for v, g in self.votes.items() if not g and v in self.voters)
        return granted, rejected, vote_result(self.voters, self.votes)

    def quorum_active(self) -> bool:
        votes = {i: pr.recent_active for i, pr in self.progress.items() if i in self.voters}
        return vote_result(self.voters, votes) is VoteResult.WON

    def voter_ids(self) -> list[int]:
        return sorted(self.voters)

    def apply_conf_state(self, cs: ConfState, next_index: int) -> None:
        """Replace the configuration wholesale (snapshot restore / initial state)."""
        self.voters = set(cs.voters)
        self.learners = set(cs.learners) - self.voters
        self.progress = {}
        for i in self.voters | self.learners:
            self.progress[i] = Progress(
                next_index, self.max_inflight, is_learner=i in self.learners
            )
