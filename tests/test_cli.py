"""The command line: a node process that leaves on SIGINT, `status` against it, `cluster`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

PY = [sys.executable, "-m", "trio_replica"]


def _start_node(tmp_path: Path, name: str, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [*PY, "node", "--name", name, "--listen", "127.0.0.1:0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "node NAME listening on ws://127.0.0.1:PORT": the ready signal
    assert "listening on" in line, proc.stderr.read() if proc.stderr else line
    return proc, line.split()[-1]


def test_node_process_joins_answers_status_and_exits_zero_on_sigint(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("correct horse battery staple\n")
    a, a_addr = _start_node(tmp_path, "a", "--secret-file", str(secret))
    b, _ = _start_node(tmp_path, "b", "--join", a_addr, "--secret-file", str(secret))
    try:
        status: dict[str, object] = {}
        for _ in range(50):
            out = subprocess.run(
                [*PY, "status", "--node", a_addr, "--secret-file", str(secret), "--json"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.returncode == 0, out.stderr
            status = json.loads(out.stdout)
            if status["active"]:
                break
        assert status["id"] == "a"
        assert [p[0] for p in status["active"]] == ["b"]  # type: ignore[union-attr]
        text = subprocess.run(
            [*PY, "status", "--node", a_addr, "--secret-file", str(secret)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "active  (1): b" in text.stdout
        wrong = tmp_path / "wrong"
        wrong.write_text("not the cluster secret at all\n")
        refused = subprocess.run(
            [*PY, "status", "--node", a_addr, "--secret-file", str(wrong)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.returncode == 1 and "secret" in refused.stderr
    finally:
        for proc in (b, a):
            proc.send_signal(signal.SIGINT)
        for proc in (b, a):
            assert proc.wait(timeout=30) == 0


def test_public_listen_without_secret_is_refused_with_a_clear_message() -> None:
    out = subprocess.run(
        [*PY, "node", "--listen", "0.0.0.0:0"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    assert "without a cluster secret" in out.stderr


def test_version_prints_the_package_version() -> None:
    import trio_replica

    out = subprocess.run([*PY, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"trio_replica {trio_replica.__version__}"
    assert trio_replica.__version__ != "0+unknown"  # the installed metadata was found


def test_settings_errors_name_their_section_and_odd_addresses_do_not_crash() -> None:
    out = subprocess.run(
        [*PY, "node", "--listen", "127.0.0.1:0", "--set", "membership.active_size=0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: invalid settings under 'membership.': ")
    out = subprocess.run(
        [*PY, "status", "--node", "[::1:7000"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "IPv6 hosts go in brackets" in out.stderr


def test_a_reader_that_leaves_early_is_not_an_error_with_buffered_output(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    out = subprocess.run(
        f"{sys.executable} -m trio_replica key --data-dir {tmp_path} | true",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert "BrokenPipeError" not in out.stderr and "Exception ignored" not in out.stderr


def test_a_wss_listener_without_a_certificate_names_the_flags() -> None:
    out = subprocess.run(
        [*PY, "node", "--listen", "wss://127.0.0.1:0"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "--tls-cert and --tls-key" in out.stderr.strip().splitlines()[0]


@pytest.mark.parametrize(
    "args",
    [
        ["node", "--listen", "127.0.0.1:notaport"],
        ["node", "--listen", "127.0.0.1:0", "--join", "127.0.0.1:99999"],
        ["status", "--node", "127.0.0.1:abc"],
        ["get", "m", "k", "--node", "127.0.0.1:-1"],
    ],
)
def test_a_bad_port_is_one_clear_line_and_exit_code_2(args: list[str]) -> None:
    out = subprocess.run([*PY, *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "the port must be a number from 0 to 65535" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("nodes", [4])
def test_cluster_command_forms_an_overlay(nodes: int) -> None:
    out = subprocess.run(
        [*PY, "cluster", "--nodes", str(nodes)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "overlay connected" in out.stdout


def test_wss_nodes_with_mutual_tls_and_status_over_wss(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(str(tmp_path / "cert.pem"), append=True)
    secret = tmp_path / "secret"
    secret.write_text("a secret shared by the whole cluster\n")
    tls = [
        "--tls-ca", str(tmp_path / "ca.pem"),
        "--tls-cert", str(tmp_path / "cert.pem"),
        "--tls-key", str(tmp_path / "key.pem"),
        "--secret-file", str(secret),
    ]  # fmt: skip
    a, a_addr = _start_node(tmp_path, "a", "--listen", "wss://127.0.0.1:0", *tls)
    assert a_addr.startswith("wss://")
    b, _ = _start_node(tmp_path, "b", "--listen", "wss://127.0.0.1:0", "--join", a_addr, *tls)
    try:
        for _ in range(50):
            out = subprocess.run(
                [*PY, "status", "--node", a_addr, "--json", *tls],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.returncode == 0, out.stderr
            if json.loads(out.stdout)["active"]:
                break
        assert [p[0] for p in json.loads(out.stdout)["active"]] == ["b"]
        # Without a client certificate the listener refuses the TLS handshake.
        no_cert = subprocess.run(
            [*PY, "status", "--node", a_addr, "--tls-ca", str(tmp_path / "ca.pem"),
             "--secret-file", str(secret)],
            capture_output=True,
            text=True,
            timeout=30,
        )  # fmt: skip
        assert no_cert.returncode == 1
    finally:
        for proc in (b, a):
            proc.send_signal(signal.SIGINT)
        for proc in (b, a):
            assert proc.wait(timeout=30) == 0


def test_listening_on_all_interfaces_needs_an_advertised_address(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("a secret shared by the whole cluster\n")
    out = subprocess.run(
        [*PY, "node", "--listen", "0.0.0.0:0", "--secret-file", str(secret)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "--advertise" in out.stderr


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PY, *args], capture_output=True, text=True, timeout=30)


def test_allowlist_keys_and_a_secret_keyring_from_the_command_line(tmp_path: Path) -> None:
    # The node proves the new secret and accepts the old (a keyring file); its allow-list
    # names it and an operator key; a client must show that key.
    # Mid-rotation: the node already proves the new secret, the client still the old one;
    # each accepts both. A client that knows only the old one refuses the node.
    keyring, old, only_old = tmp_path / "keyring", tmp_path / "old", tmp_path / "only-old"
    keyring.write_text("the new cluster secret, long\nthe old cluster secret, long\n")
    old.write_text("the old cluster secret, long\nthe new cluster secret, long\n")
    only_old.write_text("the old cluster secret, long\n")
    node_key, ops_key = tmp_path / "a.pem", tmp_path / "ops.pem"
    node_pub = _run("key", "--key-file", str(node_key)).stdout.strip()
    ops_pub = _run("key", "--key-file", str(ops_key)).stdout.strip()
    assert node_pub.startswith("ed25519:") and node_pub != ops_pub
    assert _run("key", "--key-file", str(node_key)).stdout.strip() == node_pub  # kept
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "cluster.keys").write_text(f"a {node_pub}\nops {ops_pub}\n")
    proc, address = _start_node(
        tmp_path,
        "a",
        "--secret-file",
        str(keyring),
        "--key-file",
        str(node_key),
        "--set",
        "identity.trust=allowlist",
        "--set",
        f"identity.allowlist={keys}",
    )
    try:
        behind = _run("status", "--node", address, "--secret-file", str(only_old))
        assert behind.returncode == 1 and "secret" in behind.stderr
        refused = _run("status", "--node", address, "--secret-file", str(old))
        assert refused.returncode == 1 and "allow-list" in refused.stderr
        listed = _run(
            "status", "--node", address, "--secret-file", str(old), "--key-file", str(ops_key)
        )
        assert listed.returncode == 0, listed.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_first_hour_mistakes_against_a_node_are_one_clear_line(tmp_path: Path) -> None:
    node, address = _start_node(tmp_path, "a", "--map", "m")
    try:

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*PY, *args, "--node", address], capture_output=True, text=True, timeout=60
            )

        # A map the node does not host: says so, and what it hosts.
        out = run("get", "other", "k")
        assert out.returncode == 1
        assert out.stderr.strip() == (
            "error: node a does not host map 'other' (it hosts: m; open it with --map or open_map)"
        )
        # NaN and infinities are not JSON: refused before anything is sent.
        for bad in ("NaN", "Infinity"):
            out = run("put", "m", "k", bad)
            assert out.returncode == 2
            assert (
                out.stderr.strip() == f"error: the value must be JSON: {bad} is not a JSON number"
            )
        out = run("put", "m", "k", "1e400")
        assert out.returncode == 2
        assert (
            out.stderr.strip() == "error: the value must be JSON: 1e400 is too large for a number"
        )
        # A reader that goes away early (`status | head -1`) is not an error.
        status = subprocess.Popen(
            [*PY, "status", "--node", address],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert status.stdout is not None and status.stderr is not None
        assert status.stdout.readline().startswith("node a at ")
        status.stdout.close()
        assert status.wait(timeout=60) == 0
        assert "Broken pipe" not in status.stderr.read()
    finally:
        node.send_signal(signal.SIGINT)
        node.wait(timeout=30)


def test_unreachable_addresses_and_missing_files_are_named_once(tmp_path: Path) -> None:
    node, address = _start_node(tmp_path, "a")
    try:
        taken = subprocess.run(
            [*PY, "node", "--name", "b", "--listen", address],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert taken.returncode == 1
        assert taken.stderr.strip().endswith(f"cannot listen on {address}: Address already in use")
    finally:
        node.send_signal(signal.SIGINT)
        node.wait(timeout=30)
    # Nobody listens there now: the address appears once in the message.
    gone = subprocess.run([*PY, "status", "--node", address], capture_output=True, text=True)
    assert gone.returncode == 1
    assert gone.stderr.count(address) == 1, gone.stderr
    missing = tmp_path / "no-ca.pem"
    out = subprocess.run(
        [*PY, "status", "--node", address.replace("ws://", "wss://"), "--tls-ca", str(missing)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: --tls-ca {missing}: no such file"


async def test_status_text_shows_the_hosted_maps(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 21: only ``status --json`` used to show the maps."""
    from trio_replica import testing
    from trio_replica.ops.cli_control import _print_status
    from trio_replica.ops.status import node_status

    async with testing.cluster(2) as c:
        users = await c["n1"].open_map("users")
        await users.put("alice", 1)
        await users.put("bob", 2)
        await users.delete("bob")
        await c["n1"].open_map("empty")
        _print_status(node_status(c["n1"]))
    out = capsys.readouterr().out
    assert "  map empty: 0 keys, 0 tombstones\n" in out
    assert "  map users: 1 key, 1 tombstone\n" in out
    assert "_hosts" not in out  # the node's own maps stay out


