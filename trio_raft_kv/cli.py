"""The ``kvnode`` command line: ``serve``, client commands, admin commands and ``demo``.

One exit-code table serves every command, present and future (docs/operations.md, "Exit
codes"): :class:`ExitCode`. A command returns ``OK`` or ``NOT_FOUND`` itself and raises
everything else; :func:`main` turns what it raised into a code in one place,
:func:`exit_code_for`, and prints one line on stderr (a traceback only for an internal error,
which is a bug). Usage errors are found while parsing, before anything runs: every address,
``--peers`` entry, id, number and ``--tls-dir`` is checked there.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from grpclib.const import Status

import trio_raft
from trio_raft_kv.errors import (
    NOT_APPLIED_STATUSES,
    InvalidFieldError,
    KVError,
    SealedStoreError,
    StartRefusedError,
    TLSFilesError,
)
from trio_raft_kv.limits import add_limit_flags
from trio_raft_kv.validation import check_member_id, split_address

log = logging.getLogger("kvnode")


class ExitCode(enum.IntEnum):
    """What a ``kvnode`` exit status means (the table in docs/operations.md)."""

    OK = 0
    #: The command ran, and what it looked for was not there: a missing key (get, delete), a
    #: CAS that did not swap.
    NOT_FOUND = 1
    #: The command cannot run as given: a bad flag or value, a missing or unusable --tls-dir,
    #: serve refusing to start (configuration, a wiped member's data dir, kv extra missing).
    USAGE = 2
    #: The server answered FAILED_PRECONDITION or INVALID_ARGUMENT: certainly not applied.
    NOT_APPLIED = 3
    #: The request may have reached the server and nothing says what became of it:
    #: UNAVAILABLE, a deadline, a dropped connection, or any status that does not rule it out.
    OUTCOME_UNKNOWN = 4
    #: No connection could be made (refused, unresolvable, timed out): nothing was sent.
    UNREACHABLE = 5
    #: The server refused the call for another reason: the TLS handshake failed either way,
    #: or PERMISSION_DENIED, UNAUTHENTICATED, UNIMPLEMENTED, RESOURCE_EXHAUSTED.
    REFUSED = 6
    #: The command itself failed: serve stopped on a fatal error (storage, fsync, ...), the
    #: demo did not verify, or an internal error.
    FAILED = 7
    #: Interrupted by SIGINT (client commands; serve treats SIGINT as a clean stop).
    INTERRUPTED = 130


#: Statuses with which a server refuses a call before acting on it (besides NOT_APPLIED's).
REFUSED_STATUSES = frozenset({Status.PERMISSION_DENIED, Status.UNAUTHENTICATED,
                              Status.UNIMPLEMENTED, Status.RESOURCE_EXHAUSTED})
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_CATEGORY = {
    ExitCode.USAGE: "error", ExitCode.NOT_APPLIED: "not applied",
    ExitCode.OUTCOME_UNKNOWN: "outcome unknown", ExitCode.UNREACHABLE: "unreachable",
    ExitCode.REFUSED: "refused", ExitCode.FAILED: "failed", ExitCode.INTERRUPTED: "interrupted",
}


def single_leaf(exc: BaseException) -> BaseException:
    """What ``exc`` is about: the one exception inside (nested) single-member exception
    groups; for an error raised while cleaning up after an ``OSError`` (a server that failed
    to bind, then failed to stop), that ``OSError``."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    context = exc.__context__
    if (not isinstance(exc, trio_raft.RaftError | OSError | KeyboardInterrupt)
            and isinstance(context, OSError)):
        return context
    return exc


