"""Unit tests of the kvnode service's parts (the trio_raft_kv package), in process."""
