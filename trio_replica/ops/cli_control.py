"""The command line's control-client commands (`trio_replica.cli` parses and dispatches).

This module owns what the client commands do once parsed: reading the secret file and the
``--tls-*`` flags (which ``node`` shares), opening the authenticated control connection to
a running node from the common options, and the commands themselves: ``status``; ``put``,
``get``, ``delete``, ``watch``, ``dump``, ``digest`` on a replicated map; ``registry``,
``leader``, ``shard place``, ``remind`` and ``reminders`` on the built-ins. Values print
as JSON (bytes as ``{"$bytes": base64}``); a user's mistake raises `ConfigError`.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import ssl
import sys
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..errors import ConfigError
from ..runtime.config import normalize_address
from ..runtime.control import ControlClient, open_control

__all__ = [
    "read_keyring",
    "run_builtin",
    "run_map_command",
    "run_registry",
    "run_status",
    "tls_contexts",
]


def read_keyring(path: str | None) -> tuple[bytes, ...]:
    """The secrets in the file at `path`, one per line: the first is proven, all accepted."""
    if path is None:
        return ()
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the secret file {path}: {exc.strerror}") from None
    secrets = tuple(line.strip() for line in lines if line.strip())
    if not secrets:
        raise ConfigError(f"the secret file {path} is empty")
    if any(len(secret) < 16 for secret in secrets):
        raise ConfigError(f"a secret in {path} is shorter than 16 bytes; use a long random one")
    return secrets


def tls_contexts(args: argparse.Namespace) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(server context, client context) from the --tls-* flags, or (None, None).

    With --tls-ca on a listener, peers must present a certificate signed by that CA
    (mutual TLS); dialers verify the listener against it.
    """
    if not (args.tls_ca or args.tls_cert):
        return None, None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    for option, path in (
        ("--tls-ca", args.tls_ca),
        ("--tls-cert", args.tls_cert),
        ("--tls-key", args.tls_key),
    ):
        # exists, not isfile: a pipe (`<(cat ca.pem)`) is a fine source too.
        if path and not os.path.exists(path):
            raise ConfigError(f"{option} {path}: no such file")
    try:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.tls_ca)
        server = None
        if args.tls_cert:
            client.load_cert_chain(args.tls_cert, args.tls_key)
            server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            server.load_cert_chain(args.tls_cert, args.tls_key)
            if args.tls_ca:
                server.load_verify_locations(args.tls_ca)
                server.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS files: {exc}") from None
    return server, client


def _print_status(status: dict[str, Any]) -> None:
    print(f"node {status['id']} at {status['address']} (cluster {status['cluster']})")
    print(f"  active  ({len(status['active'])}): " + ", ".join(p[0] for p in status["active"]))
    print(f"  passive ({len(status['passive'])}): " + ", ".join(p[0] for p in status["passive"]))
    stats = status["stats"]
    print(
        f"  frames sent/received: {stats['frames_sent']}/{stats['frames_received']}, "
        f"rejected: {sum(stats['rejected'].values())}, "
        f"handshakes refused: {sum(stats['handshakes_refused'].values())}, "
        f"drops: {sum(stats['drops'].values())}"
    )
    for name, info in sorted(status.get("maps", {}).items()):
        state = ", recovering" if info.get("recovering") else ""
        keys, tombs = info["size"], info["tombstones"]
        print(
            f"  map {name}: {keys} key{'' if keys == 1 else 's'}, "
            f"{tombs} tombstone{'' if tombs == 1 else 's'}{state}"
        )
    if not status.get("ready", True):
        print(f"  not ready: {status.get('readiness')}")
    builtins = status.get("builtins", {})
    if "registry" in builtins:
        print(f"  registry: {builtins['registry']['names']} names")
    if "shard" in builtins:
        shard = builtins["shard"]
        print(
            f"  shard: members {len(shard['members'])}, {shard['owned']} of "
            f"{shard['ring_size']} partitions owned here"
        )
    for name, lead in sorted(builtins.get("leaders", {}).items()):
        print(f"  leader of {name}: {lead['leader']} (fence {lead['fence']})")
    if "reminders" in builtins:
        rem = builtins["reminders"]
        print(
            f"  reminders: {rem['pending']} pending, {rem['workers']} workers, "
            f"{rem['fired']} fired here"
        )


def _open_control(args: argparse.Namespace) -> AbstractAsyncContextManager[ControlClient]:
    """The control connection the client commands share, from their common options."""
    keyring = read_keyring(args.secret_file)
    return open_control(
        normalize_address(args.node),
        cluster=args.cluster or "trio-replica",
        secret=keyring[0] if keyring else None,
        accepted_secrets=keyring[1:],
        client_ssl=tls_contexts(args)[1],
        timeout=args.timeout,
        key=_client_key(args.key_file),
    )


