"""The SSH client against real local boxes: keys, host-key pinning, commands, files, forwards."""

from __future__ import annotations

import asyncio
import logging
import stat
import time
from collections.abc import Callable
from pathlib import Path

import asyncssh
import pytest

from choline_core.errors import NotFound
from choline_provisioner.providers import localbox
from choline_provisioner.sshclient import (
    CommandFailed,
    CommandTimeout,
    HostKeyChanged,
    KnownHosts,
    SshAuthFailed,
    SshConnection,
    SshError,
    SshUnreachable,
    connect_retrying,
    delete_run_key,
    ensure_run_key,
    load_run_key,
)

from .conftest import RawBox


def test_run_keys_are_private_and_stable(choline_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key = ensure_run_key("run-1")
    assert key.private_path == choline_home / "keys" / "run-1" / "id_ed25519"
    assert stat.S_IMODE(key.private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.private_path.parent.stat().st_mode) == 0o700
    assert key.public_key.startswith("ssh-ed25519 ") and key.public_key.endswith("choline-run-run-1")
    assert ensure_run_key("run-1") == key  # again: the same pair, not a new one
    assert ensure_run_key("run-2").public_key != key.public_key
    private_text = key.private_path.read_text()
    body = "".join(private_text.splitlines()[1:-1])
    assert "PRIVATE KEY" in private_text and body
    assert body not in repr(key) and body[:40] not in caplog.text
    assert load_run_key("run-1") == key
    delete_run_key("run-1")
    delete_run_key("run-1")  # idempotent
    with pytest.raises(NotFound):
        load_run_key("run-1")
    with pytest.raises(ValueError):
        ensure_run_key("../escape")


def test_known_hosts_file(choline_home: Path) -> None:
    kh = KnownHosts()
    a = localbox.generate_host_key(choline_home / "a")
    b = localbox.generate_host_key(choline_home / "b")
    kh.pin("local/box-1", a + " comment dropped")
    kh.pin("[10.0.0.1]:2222", b)
    assert kh.get("local/box-1") == a and kh.get("[10.0.0.1]:2222") == b
    assert "[10.0.0.1]:2222 ssh-ed25519 " in kh.path.read_text()  # OpenSSH's own line format
    kh.forget("local/box-1")
    kh.forget("local/box-1")
    assert kh.get("local/box-1") is None and KnownHosts().get("[10.0.0.1]:2222") == b


async def test_commands(raw_box: Callable[..., RawBox], choline_home: Path) -> None:
    key = ensure_run_key("run-cmd")
    box = raw_box(key)
    async with await SshConnection.open(box.endpoint, key) as conn:
        res = await conn.run("pwd; echo $HOME; cat", input="from stdin")
        assert res.stdout == f"{box.dir}\n{box.dir}\nfrom stdin" and res.ok
        res = await conn.run('echo "$A $B"; pwd', env={"A": "it's", "B": "$HOME"}, cwd="/")
        assert res.stdout == "it's $HOME\n/\n"  # values are data, not shell
        with pytest.raises(CommandFailed, match="status 3"):
            await conn.run("echo bad >&2; exit 3", check=True)
        res = await conn.run("kill -TERM $$")
        assert res.exit_status is None and res.signal == "TERM"
        t0 = time.monotonic()
        with pytest.raises(CommandTimeout):
            await conn.run("sleep 30; echo never", timeout=0.5)
        assert time.monotonic() - t0 < 5
        deadline = time.monotonic() + 5  # the box hung up on the abandoned command and its children
        while any(b"sleep\x0030" in _cmdline(p) for p in localbox.marked_processes(localbox.MARKER, str(box.dir))):
            assert time.monotonic() < deadline, "the abandoned command still runs"
            await asyncio.sleep(0.05)
        big = await conn.run("head -c 3000000 /dev/zero | tr '\\0' x")
        assert len(big.stdout) == 3_000_000
        assert (await conn.run("echo still usable")).stdout == "still usable\n"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


async def test_files(raw_box: Callable[..., RawBox], tmp_path: Path) -> None:
    key = ensure_run_key("run-files")
    box = raw_box(key)
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / ".hidden").write_text("h")
    (src / "sub" / "deeper" / "b.bin").write_bytes(bytes(range(256)) * 1000)
    async with await SshConnection.open(box.endpoint, key) as conn:
        await conn.upload(src, "code")  # relative: under the box's working folder
        await conn.upload(src / "a.txt", "~/single/copy.txt")
        listing = await conn.run("find code -type f | sort; cat single/copy.txt", check=True)
        assert listing.stdout.split() == ["code/.hidden", "code/a.txt", "code/sub/deeper/b.bin", "alpha"]
        assert (box.dir / "code" / "sub" / "deeper" / "b.bin").read_bytes() == bytes(range(256)) * 1000
        back = tmp_path / "back"
        await conn.download("code", back)
        assert sorted(str(p.relative_to(back)) for p in back.rglob("*") if p.is_file()) == [
            ".hidden",
            "a.txt",
            "sub/deeper/b.bin",
        ]
        assert (back / "sub" / "deeper" / "b.bin").read_bytes() == bytes(range(256)) * 1000
        await conn.download(str(box.dir / "code" / "a.txt"), tmp_path / "one" / "a.txt")
        assert (tmp_path / "one" / "a.txt").read_text() == "alpha"
        with pytest.raises(SshError, match="download"):
            await conn.download("no-such-file", tmp_path / "x")


