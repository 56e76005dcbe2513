"""``python -m trio_raft_kv``: the ``kvnode`` command (what the demo uses to start its nodes)."""

import sys

from trio_raft_kv.cli import main

if __name__ == "__main__":
    sys.exit(main())
