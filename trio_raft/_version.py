"""The version of the trio-raft distribution (trio_raft and trio_raft_kv): its one source."""

__version__ = "0.1.0"