async def _echo_server() -> tuple[asyncio.AbstractServer, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(100)
        writer.write(b"echo:" + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(100), 5)
    writer.close()
    return data


async def test_port_forwards_only_on_loopback(raw_box: Callable[..., RawBox]) -> None:
    key = ensure_run_key("run-fwd")
    box = raw_box(key)
    server, port = await _echo_server()
    try:
        async with await SshConnection.open(box.endpoint, key) as conn:
            # remote forward: the box listens on its loopback, connections come back here
            fwd = await conn.forward_remote("127.0.0.1", port)
            assert fwd.listen_port > 0 and fwd.listen_host == "127.0.0.1"
            assert await _roundtrip(fwd.listen_port, b"via box") == b"echo:via box"
            fwd.close()
            for host in ("0.0.0.0", "", "192.0.2.10"):
                with pytest.raises(SshError, match="refused to listen"):
                    await conn.forward_remote("127.0.0.1", port, listen_host=host)
            # local forward: the box connects to its own loopback only
            fwd = await conn.forward_local("127.0.0.1", port)
            assert await _roundtrip(fwd.listen_port, b"from here") == b"echo:from here"
            fwd.close()
            reader, writer = await conn.raw.open_connection("localhost", port)
            writer.write(b"x")
            assert await asyncio.wait_for(reader.read(100), 5) == b"echo:x"
            writer.close()
            for host in ("192.0.2.10", "example.com", "0.0.0.0"):
                t0 = time.monotonic()
                with pytest.raises(asyncssh.ChannelOpenError):
                    await conn.raw.open_connection(host, 80)
                assert time.monotonic() - t0 < 2  # refused by policy, not a connect attempt timing out
    finally:
        server.close()
        await server.wait_closed()


async def test_host_key_pinned_at_first_contact_and_a_changed_key_refused(
    raw_box: Callable[..., RawBox], choline_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = ensure_run_key("run-pin")
    first = raw_box(key, alias="vast/instance-7")
    known = KnownHosts()
    assert known.get("vast/instance-7") is None
    async with await SshConnection.open(first.endpoint, key) as conn:
        assert (await conn.run("echo one")).stdout == "one\n"
    pinned = known.get("vast/instance-7")
    assert pinned == localbox.host_public_key(first.dir / ".box" / "host_key")
    async with await SshConnection.open(first.endpoint, key) as conn:  # the same key again: fine
        assert conn.host_key == pinned

    # another machine answers under the same name (same pin): refused, reported, pin unchanged
    impostor = raw_box(key, alias="vast/instance-7")
    caplog.set_level(logging.WARNING)
    with pytest.raises(HostKeyChanged) as err:
        await SshConnection.open(impostor.endpoint, key)
    assert "vast/instance-7" in err.value.message and "refusing" in err.value.message
    assert str(known.path) in (err.value.hint or "")
    assert err.value.detail["expected"] != err.value.detail["presented"]
    assert "changed" in caplog.text and err.value.detail["presented"] in caplog.text
    assert known.get("vast/instance-7") == pinned
    with pytest.raises(HostKeyChanged):  # never retried into acceptance
        await connect_retrying(impostor.endpoint, key, timeout=2)

    # a key the provider announces is required exactly
    announced = first.endpoint.model_copy(
        update={"host_key": localbox.host_public_key(impostor.dir / ".box" / "host_key"), "host_key_alias": "other"}
    )
    with pytest.raises(HostKeyChanged, match="announced"):
        await SshConnection.open(announced, key)
    assert known.get("other") is None  # an announced key is not written down


async def test_refused_key_and_unreachable(raw_box: Callable[..., RawBox]) -> None:
    key = ensure_run_key("run-auth")
    box = raw_box(key)
    stranger = ensure_run_key("someone-else")
    with pytest.raises(SshAuthFailed):
        await SshConnection.open(box.endpoint, stranger)
    with pytest.raises(SshAuthFailed):  # only the box's user may log in, whatever the key
        await SshConnection.open(box.endpoint.model_copy(update={"user": "intruder"}), key)
    localbox.add_authorized_key(box.dir, stranger.public_key)  # attached later, as vast.ai does
    async with await SshConnection.open(box.endpoint, stranger) as conn:
        assert (await conn.run("echo in")).stdout == "in\n"
    localbox.kill_box(box.dir)
    with pytest.raises(SshUnreachable):
        await SshConnection.open(box.endpoint, key, connect_timeout=3)


@pytest.mark.slow
async def test_reconnect_to_a_box_that_comes_back(raw_box: Callable[..., RawBox]) -> None:
    key = ensure_run_key("run-re")
    box = raw_box(key, name="phoenix")
    conn = await SshConnection.open(box.endpoint, key, keepalive_interval=0.5, keepalive_count_max=2)
    localbox.kill_box(box.dir)
    await asyncio.wait_for(conn.wait_closed(), 5)  # the dead peer is noticed
    assert conn.closed

    async def restart_later() -> None:
        await asyncio.sleep(0.5)
        localbox.start_box(box.dir, authorized_key=key.public_key, port=box.endpoint.port, base_python=None)

    task = asyncio.create_task(restart_later())
    again = await connect_retrying(box.endpoint, key, timeout=20, interval=0.2)
    async with again:
        assert (await again.run("echo back")).stdout == "back\n"
    await task