def test_every_option_and_argument_has_help() -> None:
    """Issue 21: --node, --timeout, the map/key positionals and cluster --nodes had none."""
    import argparse

    from trio_replica.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [
        f"{name} {action.dest}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert missing == []
    # Addresses are named as the README writes them, not HOST:PORT only.
    status_help = commands.choices["status"].format_help()
    assert "--node ADDRESS" in status_help and "wss://HOST:PORT" in status_help


def test_every_bad_input_gets_one_clear_line_and_an_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 21: each bad input a user tried, against a running node where it needs one:
    one ``error: ...`` line naming the problem, the documented exit code, no traceback."""
    from trio_replica.cli import main

    secret = tmp_path / "secret"
    secret.write_text("correct horse battery staple\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("not the cluster secret at all\n")
    node, address = _start_node(tmp_path, "a", "--secret-file", str(secret), "--map", "m")
    port = address.rsplit(":", 1)[1]
    auth = ["--secret-file", str(secret)]
    cases: list[tuple[list[str], int, str]] = [
        (["node", "--listen", "127.0.0.1:notaport"], 2, "port must be a number from 0 to 65535"),
        (["node", "--join", "127.0.0.1:99999"], 2, "port must be a number from 0 to 65535"),
        (["status", "--node", "127.0.0.1:abc"], 2, "port must be a number from 0 to 65535"),
        (["node", "--listen", "wss://127.0.0.1:0"], 2, "--tls-cert and --tls-key"),
        (["node", "--listen", f"127.0.0.1:{port}", *auth], 1, "Address already in use"),
        (["status", "--node", "127.0.0.1:1", "--timeout", "2"], 1, "ws://127.0.0.1:1"),
        (["status", "--node", address, "--tls-ca", str(tmp_path / "nope.pem")], 2, "nope.pem"),
        (["status", "--node", address], 1, "no cluster secret"),
        (["status", "--node", address, "--secret-file", str(wrong)], 1, "cluster secrets of"),
        (["status", "--node", address, *auth, "--cluster", "other"], 1, "'other'"),
        (["put", "--node", address, *auth, "other", "k", "1"], 1, "does not host map 'other'"),
        (["get", "--node", address, *auth, "other", "k"], 1, "does not host map 'other'"),
        (["watch", "--node", address, *auth, "other"], 1, "does not host map 'other'"),
        (["put", "--node", address, *auth, "m", "k", "NaN"], 2, "NaN"),
        (["put", "--node", address, *auth, "m", "k", "{not json"], 2, "JSON"),
    ]
    try:
        for argv, code, fragment in cases:
            rc = main(argv)
            out, err = capsys.readouterr()
            shown = f"{argv}: rc {rc}, stdout {out!r}, stderr {err!r}"
            assert rc == code, shown
            assert "Traceback" not in out + err, shown
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), shown
            assert fragment in lines[0], shown
    finally:
        node.send_signal(signal.SIGINT)
        assert node.wait(timeout=30) == 0
