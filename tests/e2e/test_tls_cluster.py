"""A 3-node kvnode cluster under mutual TLS, through the CLI: every node's raft traffic goes in
TLS (the replication and priority lanes native on the sending side, served by grpclib:
docs/transport.md 3.8), and writes, follower reads and a leadership transfer work."""

from __future__ import annotations

import json
import os
from typing import Any

import trustme

from tests.e2e.opsprocs import N3, Procs, kvnode, kvnode_json, poll


def write_tls_dir(path: str, ca: trustme.CA, name: str) -> str:
    cert = ca.issue_cert("127.0.0.1", name)
    os.makedirs(path, exist_ok=True)
    ca.cert_pem.write_to_path(os.path.join(path, "ca.crt"))
    cert.cert_chain_pems[0].write_to_path(os.path.join(path, "node.crt"))
    cert.private_key_pem.write_to_path(os.path.join(path, "node.key"))
    return path


def test_a_mutual_tls_cluster_replicates_reads_and_transfers(tmp_path: Any) -> None:
    root = str(tmp_path)
    ca = trustme.CA()
    tls = {n: write_tls_dir(os.path.join(root, f"tls-{n}"), ca, n) for n in N3}
    client_tls = write_tls_dir(os.path.join(root, "tls-client"), ca, "client")
    procs = Procs(root, N3)
    addrs = procs.addrs
    try:
        for n in N3:
            procs.serve(n, N3, "--bootstrap", "--tls-dir", tls[n])

        def st(n: str) -> dict[str, Any] | None:
            r = kvnode("status", "--addr", addrs[n], "--tls-dir", client_tls, "--json",
                       "--timeout", "2")
            return None if r.returncode else dict(json.loads(r.stdout))

        def leader() -> str | None:
            for n in N3:
                s = st(n)
                if s is not None and s["state"] == "leader" and s["applied_index"] > 0:
                    return n
            return None

        first = poll(leader, 60, "a leader elected over TLS")
        for i in range(3):
            r = kvnode("put", f"k{i}", f"v{i}", "--addr", addrs[first], "--tls-dir", client_tls)
            assert r.returncode == 0, r.stderr
        target = kvnode_json("status", "--addr", addrs[first], "--tls-dir",
                             client_tls)["applied_index"]

        def everyone_applied() -> bool:
            return all((s := st(n)) is not None and s["applied_index"] >= target for n in N3)

        poll(everyone_applied, 60, "every node to apply the writes")
        for n in N3:
            r = kvnode("get", "k2", "--mode", "local", "--addr", addrs[n], "--tls-dir",
                       client_tls)
            assert (r.returncode, r.stdout.strip()) == (0, "v2"), (n, r.stderr)
        # A transfer: TimeoutNow and the votes travel the priority lane, in TLS.
        other = next(n for n in N3 if n != first)
        r = kvnode("transfer", "--to", other, "--addr", addrs[first], "--tls-dir", client_tls)
        assert r.returncode == 0, r.stderr
        poll(lambda: leader() == other, 60, f"{other} to lead")
        r = kvnode("put", "after", "transfer", "--addr", addrs[first], "--tls-dir", client_tls)
        assert r.returncode == 0, r.stderr  # written through the new leader
        r = kvnode("get", "after", "--addr", addrs[first], "--tls-dir", client_tls)
        assert (r.returncode, r.stdout.strip()) == (0, "transfer"), r.stderr
    finally:
        procs.stop_all()
