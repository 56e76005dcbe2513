"""The ``kvnode`` command's exit codes (docs/operations.md, "Exit codes"), end to end.

Every class of the table is produced by a real situation against real node processes: a key
that is not there, a request the server refuses (INVALID_ARGUMENT, FAILED_PRECONDITION), a
write whose WAL fsync does not finish before the client's deadline (outcome unknown), a port
nobody listens on, TLS refused in either direction, bad command lines, a node that cannot bind.
Each failure is one line on stderr, never a traceback.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

import trio_raft
from tests.e2e.kvprocs import KVNODE, Node, cli, start_node, wait_leader
from trio_raft_kv.cli import ExitCode, build_parser

pytestmark = pytest.mark.slow


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def write_tls_dir(path: str, ca: trustme.CA, cert: trustme.LeafCert) -> str:
    os.makedirs(path, exist_ok=True)
    ca.cert_pem.write_to_path(os.path.join(path, "ca.crt"))
    cert.cert_chain_pems[0].write_to_path(os.path.join(path, "node.crt"))
    cert.private_key_pem.write_to_path(os.path.join(path, "node.key"))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("exit-codes"))


@pytest.fixture(scope="module")
def node(root: str) -> Iterator[Node]:
    n = start_node(root, "n1")
    try:
        wait_leader(n.address)
        yield n
    finally:
        n.stop()


@pytest.fixture(scope="module")
def tls(root: str) -> Iterator[dict[str, Any]]:
    """A node requiring mutual TLS, and client TLS dirs: trusted, wrong CA, distrusting."""
    ca, other = trustme.CA(), trustme.CA()
    dirs = {
        "server": write_tls_dir(os.path.join(root, "tls-server"), ca, ca.issue_cert("127.0.0.1")),
        "good": write_tls_dir(os.path.join(root, "tls-good"), ca, ca.issue_cert("client")),
        # trusts the server, presents a certificate the server does not trust
        "foreign": write_tls_dir(os.path.join(root, "tls-foreign"), ca,
                                 other.issue_cert("client")),
        # presents a good certificate, does not trust the server's
        "distrust": write_tls_dir(os.path.join(root, "tls-distrust"), other,
                                  ca.issue_cert("client")),
    }
    n = start_node(root, "tls1", "--tls-dir", dirs["server"])
    try:
        yield {"node": n, **dirs}
    finally:
        n.stop()


def test_ok_and_not_found(node: Node) -> None:
    assert cli("put", "k", "v", "--addr", node.address).returncode == ExitCode.OK
    r = cli("get", "k", "--addr", node.address)
    assert (r.returncode, r.stdout.strip()) == (ExitCode.OK, "v")
    r = cli("get", "missing", "--addr", node.address)
    assert (r.returncode, r.stdout.strip()) == (ExitCode.NOT_FOUND, "(not found)")
    assert cli("delete", "missing", "--addr", node.address).returncode == ExitCode.NOT_FOUND
    r = cli("cas", "k", "w", "--expected", "not-v", "--addr", node.address)
    assert r.returncode == ExitCode.NOT_FOUND
    assert cli("get", "k", "--addr", node.address).stdout.strip() == "v"


def test_not_applied(node: Node) -> None:
    bad = cli("put", "", "x", "--addr", node.address)  # INVALID_ARGUMENT
    assert bad.returncode == ExitCode.NOT_APPLIED
    assert "INVALID_ARGUMENT" in one_line_error(bad)
    # FAILED_PRECONDITION: a single voter has no one to hand leadership to.
    refused = cli("transfer", "--addr", node.address)
    assert refused.returncode == ExitCode.NOT_APPLIED
    assert "FAILED_PRECONDITION" in one_line_error(refused)


def test_outcome_unknown_when_the_write_is_stuck_in_fsync(root: str) -> None:
    delay_file = os.path.join(root, "fsync-delay")
    with open(delay_file, "w") as f:
        f.write("0")
    n = start_node(root, "slow1", "--test-fsync-delay-file", delay_file)
    try:
        wait_leader(n.address)
        with open(delay_file, "w") as f:
            f.write("3")  # every WAL write now waits 3 s: the put cannot be acknowledged
        r = cli("put", "k", "v", "--addr", n.address, "--timeout", "0.5")
        with open(delay_file, "w") as f:
            f.write("0")
        assert r.returncode == ExitCode.OUTCOME_UNKNOWN, r.stderr
        assert "DEADLINE_EXCEEDED" in one_line_error(r)
        # The write was sent: it commits once the disk is back.
        deadline = time.monotonic() + 30
        while (g := cli("get", "k", "--addr", n.address)).returncode != ExitCode.OK:
            assert time.monotonic() < deadline, g.stderr
        assert g.stdout.strip() == "v"
    finally:
        n.stop()


def test_unreachable() -> None:
    with socket.socket() as s:  # a port that is certainly closed: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        r = cli("put", "k", "v", "--addr", f"127.0.0.1:{port}")
    assert r.returncode == ExitCode.UNREACHABLE
    assert "unreachable" in one_line_error(r)
    r = cli("status", "--addr", "no-such-host.invalid:7001")
    assert r.returncode == ExitCode.UNREACHABLE
    one_line_error(r)


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_silent_server_is_unreachable_and_sigint_interrupts() -> None:
    """A server that accepts the connection and never speaks HTTP/2: the client sends nothing
    and gives up at its deadline (unreachable); SIGINT while it waits is exit 130."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(30)
        addr = f"127.0.0.1:{listener.getsockname()[1]}"
        r = cli("put", "k", "v", "--addr", addr, "--timeout", "0.5")
        assert r.returncode == ExitCode.UNREACHABLE, r.stderr
        assert "no connection within" in one_line_error(r)
        listener.accept()[0].close()  # the connection that call made

        # The client starts with SIGINT's default disposition whatever this process inherited:
        # a job started in the background of a non-interactive shell ignores SIGINT, and
        # Python (so the client) keeps ignoring a signal ignored at its start.
        proc = subprocess.Popen([sys.executable, KVNODE, "put", "k", "v", "--addr", addr,
                                 "--timeout", "60"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                                preexec_fn=default_sigint)
        conn, _ = listener.accept()  # the client is connected and waiting for the server
        with conn:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert one_line_error(subprocess.CompletedProcess([], proc.returncode, out, err))


def test_tls_trusted_client_is_served_and_others_are_refused(tls: dict[str, Any]) -> None:
    addr = tls["node"].address
    wait_leader_tls = cli("put", "k", "v", "--addr", addr, "--tls-dir", tls["good"])
    assert wait_leader_tls.returncode in (ExitCode.OK, ExitCode.NOT_APPLIED)  # may not lead yet
    r = cli("status", "--addr", addr, "--tls-dir", tls["good"])
    assert r.returncode == ExitCode.OK, r.stderr
    for client in ("foreign", "distrust"):
        r = cli("put", "k", "v", "--addr", addr, "--tls-dir", tls[client])
        assert r.returncode == ExitCode.REFUSED, (client, r.stderr)
        assert "refused" in one_line_error(r)
    r = cli("status", "--addr", addr)  # plaintext to a TLS-only node
    assert r.returncode == ExitCode.REFUSED, r.stderr
    one_line_error(r)


def test_usage_errors_are_one_line(root: str) -> None:
    cases = [
        ("get", "k", "--addr", "nohost"),
        ("get", "k", "--addr", "127.0.0.1:99999"),
        ("get", "k", "--tls-dir", os.path.join(root, "no-such-dir")),
        ("put", "k", "zz", "--hex"),
        ("serve", "--id", "n1", "--listen", "127.0.0.1:7001", "--data-dir", "d",
         "--log-level", "loud"),
        ("serve", "--id", "n1", "--listen", "127.0.0.1:7001", "--data-dir", "d",
         "--snapshot-every", "0"),
        ("serve", "--id", "n1", "--listen", "127.0.0.1:7001", "--data-dir", "d",
         "--gc-threshold", "-1"),
        ("serve", "--id", "n1", "--listen", "127.0.0.1:7001", "--data-dir", "d",
         "--gc-threshold", "lots"),
        ("frobnicate",),
    ]
    for args in cases:
        r = cli(*args)
        assert r.returncode == ExitCode.USAGE, (args, r.stderr)
        assert "error" in one_line_error(r), args
    # A --tls-dir whose files are not certificates: refused before anything is sent.
    junk = os.path.join(root, "tls-junk")
    os.makedirs(junk, exist_ok=True)
    for name in ("ca.crt", "node.crt", "node.key"):
        with open(os.path.join(junk, name), "w") as f:
            f.write("not a certificate\n")
    r = cli("status", "--tls-dir", junk)
    assert r.returncode == ExitCode.USAGE
    assert "tls-junk" in one_line_error(r)


def test_serve_tunes_the_collector_once_started(root: str, node: Node) -> None:
    # docs/operations.md, "Garbage collection": by default a node raises the young
    # generation's threshold once it has started; --gc-threshold 0 leaves the interpreter's.
    assert node.ready["gc_threshold"] == trio_raft.GC_THRESHOLD
    interpreter = subprocess.run([sys.executable, "-c", "import gc; print(gc.get_threshold()[0])"],
                                 capture_output=True, text=True, check=True)
    plain = start_node(root, "gc0", "--gc-threshold", "0")
    try:
        assert plain.ready["gc_threshold"] == int(interpreter.stdout) != trio_raft.GC_THRESHOLD
    finally:
        plain.stop()
    tuned = start_node(root, "gc1", "--gc-threshold", "1234", "--log-level", "info")
    try:
        assert tuned.ready["gc_threshold"] == 1234
    finally:
        tuned.stop()
    assert "gc thresholds (1234, 20, 10)" in tuned.log()


def test_serve_refuses_a_peer_without_port_at_once(root: str) -> None:
    data_dir = os.path.join(root, "never")
    t0 = time.monotonic()
    r = cli("serve", "--id", "n1", "--listen", "127.0.0.1:0", "--data-dir", data_dir,
            "--bootstrap", "--peers", "n1=127.0.0.1:7001,n2=host", timeout=20)
    assert r.returncode == ExitCode.USAGE
    assert "n2" in one_line_error(r) and "HOST:PORT" in r.stderr
    assert '"ready"' not in r.stdout and not os.path.exists(data_dir)
    assert time.monotonic() - t0 < 15


def test_serve_that_cannot_bind_fails_in_one_line(root: str, node: Node) -> None:
    r = cli("serve", "--id", "n9", "--listen", node.address, "--data-dir",
            os.path.join(root, "n9"), "--bootstrap")
    assert r.returncode == ExitCode.FAILED
    assert "address already in use" in one_line_error(r)


def test_version_and_help() -> None:
    r = cli("--version")
    assert (r.returncode, r.stdout.strip()) == (0, f"kvnode {trio_raft.__version__}")
    r = cli("serve", "--help")
    assert r.returncode == 0
    assert "(default: 10000)" in r.stdout and "(default: warning)" in r.stdout
    assert "{debug,info,warning,error,critical}" in r.stdout
    r = cli("--help")
    assert r.returncode == 0 and "put" in r.stdout and KVNODE not in r.stdout


def test_every_argument_has_help() -> None:
    parsers = [build_parser()]
    for p in parsers:  # grows while it is walked: nested commands (snapshot save) too
        for action in p._actions:
            if action.choices and isinstance(action.choices, dict):
                parsers += list(action.choices.values())
    assert len(parsers) == 20  # encryption, enable, rotate, rotate-kek included
    for p in parsers:
        for action in p._actions:
            if action.help == "==SUPPRESS==":
                continue  # tests-only flags
            assert action.help, (p.prog, action.dest)
