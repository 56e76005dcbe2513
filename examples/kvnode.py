"""kvnode: a replicated key/value service on trio_raft (the project's demo application).

    python examples/kvnode.py demo                      # a local 3-node cluster through a failover
    python examples/kvnode.py serve --id n1 --listen 127.0.0.1:7001 \\
        --peers n1=127.0.0.1:7001,n2=127.0.0.1:7002,n3=127.0.0.1:7003 --data-dir /tmp/n1 --bootstrap
    python examples/kvnode.py put greeting hello --addr 127.0.0.1:7002
    python examples/kvnode.py get greeting --addr 127.0.0.1:7003 --mode lease

Every node serves the raft transport and the KV/Admin gRPC services (protos/kv.proto) on one port.
The implementation lives in examples/kvnode_lib/; see docs/operations.md for running a cluster.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kvnode_lib.cli import main

if __name__ == "__main__":
    sys.exit(main())
