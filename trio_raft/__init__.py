"""trio_raft: a Raft consensus engine for trio applications."""

from trio_raft import errors
from trio_raft.errors import RaftError

__version__ = "0.1.0"

__all__ = ["RaftError", "__version__", "errors"]