def _missing_kv_extra(exc: BaseException) -> bool:
    return isinstance(exc, ModuleNotFoundError) and exc.name == "prometheus_client"


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code for a command that raised ``exc`` (the one place this is decided)."""
    exc = single_leaf(exc)
    if isinstance(exc, KVError):
        if exc.status in NOT_APPLIED_STATUSES:
            return ExitCode.NOT_APPLIED
        if exc.refused:
            return ExitCode.REFUSED
        if not exc.sent:
            return ExitCode.UNREACHABLE
        if exc.status in REFUSED_STATUSES:
            return ExitCode.REFUSED
        return ExitCode.OUTCOME_UNKNOWN
    if isinstance(exc, StartRefusedError | TLSFilesError | InvalidFieldError
                  | trio_raft.errors.ConfigError | ValueError
                  | trio_raft.errors.DataDirNotEmptyError | trio_raft.errors.WALLockedError
                  | trio_raft.errors.RecoveryError | trio_raft.errors.KeyStoreError
                  | SealedStoreError) or _missing_kv_extra(exc):
        return ExitCode.USAGE
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    return ExitCode.FAILED


def describe(exc: BaseException, code: ExitCode) -> str:
    """The one line printed on stderr for ``exc``."""
    exc = single_leaf(exc)
    if isinstance(exc, KVError):
        text = str(exc) + (f"; leader is at {exc.leader_address}" if exc.leader_address else "")
    elif isinstance(exc, StartRefusedError):
        return f"kvnode: refusing to start: {exc}"
    elif _missing_kv_extra(exc):
        text = "this command needs the kv extra (pip install 'trio-raft[kv]')"
    elif isinstance(exc, KeyboardInterrupt):
        text = "SIGINT"
    elif isinstance(exc, TLSFilesError | InvalidFieldError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return f"kvnode: {_CATEGORY.get(code, 'error')}: {text}"


# -- argument types (each failure is a usage error naming the value) --------------------------

def _host_port(what: str, *, any_port: bool = False) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            split_address(text, what, any_port=any_port)
        except InvalidFieldError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{what}: ")) from None
        return text

    return parse


def _peers(text: str) -> str:
    try:
        peers = trio_raft.parse_peers(text)
        for p in peers:
            check_member_id(p.id, "peer id")
            split_address(p.address, f"peer {p.id}")
    except (trio_raft.errors.ConfigError, InvalidFieldError) as exc:
        raise argparse.ArgumentTypeError(f"expected ID=HOST:PORT,...: {exc}") from None
    return text


def _member_id(text: str) -> str:
    try:
        check_member_id(text)
    except InvalidFieldError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _tls_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    missing = [n for n in ("ca.crt", "node.crt", "node.key")
               if not os.path.isfile(os.path.join(text, n))]
    if missing:
        raise argparse.ArgumentTypeError(f"{text!r} lacks {', '.join(missing)}")
    return text


def _number(kind: type, low: float, what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, 1, "a positive integer")
_positive_float = _number(float, 1e-9, "a positive number")
_non_negative_float = _number(float, 0.0, "a number >= 0")
_non_negative_int = _number(int, 0, "an integer >= 0")


# -- the parser ---------------------------------------------------------------------------------

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (off, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "", False):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Reports a usage error in one line (no usage dump) and exits with ExitCode.USAGE."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_client_opts(p: argparse.ArgumentParser, *, timeout: float = 10.0) -> None:
    p.add_argument("--addr", default="127.0.0.1:7001", type=_host_port("--addr"),
                   help="HOST:PORT of any node (writes and admin calls follow the leader)")
    p.add_argument("--tls-dir", default=None, type=_tls_dir,
                   help="mutual TLS: DIR/ca.crt (trusted CA), DIR/node.crt and DIR/node.key "
                        "(this client's certificate)")
    p.add_argument("--timeout", type=_positive_float, default=timeout,
                   help="deadline of each call, seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--hex", action="store_true", help="values are given and printed as hex")


def _add_force_kek_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="skip the check that every member answers and runs with the leader's "
                        "KEK (a member that cannot open the new key stops)")


def _add_offline_opts(p: argparse.ArgumentParser) -> None:
    """Options of the commands that work on a stopped node's data dir."""
    p.add_argument("--data-dir", required=True, help="the node's data dir")
    p.add_argument("--id", required=True, type=_member_id, help="this node's id, e.g. n1")
    p.add_argument("--peers", required=True, type=_peers,
                   help="ID=HOST:PORT,...: the members of the new cluster, this node included")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_key_opts(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    """The raft envelope's key store and KEK (docs/envelope.md, docs/operations.md)."""
    p.add_argument("--key-dir", default=None, required=required,
                   help="this node's key store directory (the envelope's data keys, sealed "
                        "with the KEK; keep it outside the data dir)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--kek-file", default=None,
                   help="the key-encryption key: a file of 32 raw bytes, 64 hex digits or "
                        "base64, readable by its owner only (chmod 600)")
    g.add_argument("--kek-env", default=None, metavar="NAME",
                   help="the key-encryption key from environment variable NAME (hex or "
                        "base64)")


def check_key_opts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--key-dir and a KEK (--kek-file or --kek-env) go together."""
    key_dir = getattr(args, "key_dir", None)
    kek = getattr(args, "kek_file", None) or getattr(args, "kek_env", None)
    if bool(key_dir) != bool(kek):
        parser.error("--key-dir needs --kek-file or --kek-env, and they need --key-dir")


def _sub(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".",
        formatter_class=_HelpFormatter)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from trio_raft._version import __version__

    parser = _Parser(prog="kvnode", formatter_class=_HelpFormatter,
                     description="A replicated key/value service on trio_raft. Exit codes: "
                                 "see docs/operations.md.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do (COMMAND --help for its options)")

    s = _sub(sub, "serve", "run one node until SIGINT/SIGTERM")
    s.add_argument("--id", required=True, type=_member_id, help="this node's id, e.g. n1")
    s.add_argument("--listen", required=True, type=_host_port("--listen", any_port=True),
                   help="HOST:PORT to serve raft and the KV/Admin services on")
    s.add_argument("--peers", default="", type=_peers,
                   help="ID=HOST:PORT,...: how this node reaches each member (its own entry "
                        "is its advertised address)")
    s.add_argument("--data-dir", required=True, help="where the WAL and snapshots live")
    s.add_argument("--bootstrap", action="store_true",
                   help="form the cluster from --peers (only acts on an empty data dir)")
    s.add_argument("--join-as-learner", action="store_true",
                   help="join an existing cluster instead of forming one: on an empty data "
                        "dir, wait until a member adds this node with add-learner")
    s.add_argument("--snapshot-every", type=_positive_int, default=10_000,
                   help="take a state machine snapshot every N applied entries")
    s.add_argument("--store", choices=["memory", "sqlite"], default="memory",
                   help="where the KV data lives: memory (rebuilt from the newest snapshot "
                        "at every start) or sqlite (DATA_DIR/kv-store/kv.sqlite; a restart "
                        "skips the snapshot restore when the store holds it)")
    s.add_argument("--tls-dir", default=None, type=_tls_dir,
                   help="mutual TLS for raft and clients: DIR/ca.crt, DIR/node.crt, "
                        "DIR/node.key")
    s.add_argument("--metrics-listen", default=None,
                   type=_host_port("--metrics-listen", any_port=True),
                   help="HOST:PORT for Prometheus text exposition (/metrics)")
    s.add_argument("--no-native-lanes", action="store_true",
                   help="send and serve the raft streams through grpclib too (by default "
                        "they are sent, and without TLS served, on the trio thread: "
                        "docs/transport.md 3.8)")
    s.add_argument("--tick-interval", type=_positive_float, default=0.01,
                   help="seconds per raft tick")
    s.add_argument("--heartbeat-tick", type=_positive_int, default=10,
                   help="ticks between leader heartbeats")
    s.add_argument("--election-tick", type=_positive_int, default=100,
                   help="ticks without a leader before an election")
    s.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                   help="log level on stderr")
    s.add_argument("--gc-threshold", type=_non_negative_int, default=trio_raft.GC_THRESHOLD,
                   help="the garbage collector's young-generation threshold, set once the "
                        "node has started, with what it holds then frozen (0: leave the "
                        "interpreter's settings; docs/operations.md, \"Garbage collection\")")
    # Tests only (tests/chaos): a file holding the seconds to wait before each WAL write,
    # re-read every time, so a test can make the disk slow and fast again at run time.
    s.add_argument("--test-fsync-delay-file", default=None, help=argparse.SUPPRESS)
    _add_key_opts(s)
    add_limit_flags(s)

    p = _sub(sub, "put", "set KEY to VALUE")
    p.add_argument("key", help="the key (UTF-8)")
    p.add_argument("value", help="the value (UTF-8 text, or hex with --hex)")
    _add_client_opts(p)
    p = _sub(sub, "get", "read KEY")
    p.add_argument("key", help="the key (UTF-8)")
    p.add_argument("--mode", choices=["linearizable", "lease", "local"], default="linearizable",
                   help="linearizable: a ReadIndex round; lease: served by the leader while "
                        "its lease holds; local: this node's state, possibly stale")
    _add_client_opts(p)
    p = _sub(sub, "delete", "delete KEY")
    p.add_argument("key", help="the key (UTF-8)")
    _add_client_opts(p)
    p = _sub(sub, "cas", "set KEY to VALUE if it currently equals --expected")
    p.add_argument("key", help="the key (UTF-8)")
    p.add_argument("value", help="the new value (UTF-8 text, or hex with --hex)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--expected", help="the value KEY must hold for the swap")
    g.add_argument("--expect-absent", action="store_true", help="swap only if KEY is absent")
    _add_client_opts(p)
    p = _sub(sub, "status", "one node's raft status (and the members)")
    _add_client_opts(p)

    p = _sub(sub, "add-learner", "add a node as a non-voting learner")
    p.add_argument("id", help="the new node's id")
    p.add_argument("address", help="HOST:PORT the members reach the new node at")
    _add_client_opts(p)
    p = _sub(sub, "promote", "make a caught-up learner a voter")
    p.add_argument("id", help="the learner's id")
    p.add_argument("--wait", type=_non_negative_float, default=30.0,
                   help="keep retrying while the learner catches up, seconds")
    _add_client_opts(p)
    p = _sub(sub, "remove", "remove a member")
    p.add_argument("id", help="the member's id")
    _add_client_opts(p)
    p = _sub(sub, "transfer", "hand leadership to another voter")
    p.add_argument("--to", default="", help="target id (none: the engine picks)")
    _add_client_opts(p)

    sn = _sub(sub, "snapshot", "back the cluster's data up to a file, or restore a data dir "
              "from one")
    snsub = sn.add_subparsers(dest="action", required=True, metavar="ACTION",
                              help="save or restore (ACTION --help for its options)")
    p = _sub(snsub, "save", "write a consistent backup of the cluster's data (taken by the "
             "leader) to FILE")
    p.add_argument("file", help="the backup file to write (replaced atomically)")
    _add_client_opts(p, timeout=300.0)
    p = _sub(snsub, "restore", "prepare an empty data dir from a backup FILE: serve with the "
             "same --id and --peers then starts a new cluster holding exactly that data")
    p.add_argument("file", help="a backup written by snapshot save")
    _add_offline_opts(p)
    _add_key_opts(p)
    p = _sub(sub, "recover", "UNSAFE: rewrite a stopped survivor of a cluster that lost its "
             "quorum for good as a new cluster of --peers (docs/operations.md)")
    _add_offline_opts(p)

    en = _sub(sub, "encryption", "the raft envelope: entries, snapshots and the store sealed "
              "at rest (docs/operations.md)")
    ensub = en.add_subparsers(dest="action", required=True, metavar="ACTION",
                              help="enable, rotate or rotate-kek (ACTION --help for its options)")
    p = _sub(ensub, "enable", "turn the envelope on (the cutover; answers the cutover index), "
             "then compact every member so no earlier cleartext stays on disk")
    p.add_argument("--no-compact", action="store_true",
                   help="skip the compaction: entries written before the cutover stay in the "
                        "logs until the next snapshots compact them")
    _add_force_kek_opt(p)
    _add_client_opts(p, timeout=60.0)
    p = _sub(ensub, "rotate", "replicate a new data key and make it the active one")
    _add_force_kek_opt(p)
    _add_client_opts(p, timeout=60.0)
    p = _sub(ensub, "rotate-kek", "re-seal a stopped node's key store under a new KEK "
             "(the log is not touched)")
    p.add_argument("--key-dir", required=True, help="the node's key store directory")
    p.add_argument("--kek-file", required=True, help="the current KEK file")
    p.add_argument("--new-kek-file", required=True, help="the new KEK file (chmod 600)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    d = _sub(sub, "demo", "run a local 3-node cluster through a failover")
    d.add_argument("--duration", type=_positive_float, default=20.0,
                   help="seconds of client load in total")
    d.add_argument("--clients", type=_positive_int, default=16,
                   help="concurrent client tasks")
    d.add_argument("--keep-dir", action="store_true", help="keep the data dirs and logs")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from trio_raft_kv.serve import serve_main

        return serve_main(args)
    if args.command == "demo":
        from trio_raft_kv.demo import demo_main

        return demo_main(args)
    if args.command == "recover" or (args.command == "snapshot" and args.action == "restore") \
            or (args.command == "encryption" and args.action == "rotate-kek"):
        from trio_raft_kv.commands import run_offline_command

        return run_offline_command(args)
    from trio_raft_kv.commands import run_client_command

    return asyncio.run(run_client_command(args))


def main(argv: list[str] | None = None) -> int:
    """Run ``kvnode`` with ``argv`` (default: the process's); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_key_opts(parser, args)
    try:
        return int(_run(args))
    except (Exception, KeyboardInterrupt) as exc:
        code = exit_code_for(exc)
        if code is ExitCode.FAILED and not isinstance(
                single_leaf(exc), trio_raft.RaftError | OSError):
            log.error("internal error", exc_info=exc)
            logging.shutdown()
        print(describe(exc, code), file=sys.stderr, flush=True)
        return int(code)
