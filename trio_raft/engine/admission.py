"""What the run loop does with the requests it takes from the inbox.

``Admission.take`` goes through the queued requests in arrival order: proposals that may be
admitted go to raft as one batch (one Ready, one WAL write, one fsync for all of them);
refused ones fail at once with a "not applied" error (``docs/api.md``); reads go to ``Reads``
(the leader, or a follower that knows a leader, serves them); admin requests to the
``AdminHandler``.

A proposal is admitted only on the leader, when no leadership transfer is under way (raft would
drop it, Raft thesis §3.10) and the envelope gate lets it through (``envelope_gate.py``).
"""

from __future__ import annotations

from collections import deque

from trio_raft.core.errors import RaftError as CoreRaftError
from trio_raft.core.messages import NONE, Entry, StateType
from trio_raft.core.rawnode import RawNode
from trio_raft.engine.admin import AdminHandler
from trio_raft.engine.contexts import encode_proposal
from trio_raft.engine.envelope_gate import EnvelopeGate
from trio_raft.engine.pending import Pending
from trio_raft.engine.requests import ProposeRequest, ReadRequest, Request
from trio_raft.errors import LeadershipTransferInProgressError, NotLeaderError


class Admission:
    """See the module docstring."""

    def __init__(self, *, node: RawNode, gate: EnvelopeGate, pending: Pending,
                 admin: AdminHandler) -> None:
        self._node = node
        self._gate = gate
        self._pending = pending
        self._admin = admin

    def take(self, requests: deque[Request]) -> None:
        batch: list[ProposeRequest] = []
        while requests:
            req = requests.popleft()
            if isinstance(req, ProposeRequest):
                if self._admit(req):
                    batch.append(req)
            elif isinstance(req, ReadRequest):
                self._pending.reads.admit(req, self._read_refusal(req))
            else:
                self._admin.handle(req)
        if not batch:
            return
        entries = []
        admitted = []
        sealed = [r for r in batch if r.seal]
        # Wrapped here back to back (docs/envelope.md, "Cost").
        wrapped = iter(self._gate.wrap_admitted(sealed) if sealed else ())
        for r in batch:
            if r.seal:
                payload = next(wrapped)
                if isinstance(payload, Exception):  # no key, nonces exhausted: it fails
                    self._pending.forget(r)
                    r.waiter.fail(payload)
                    continue
            else:
                payload = r.data
            entries.append(Entry(0, 0, data=encode_proposal(r.request_id, payload)))
            admitted.append(r)
        if not entries:
            return
        batch = admitted
        try:
            self._node.propose_entries(entries)
        except CoreRaftError as exc:
            for r in batch:
                self._pending.forget(r)
                r.waiter.fail(NotLeaderError(str(exc)))

    def _admit(self, req: ProposeRequest) -> bool:
        if req.waiter.done:
            return False
        err = self.refusal(req.admin)
        if err is not None:
            self._pending.forget(req)
            req.waiter.fail(err)
            return False
        return True

    def refusal(self, admin: bool) -> BaseException | None:
        """Why a proposal may not go to raft now (None: it may)."""
        r = self._node.raft
        if r.state is not StateType.LEADER:
            return NotLeaderError()
        if r.lead_transferee != NONE:
            return LeadershipTransferInProgressError()
        return self._gate.reject_reason(admin)

    def _read_refusal(self, req: ReadRequest) -> BaseException | None:
        """Linearizable reads are served by any node that knows a leader (the leader confirms
        the read index); ``verify_leader`` only on the leader."""
        r = self._node.raft
        if r.state is StateType.LEADER or not req.wait_applied:
            return self.refusal(admin=True)
        if r.state is not StateType.FOLLOWER or r.lead == NONE:
            return NotLeaderError("no known leader to confirm the read")
        return None
