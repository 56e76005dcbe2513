"""The implementation of examples/kvnode.py (demo code, outside the trio_raft package)."""
