"""The command line: ``python -m trio_replica COMMAND``.

* ``node``: run one node until SIGINT or SIGTERM, then leave gracefully and exit 0.
* ``status``: ask a running node, over its authenticated control path, for its views and counters.
* ``cluster``: start a small local cluster in this process and print the views it forms.
* ``demo``: a local cluster that replicates a map, loses a node and heals (`trio_replica.demo`).
* ``put``, ``get``, ``delete``, ``watch``, ``dump``, ``digest``: drive and observe a
  replicated map hosted by a running node (values are JSON on the command line; bytes
  print as ``{"$bytes": base64}``). ``dump`` prints every key as a JSON line with its
  value, writer and HLC timestamp; ``digest`` a summary two nodes' maps can be compared
  by; ``watch --snapshot`` the map as it stands before its changes.

This module owns the parser, ``main`` (which runs a command and turns a user's error into
a message and an exit status) and the commands that run a node or a cluster here (``node``,
``cluster``, ``demo``, ``key``); the commands that talk to a running node over the control
path are in `trio_replica.ops.cli_control`.

``node`` reads its settings from ``--config FILE`` (TOML) and ``--set KEY=VALUE`` flags, by
the dotted names of the README's "Configuration" table (`trio_replica.ops.config_file`); the
named flags override both. With ``--metrics`` it also answers ``/readyz`` and
``/healthz``. Map requests on the control path wait (up to 3 s) until its maps are open.

Every command takes ``--log-level`` and ``--log-json`` (`trio_replica.runtime.logs`); ``node`` takes
``--metrics HOST:PORT`` to serve Prometheus metrics (`trio_replica.ops.metrics`). Errors a
user can fix (a bad address, a missing secret file, a node that does not answer) end with
a one-line message and exit status 2 or 1, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from .errors import ConfigError, ReplicaError
from .node import open_node
from .ops.cli_control import (
    read_keyring,
    run_builtin,
    run_map_command,
    run_registry,
    run_status,
    tls_contexts,
)
from .runtime.config import NodeConfig
from .runtime.logs import LEVELS, node_context, setup_logging
from .version import __version__

log = logging.getLogger("trio_replica.cli")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level",
        default="WARNING",
        choices=LEVELS,
        help="logging level (default: WARNING)",
    )
    p.add_argument(
        "--log-json",
        action="store_true",
        help="log one JSON object per line (time, level, logger, message, node, peer)",
    )


def _add_auth(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cluster", default=None, metavar="NAME", help="cluster name (default: trio-replica)"
    )
    p.add_argument(
        "--secret-file",
        metavar="FILE",
        help="file holding the cluster secret (at least 16 bytes); further lines are older or "
        "newer secrets still accepted from peers, for rotating it",
    )
    p.add_argument(
        "--key-file",
        metavar="FILE",
        help="this side's Ed25519 key (PEM, made if missing): a node's identity.key_file; "
        "a client's key, which nodes with an allow-list must list",
    )
    p.add_argument("--tls-ca", metavar="FILE", help="CA bundle that signs the nodes' certificates")
    p.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="this side's certificate chain (PEM, with --tls-key): a wss:// listener's "
        "certificate, and the client certificate presented when dialing",
    )
    p.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert (PEM)")


#: What a node address may look like on the command line.
ADDRESS_HELP = "ws://HOST:PORT, wss://HOST:PORT (TLS), or HOST:PORT for ws://"


def _add_control(p: argparse.ArgumentParser) -> None:
    """The options of the commands that talk to a running node."""
    p.add_argument(
        "--node", required=True, metavar="ADDRESS", help=f"the node to ask: {ADDRESS_HELP}"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="deadline to connect and for each answer (default: 5)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trio_replica",
        description=(
            "Peer-to-peer replication for Trio: HyParView membership, Plumtree broadcast, "
            "replicated maps kept in sync by gossip and digest anti-entropy. Run a node "
            "(node), try a local cluster (demo, cluster), read and write the maps of a "
            "running node (put, get, delete, dump, watch, digest, status), or use its "
            "built-ins (registry, leader, shard, remind, reminders)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"trio_replica {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("node", help="run a node until SIGINT/SIGTERM")
    p.add_argument("--config", metavar="FILE", help="settings from a TOML file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one setting by its dotted name, e.g. membership.rejoin_interval=30 (repeatable)",
    )
    p.add_argument("--name", help="node id (default: generated)")
    p.add_argument(
        "--listen",
        metavar="ADDRESS",
        help=f"address to bind: {ADDRESS_HELP} (default: 127.0.0.1:0, any free port)",
    )
    p.add_argument(
        "--advertise", metavar="ADDRESS", help="address other nodes dial (default: the bound one)"
    )
    p.add_argument(
        "--join",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="a seed node's address (repeatable; give every node the same list)",
    )
    p.add_argument(
        "--map", action="append", default=[], metavar="NAME", help="host this map (repeatable)"
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="persist the hosted maps (and the node's key) in this directory",
    )
    p.add_argument(
        "--tombstone-ttl",
        type=float,
        metavar="SECONDS",
        help="how long the hosted maps remember deletes (default: 7 days)",
    )
    p.add_argument(
        "--max-clock-offset",
        type=float,
        metavar="SECONDS",
        help="refuse peers' timestamps further ahead of this node's clock (default: 60)",
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics, and /readyz, /healthz",
    )
    _add_auth(p)
    _add_common(p)

    for command, what in (("put", "set a key"), ("get", "read a key"), ("delete", "remove a key")):
        p = sub.add_parser(command, help=f"{what} of a map hosted by a running node")
        _add_control(p)
        p.add_argument("map", help="the map's name (the node must host it: node --map NAME)")
        p.add_argument("key", help="the key (a string)")
        if command == "put":
            p.add_argument("value", help="the value, as JSON")
        if command == "get":
            p.add_argument(
                "--meta", action="store_true", help="print value, writer and HLC as one JSON object"
            )
        _add_auth(p)
        _add_common(p)

    p = sub.add_parser("watch", help="print the changes of a map hosted by a running node")
    _add_control(p)
    p.add_argument(
        "--snapshot", action="store_true", help="first print every key as it stands (JSON lines)"
    )
    p.add_argument("map", help="the map's name (the node must host it)")
    _add_auth(p)
    _add_common(p)

    p = sub.add_parser(
        "dump", help="print every key of a map as JSON lines: key, value, writer, hlc"
    )
    _add_control(p)
    p.add_argument("--tombstones", action="store_true", help="include deleted keys")
    p.add_argument("map", help="the map's name (the node must host it)")
    _add_auth(p)
    _add_common(p)

    p = sub.add_parser("registry", help="list the services registered in the cluster")
    _add_control(p)
    p.add_argument("name", nargs="?", help="one service name (default: all)")
    _add_auth(p)
    _add_common(p)

    p = sub.add_parser("leader", help="who leads a name, with its fence and candidates")
    _add_control(p)
    p.add_argument("name", help="the leadership's name, as candidates use it")
    _add_auth(p)
    _add_common(p)

    p = sub.add_parser("shard", help="placement: which members own a key")
    _add_control(p)
    p.add_argument("action", choices=["place"], help="place: the owners of KEY")
    p.add_argument("key", help="the key to place")
    p.add_argument("-n", type=int, default=1, help="how many owners, primary first (default: 1)")
    _add_auth(p)
    _add_common(p)

    p = sub.add_parser("remind", help="set (or cancel) a durable reminder")
    _add_control(p)
    p.add_argument("key", help="the reminder's key (setting it again replaces it)")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--at", type=float, help="wall time, seconds since the epoch")
    when.add_argument("--after", type=float, help="seconds from now (the node's clock)")
    when.add_argument("--cancel", action="store_true", help="cancel the reminder")
    p.add_argument("--payload", default="null", help="JSON handed to the subscriber")
    _add_auth(p)
    _add_common(p)

    p = sub.add_parser("reminders", help="list the pending reminders as JSON lines")
    _add_control(p)
    _add_auth(p)
    _add_common(p)

    p = sub.add_parser("digest", help="print a summary of a map that two nodes can compare")
    _add_control(p)
    p.add_argument("map", help="the map's name (the node must host it)")
    _add_auth(p)
    _add_common(p)

    p = sub.add_parser("status", help="show a running node's views and counters")
    _add_control(p)
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    _add_auth(p)
    _add_common(p)

    p = sub.add_parser("cluster", help="start a local cluster in this process and print its views")
    p.add_argument("--nodes", type=int, default=5, help="how many nodes (default: 5)")
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="deadline for the overlay to form (default: 30)",
    )
    _add_common(p)

    p = sub.add_parser(
        "key",
        help="print this node's public key (made on first use), for allow-lists",
        description="Print the node's public key, as allow-list files and known_nodes hold it. "
        "The key is read from --key-file or DATA_DIR/node.key and made there if missing.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--data-dir", help="the node's data directory")
    where.add_argument("--key-file", help="a PEM file holding the node's Ed25519 key")
    _add_common(p)

    p = sub.add_parser(
        "demo", help="watch a local cluster replicate a map, lose a node and heal (a few seconds)"
    )
    p.add_argument("--nodes", type=int, default=5, help="cluster size, at least 3 (default: 5)")
    p.add_argument(
        "--step-timeout", type=float, default=15.0, help="deadline of each step (default: 15 s)"
    )
    _add_common(p)
    return parser


def node_config(args: argparse.Namespace) -> tuple[NodeConfig, dict[str, Any]]:
    """The node's settings (file, then ``--set``, then the named flags) and the command's
    own ones: maps, tombstone_ttl, metrics, secret_file."""
    from .ops.config_file import SetValue, apply_settings, coerce, parse_set, read_toml

    layers = [read_toml(args.config) if args.config else {}, parse_set(args.set)]
    for layer in layers:
        # `join` is the command line's word for `seeds`: one layer may not give both.
        if "join" in layer:
            if "seeds" in layer:
                raise ConfigError("give the seeds as 'seeds' or 'join', not both")
            layer["seeds"] = layer.pop("join")
    settings = layers[0]
    _merge_tables(settings, layers[1])
    flags: dict[str, Any] = {
        "name": args.name,
        "listen": args.listen,
        "advertise": args.advertise,
        "seeds": args.join or None,
        "cluster": args.cluster,
        "data_dir": args.data_dir,
        "max_clock_offset": args.max_clock_offset,
    }
    settings.update({k: v for k, v in flags.items() if v is not None})

    def own_setting(key: str, hint: Any, flag: Any) -> Any:
        if flag is not None:
            return flag
        value = settings.get(key)
        return None if value is None else coerce(key, hint, value)

    maps = settings.get("maps", [])
    if isinstance(maps, SetValue):
        maps = maps.value
    if not isinstance(maps, list) or not all(isinstance(m, str) for m in maps):
        raise ConfigError("maps must be a list of names")
    secret_file = own_setting("secret_file", str, args.secret_file)
    own: dict[str, Any] = {
        "maps": [*maps, *args.map],
        "tombstone_ttl": own_setting("tombstone_ttl", float, args.tombstone_ttl),
        "metrics": own_setting("metrics", str, args.metrics),
        "secret_file": secret_file,
    }
    if own["tombstone_ttl"] is not None and not own["tombstone_ttl"] > 0:
        raise ConfigError("tombstone_ttl must be positive")
    server_ssl, client_ssl = tls_contexts(args)
    keyring = read_keyring(secret_file)
    base = NodeConfig(
        secret=keyring[0] if keyring else None,
        accepted_secrets=keyring[1:],
        server_ssl=server_ssl,
        client_ssl=client_ssl,
    )
    config = apply_settings(base, settings)
    if args.key_file is not None:
        identity = attrs.evolve(config.identity, key_file=Path(args.key_file))
        config = attrs.evolve(config, identity=identity)
    return config, own


def _merge_tables(into: dict[str, Any], more: dict[str, Any]) -> None:
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge_tables(into[key], value)
        else:
            into[key] = value


async def _run_node(args: argparse.Namespace) -> int:
    config, own = node_config(args)
    metrics_at = _parse_metrics(own["metrics"]) if own["metrics"] else None
    map_options: dict[str, Any] = {"persist": config.data_dir is not None}
    if own["tombstone_ttl"] is not None:
        map_options["tombstone_ttl"] = float(own["tombstone_ttl"])
    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        node_context(config.name),  # every record of the node's tasks names it
    ):
        async with (
            open_node(config, hold_control=True) as node,
            trio.open_nursery() as nursery,
        ):
            bound = None
            if metrics_at is not None:
                from .ops.metrics import metrics_registry, serve_metrics

                # Up before the maps open: /readyz says "starting" meanwhile.
                bound = await nursery.start(
                    functools.partial(serve_metrics, node=node),
                    metrics_registry(node),
                    *metrics_at,
                )
            for name in own["maps"]:
                await node.open_map(name, **map_options)
            node.mark_control_ready()
            # The first line is the readiness signal scripts wait for; keep it first.
            print(f"node {node.id} listening on {node.address}", flush=True)
            if bound is not None:
                print(f"metrics at http://{bound[0]}:{bound[1]}/metrics", flush=True)
            async for signum in signals:
                log.info("received %s; leaving the cluster", signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()
    return 0


def _parse_metrics(text: str) -> tuple[str, int]:
    from .ops.metrics import parse_host_port

    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise ConfigError(f"--metrics: {exc}") from None


async def _run_cluster(args: argparse.Namespace) -> int:
    from .localcluster import run_local_cluster

    return await run_local_cluster(args.nodes, timeout=args.timeout)


async def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return await run_demo(args.nodes, step_timeout=args.step_timeout)


async def _run_key(args: argparse.Namespace) -> int:
    from .runtime.identity import KEY_FILE, format_key, load_or_create_key, public_bytes

    path = Path(args.key_file) if args.key_file else Path(args.data_dir) / KEY_FILE
    print(format_key(public_bytes(load_or_create_key(path))))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, json_lines=args.log_json)
    runners = {
        "node": _run_node,
        "status": run_status,
        "cluster": _run_cluster,
        "demo": _run_demo,
        "put": run_map_command,
        "get": run_map_command,
        "delete": run_map_command,
        "watch": run_map_command,
        "dump": run_map_command,
        "digest": run_map_command,
        "registry": run_registry,
        "leader": run_builtin,
        "shard": run_builtin,
        "remind": run_builtin,
        "reminders": run_builtin,
        "key": _run_key,
    }
    try:
        try:
            code: int = trio.run(runners[args.command], args)
        except BaseExceptionGroup as group:
            raise _single(group) from None
        sys.stdout.flush()  # inside the try: a reader that left shows here, not at exit
        return code
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`status | head`): nothing is wrong, and Python must not
        # complain when it flushes stdout at exit either.
        with contextlib.suppress(OSError, ValueError):  # stdout may have no descriptor
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ReplicaError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error inside nested task groups (Trio wraps errors from nurseries)."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else group