def _client_key(path: str | None) -> Ed25519PrivateKey | None:
    if path is None:
        return None
    from ..runtime.identity import load_or_create_key

    return load_or_create_key(Path(path))


async def run_status(args: argparse.Namespace) -> int:
    async with _open_control(args) as client:
        status = await client.call("status")
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        _print_status(status)
    return 0


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    raise TypeError(f"cannot show {type(value).__name__}")


def _show(value: object) -> str:
    try:
        return json.dumps(value, default=_json_default, sort_keys=True, allow_nan=False)
    except ValueError:
        # A NaN or an infinity written from Python: JSON has none. Shown as the strings
        # "NaN" / "Infinity" / "-Infinity" in place, the rest of the value as it is.
        return json.dumps(_finite(value), default=_json_default, sort_keys=True)


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _no_constant(name: str) -> Any:
    raise ConfigError(f"the value must be JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ConfigError(f"the value must be JSON: {text} is too large for a number")
    return number


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"the value must be JSON ({exc}); quote strings: '\"text\"'") from None


async def run_map_command(args: argparse.Namespace) -> int:
    value = _parse_json(args.value) if args.command == "put" else None
    async with _open_control(args) as client:
        if args.command == "put":
            await client.call("map.put", [args.map, args.key, value])
        elif args.command == "delete":
            await client.call("map.delete", [args.map, args.key])
        elif args.command == "get":
            result = await client.call("map.get", [args.map, args.key])
            if not result["found"]:
                print(f"{args.key}: not found", file=sys.stderr)
                return 1
            if args.meta:
                wall, logical = result["hlc"]
                shown = {"value": result["value"], "writer": result["writer"]}
                print(_show({**shown, "hlc": f"{wall}.{logical}"}))
            else:
                print(_show(result["value"]))
        elif args.command == "digest":
            print(_show(await client.call("map.digest", [args.map])))
        elif args.command == "dump":
            async for batch in client.stream("map.dump", [args.map, args.tombstones]):
                if not batch:
                    break  # the end
                for row in batch:
                    print(_show(_row(row)))
        else:
            async for event in client.stream("map.watch", [args.map, args.snapshot]):
                if event[0] == "watching":
                    keys = f"{event[2]} key{'' if event[2] == 1 else 's'}"
                    print(f"watching map {event[1]} ({keys})", file=sys.stderr, flush=True)
                elif event[0] == "snapshot":
                    for row in event[1]:
                        print(_show(["snapshot", *_row(row).values()]), flush=True)
                elif event[0] == "snapshot_end":
                    print("snapshot done; changes follow", file=sys.stderr, flush=True)
                else:
                    print(_show(event), flush=True)
    return 0


def _row(row: list[Any]) -> dict[str, Any]:
    """A dump row as the JSON object printed for it."""
    key, value, writer, wall, logical, deleted = row
    out = {"key": key, "value": value, "writer": writer, "hlc": f"{wall}.{logical}"}
    if deleted:
        out = {"key": key, "deleted": True, "writer": writer, "hlc": f"{wall}.{logical}"}
    return out


async def run_registry(args: argparse.Namespace) -> int:
    async with _open_control(args) as client:
        found = await client.call("registry.lookup", [args.name] if args.name else [])
    for name, entries in sorted(found.items()):
        for node, reg_id, meta in entries:
            print(_show({"name": name, "node": node, "id": reg_id, "meta": meta}))
    if args.name and not found.get(args.name):
        print(f"{args.name}: not registered", file=sys.stderr)
        return 1
    return 0


async def run_builtin(args: argparse.Namespace) -> int:
    """``leader``, ``shard place``, ``remind``, ``reminders``: one call, JSON out."""
    async with _open_control(args) as client:
        if args.command == "leader":
            print(_show(await client.call("leader.show", [args.name])))
        elif args.command == "shard":
            print(_show(await client.call("shard.place", [args.key, args.n])))
        elif args.command == "remind":
            if args.cancel:
                result = await client.call("reminders.cancel", [args.key])
                if not result["cancelled"]:
                    print(f"{args.key}: no pending reminder", file=sys.stderr)
                    return 1
                return 0
            how, seconds = ("at", args.at) if args.at is not None else ("after", args.after)
            row = await client.call(
                "reminders.set", [args.key, how, seconds, _parse_json(args.payload)]
            )
            print(_show(_reminder(row)))
        else:
            for row in await client.call("reminders.list", []):
                print(_show(_reminder(row)))
    return 0


def _reminder(row: list[Any]) -> dict[str, Any]:
    key, at, payload, fence, owner = row
    return {"key": key, "at": at, "payload": payload, "fence": fence, "owner": owner}
