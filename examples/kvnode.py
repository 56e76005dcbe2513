"""kvnode: a replicated key/value service on trio_raft (the project's demo application).

    python examples/kvnode.py demo                      # a local 3-node cluster through a failover
    python examples/kvnode.py serve --id n1 --listen 127.0.0.1:7001 \\
        --peers n1=127.0.0.1:7001,n2=127.0.0.1:7002,n3=127.0.0.1:7003 --data-dir /tmp/n1 --bootstrap
    python examples/kvnode.py put greeting hello --addr 127.0.0.1:7002
    python examples/kvnode.py get greeting --addr 127.0.0.1:7003 --mode lease

The same command is installed as ``kvnode`` (``pip install .[kv]``). Every node serves the raft
transport and the KV/Admin gRPC services (protos/kv.proto) on one port. The implementation is the
``trio_raft_kv`` package; docs/operations.md describes running a cluster.
"""

from __future__ import annotations

import sys

from trio_raft_kv.cli import main

if __name__ == "__main__":
    sys.exit(main())
