"""Every field of every KV/Admin request is validated: raw bytes from a grpcio client.

grpcio sends exactly the bytes given (no betterproto2 on the client side), so the node sees
values its own client could never produce: unknown enum numbers, wrong wire types, invalid
UTF-8, truncated fields. Each one must be answered INVALID_ARGUMENT (certainly not applied),
and none may reach the log: the node's commit index does not move.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from tests.e2e.h2raw import RawConnection
from tests.e2e.kvprocs import Node, start_node, status, wait_leader
from trio_raft_kv._proto.trio_raft.kv import v1 as pb
from trio_raft_kv.statemachine import MAX_KEY_BYTES, MAX_VALUE_BYTES

pytestmark = pytest.mark.slow

KV, ADMIN = "/trio_raft.kv.v1.KV/", "/trio_raft.kv.v1.Admin/"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = start_node(str(tmp_path_factory.mktemp("validation")), "n1")
    try:
        wait_leader(n.address)
        yield n
    finally:
        n.stop()


@pytest.fixture(scope="module")
def channel(node: Node) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(node.address) as ch:
        yield ch


def call(channel: grpc.Channel, path: str, raw: bytes) -> tuple[grpc.StatusCode, bytes | str]:
    try:
        return grpc.StatusCode.OK, channel.unary_unary(path)(raw, timeout=10)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def field(number: int, wire_type: int, payload: bytes) -> bytes:
    """One protobuf field: tag, then ``payload`` (already encoded for its wire type)."""
    return bytes([number << 3 | wire_type]) + payload


def length_delimited(number: int, data: bytes) -> bytes:
    assert len(data) < 128
    return field(number, 2, bytes([len(data)]) + data)


def varint(number: int, value: int) -> bytes:
    out = bytearray()
    while True:
        b, value = value & 0x7F, value >> 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return field(number, 0, bytes(out))


INVALID: list[tuple[str, str, bytes]] = [
    # Get
    ("unknown read mode", KV + "Get", length_delimited(1, b"k") + varint(2, 77)),
    ("negative-looking read mode", KV + "Get", length_delimited(1, b"k") + varint(2, 2**32 - 1)),
    ("empty key", KV + "Get", varint(2, 1)),
    ("key too long", KV + "Get", bytes(pb.GetRequest(key="k" * (MAX_KEY_BYTES + 1)))),
    ("key of the wrong wire type", KV + "Get", varint(1, 5)),
    ("key not UTF-8", KV + "Get", length_delimited(1, b"\xff\xfe")),
    ("truncated key", KV + "Get", field(1, 2, b"\x10ab")),
    ("truncated varint", KV + "Get", length_delimited(1, b"k") + b"\x10\xff"),
    ("group wire type", KV + "Get", length_delimited(1, b"k") + b"\x1b"),
    # Put / Delete
    ("put empty key", KV + "Put", length_delimited(2, b"v")),
    ("put value too large", KV + "Put", bytes(pb.PutRequest(key="k",
                                                            value=b"x" * (MAX_VALUE_BYTES + 1)))),
    ("put value of the wrong wire type", KV + "Put", length_delimited(1, b"k") + varint(2, 1)),
    ("delete empty key", KV + "Delete", b""),
    ("delete key not UTF-8", KV + "Delete", length_delimited(1, b"\xc3")),
    # CompareAndSwap
    ("cas expected with expect_absent", KV + "CompareAndSwap",
     bytes(pb.CasRequest(key="k", expected=b"e", expect_absent=True, value=b"v"))),
    ("cas expected too large", KV + "CompareAndSwap",
     bytes(pb.CasRequest(key="k", expected=b"e" * (MAX_VALUE_BYTES + 1), value=b"v"))),
    ("cas flag of the wrong wire type", KV + "CompareAndSwap",
     length_delimited(1, b"k") + length_delimited(3, b"yes")),
    # Admin
    ("add-learner without id", ADMIN + "AddLearner",
     bytes(pb.AddLearnerRequest(address="127.0.0.1:7009"))),
    ("add-learner id with '='", ADMIN + "AddLearner",
     bytes(pb.AddLearnerRequest(id="n=4", address="127.0.0.1:7009"))),
    ("add-learner address without port", ADMIN + "AddLearner",
     bytes(pb.AddLearnerRequest(id="n4", address="10.0.0.4"))),
    ("add-learner port out of range", ADMIN + "AddLearner",
     bytes(pb.AddLearnerRequest(id="n4", address="127.0.0.1:70000"))),
    ("promote without id", ADMIN + "Promote", varint(3, 5)),
    ("promote index of the wrong wire type", ADMIN + "Promote",
     length_delimited(1, b"n4") + length_delimited(2, b"7")),
    ("remove id with a space", ADMIN + "Remove", bytes(pb.RemoveRequest(id="n 4"))),
    ("transfer id with a control character", ADMIN + "Transfer",
     bytes(pb.TransferRequest(id="n\x014"))),
    ("announce without id", ADMIN + "Announce", b""),
    ("was-member id too long", ADMIN + "WasMember", bytes(pb.WasMemberRequest(id="n" * 300))),
]


def test_valid_requests_are_served(channel: grpc.Channel) -> None:
    code, raw = call(channel, KV + "Get", bytes(pb.GetRequest(key="nothing",
                                                              mode=pb.ReadMode.LOCAL)))
    assert code is grpc.StatusCode.OK and isinstance(raw, bytes)
    assert pb.GetResponse.parse(raw).found is False
    code, _ = call(channel, KV + "Put", bytes(pb.PutRequest(key="k", value=b"v")))
    assert code is grpc.StatusCode.OK
    # Unknown fields are allowed (a newer client): proto3 ignores them.
    code, raw = call(channel, KV + "Get", length_delimited(1, b"k") + varint(15, 1))
    assert code is grpc.StatusCode.OK and isinstance(raw, bytes)
    assert pb.GetResponse.parse(raw).value == b"v"


@pytest.mark.parametrize(("what", "path", "raw"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_requests_are_refused_and_never_reach_the_log(
        node: Node, channel: grpc.Channel, what: str, path: str, raw: bytes) -> None:
    before = status(node.address)
    assert before is not None
    code, details = call(channel, path, raw)
    assert code is grpc.StatusCode.INVALID_ARGUMENT, (what, code, details)
    assert details and "Traceback" not in str(details)
    after = status(node.address)
    assert after is not None and after.commit_index == before.commit_index


def test_put_stream_with_a_malformed_request_ends_invalid_argument(
        node: Node, channel: grpc.Channel) -> None:
    requests = [bytes(pb.PutRequest(key="s1", value=b"v")), varint(1, 5),
                bytes(pb.PutRequest(key="s2", value=b"v"))]
    stream = channel.stream_stream(KV + "PutStream")
    answers = []
    with pytest.raises(grpc.RpcError) as info:
        for raw in stream(iter(requests), timeout=10):
            answers.append(pb.PutResponse.parse(raw))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert len(answers) == 1  # the first was answered; nothing after the bad one happened
    code, raw = call(channel, KV + "Get", bytes(pb.GetRequest(key="s2")))
    assert code is grpc.StatusCode.OK and isinstance(raw, bytes)
    assert pb.GetResponse.parse(raw).found is False


def framed(raw: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + len(raw).to_bytes(4, "big") + raw


@pytest.mark.parametrize(("case", "tail", "status"), [
    ("malformed", framed(varint(1, 5)), grpc.StatusCode.INVALID_ARGUMENT),
    ("compressed", framed(bytes(pb.PutRequest(key="x", value=b"v")), flag=1),
     grpc.StatusCode.UNIMPLEMENTED),
    ("declared over the cap", b"\x00" + (64 << 20).to_bytes(4, "big"),
     grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_put_stream_requests_that_arrive_together_are_served_in_order(
        node: Node, channel: grpc.Channel, case: str, tail: bytes,
        status: grpc.StatusCode) -> None:
    # Every message in one DATA frame: the server takes those that arrived whole together
    # (grpc_h2server.ready_requests). The ones before the bad message are answered, in order;
    # the bad one ends the call with its status; nothing after it reaches the log.
    tag = case.split()[0]
    good = [framed(bytes(pb.PutRequest(key=f"{tag}{i}", value=b"v%d" % i))) for i in range(3)]
    after = framed(bytes(pb.PutRequest(key=f"{tag}-after", value=b"v")))
    conn = RawConnection(node.address)
    try:
        sid = conn.open_call(KV + "PutStream")
        assert conn.send_all(sid, b"".join(good) + tail + after)
        call = conn.wait_status(sid, 10)
        assert call.status == status.value[0], (call.status, call.message)
        answers = [pb.PutResponse.parse(m) for m in call.messages()]
        assert len(answers) == 3
        assert [a.index for a in answers] == sorted(a.index for a in answers)
    finally:
        conn.close()
    for i in range(3):
        code, raw = call_get(channel, f"{tag}{i}")
        assert code is grpc.StatusCode.OK and pb.GetResponse.parse(raw).value == b"v%d" % i
    code, raw = call_get(channel, f"{tag}-after")
    assert code is grpc.StatusCode.OK and pb.GetResponse.parse(raw).found is False


def call_get(channel: grpc.Channel, key: str) -> tuple[grpc.StatusCode, bytes]:
    code, raw = call(channel, KV + "Get", bytes(pb.GetRequest(key=key)))
    assert isinstance(raw, bytes), raw
    return code, raw
