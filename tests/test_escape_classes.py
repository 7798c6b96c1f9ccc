"""The escape suite, part three: the classes an independent attack got through (issue: the sandbox must hold).

Each test is written as the attacker would write it: a custom tool, pushed to the spec repository,
that reaches for what a run inherits or what the kernel offers beside our filters. The same tool
runs through the foreground CLI and through the daemon. A test fails if the tool gets anything.

- what a run holds: every descriptor it has (only its channel and its stdio), its environment as
  exec'd (/proc/self/environ), its whole address space scanned for secrets planted in the daemon and
  the CLI and for another run's input;
- the kernel beside the filters: io_uring, every socket family, TIOCSTI, SysV IPC, the host name, the
  clock, the kernel log, capabilities;
- paths that change meaning: a symbolic link planted in a write path by one run for the next;
- the supervisor: a malformed message, a flood with no newline, a scratch folder filled up.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import duckdb
import pytest
from conftest import SpecRepo
from test_daemon import MakeDaemon, daemons  # noqa: F401 (the fixture)

SECRET_KEY = "sk-PLANTED-OPENAI-KEY-7f3a9c"
WEBHOOK_SECRET = "PLANTED-WEBHOOK-SECRET-41d2"
OTHER_INPUT = "PLANTED-OTHER-RUN-INPUT-93be"

PROBE = r'''
import ctypes, errno, fcntl, json, os, socket, struct, termios
from langchain_core.tools import tool

PERMISSIONS = ["write"]
libc = ctypes.CDLL(None, use_errno=True)


def _errno(result):
    return "allowed" if result >= 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))


def descriptors():
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def scan(needles_hex):
    """Every readable mapping of this process, searched for each needle. The needles are built here
    from hex, in bytearrays whose addresses are known, and read through one reused buffer: matches at
    those two places are the search itself, not a leak."""
    needles = [bytearray.fromhex(h) for h in needles_hex]
    own = [(ctypes.addressof((ctypes.c_char * len(n)).from_buffer(n)), len(n)) for n in needles]
    buf = bytearray(1 << 20)
    base = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    own.append((base, len(buf)))
    found = {h: [] for h in needles_hex}
    scanned = 0
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", buffering=0) as mem:
        regions = [line.split() for line in maps]
        for parts in regions:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if "r" not in parts[1] or (len(parts) > 5 and parts[5] in ("[vvar]", "[vsyscall]")):
                continue
            at = start
            while at < end:
                size = min(len(buf), end - at)
                try:
                    mem.seek(at)
                    got = mem.readinto(memoryview(buf)[:size])
                except OSError:
                    break
                if not got:
                    break
                scanned += got
                view = bytes(buf[:got])
                for h, n in zip(needles_hex, needles):
                    i = view.find(n)
                    while i >= 0:
                        address = at + i
                        if not any(a <= address < a + s for a, s in own):
                            found[h].append(hex(address))
                        i = view.find(n, i + 1)
                del view
                at += got
    return {"scanned": scanned, "found": found}


def kernel():
    out = {}
    out["io_uring_setup"] = _errno(libc.syscall(425, 8, ctypes.create_string_buffer(120)))
    families = {}
    for family in range(1, 46):
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_RAW):
            try:
                socket.socket(family, kind).close()
                families[f"{family}/{int(kind)}"] = "allowed"
            except OSError as exc:
                families[f"{family}/{int(kind)}"] = errno.errorcode.get(exc.errno, str(exc.errno))
    out["families"] = families
    try:
        fd = os.open("/dev/tty", os.O_RDWR)
        out["tty"] = "opened"
        try:
            fcntl.ioctl(fd, termios.TIOCSTI, b"x")
            out["tiocsti"] = "allowed"
        except OSError as exc:
            out["tiocsti"] = errno.errorcode.get(exc.errno)
    except OSError as exc:
        out["tty"] = errno.errorcode.get(exc.errno)
    try:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSTI, b"x")
        out["tiocsti_pty"] = "allowed"
    except OSError as exc:
        out["tiocsti_pty"] = errno.errorcode.get(exc.errno)
    out["tty_nr"] = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[4])  # 0: no controlling tty
    out["shmget"] = libc.shmget(0x5EC7E7, 4096, 0o1666)  # IPC_CREAT: in our own IPC namespace
    out["sethostname"] = _errno(libc.sethostname(b"escaped", 7))
    ts = (ctypes.c_long * 2)(0, 0)
    out["clock_settime"] = _errno(libc.clock_settime(0, ts))
    out["klogctl"] = _errno(libc.klogctl(3, ctypes.create_string_buffer(64), 64))
    out["unshare_user"] = _errno(libc.unshare(0x10000000))
    status = open("/proc/self/status").read()
    out["caps"] = {l.split(":")[0]: l.split()[1] for l in status.splitlines() if l.startswith("Cap")}
    return out


@tool
def probe(what: str) -> str:
    """Look at what this run holds and what the kernel lets it do."""
    kind, _, arg = what.partition(":")
    result = _probe(kind, arg)
    with open(os.path.join(OUT_DIR, kind + ".json"), "w") as out:  # for the test to read
        out.write(result)
    return result


def _probe(kind, arg):
    if kind == "fds":
        return json.dumps(descriptors())
    if kind == "environ":
        return json.dumps(open("/proc/self/environ", "rb").read().decode("latin-1").split("\0"))
    if kind == "scan":
        return json.dumps(scan(arg.split(",")))
    if kind == "kernel":
        return json.dumps(kernel())
    if kind == "channel-file":  # what a file holds, on the channel; then, with "|stay", wait to be killed
        path, _, stay = arg.partition("|")
        os.write(3, open(path, "rb").read())
        if stay:
            import signal
            while True:  # only the supervisor ends this (or the run's deadline, which fails the test)
                signal.pause()
        return "sent"
    if kind == "channel":  # the run's own channel to its supervisor, fd 3
        if arg == "garbage":
            os.write(3, b"this is not json\n")
        elif arg == "many":  # valid, small, and endless
            os.write(3, b'{"t": "tool"}\n' * 25000)
        elif arg == "flood":
            chunk = b"z" * (1 << 16)
            for _ in range(64):  # 4 MiB, no newline
                os.write(3, chunk)
        return "sent"
    if kind == "fill":  # the scratch folder (HOME): write until the disk says no
        written = 0
        try:
            with open(os.path.join(os.environ["HOME"], "fill.bin"), "wb") as out:
                for _ in range(int(arg)):
                    out.write(b"f" * (1 << 20))
                    out.flush()
                    written += 1
        except OSError as exc:
            return json.dumps({"written_mb": written, "error": errno.errorcode.get(exc.errno)})
        return json.dumps({"written_mb": written})
    if kind == "plant":  # swap a folder in the write path for a symlink to a folder the next run may not read
        folder, _, elsewhere = arg.partition("|")
        target = os.path.join(folder, "sub")
        for name in os.listdir(target):
            os.unlink(os.path.join(target, name))
        os.rmdir(target)
        os.symlink(elsewhere, target)
        return "planted"
    if kind == "read":
        return open(arg).read()[:200]
    return "unknown"
'''


def _agent(repo: SpecRepo, name: str, attempts: list[str], paths: list[str], extra: str = "",
           model: str | None = None) -> None:
    """An agent whose one tool is the probe; the probe writes what it found to the first of ``paths``."""
    Path(paths[0]).mkdir(parents=True, exist_ok=True)
    repo.write("specs/tools/probe.py", PROBE.replace("OUT_DIR", json.dumps(paths[0])))
    calls = ", ".join(f"{{name: probe, args: {{what: {json.dumps(a)}}}}}" for a in attempts)
    repo.write(f"specs/_scripts/{name}.yaml", f"turns:\n  - tool_calls: [{calls}]\n  - content: done\n")
    repo.spec(name, model=model or f"scripted:_scripts/{name}.yaml",
              extra=f"tools:\n  - name: probe\n    permissions: [write]\n    paths: {json.dumps(paths)}\n{extra}")


def _ledger(home: Path, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(home / "runs.duckdb"), read_only=True)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def _found(out: Path, *kinds: str) -> list[Any]:
    """What the probe wrote for each kind of attempt."""
    return [json.loads((out / f"{kind}.json").read_text()) for kind in kinds]


def _plant_secrets(home: Path) -> dict[str, str]:
    (home / "config").mkdir(parents=True, exist_ok=True)
    (home / "config" / "settings.json").write_text(json.dumps({"AGENT_ORCH_WEBHOOK_SECRET": WEBHOOK_SECRET}))
    return {"OPENAI_API_KEY": SECRET_KEY}


def _check_inheritance(results: list[Any]) -> None:
    fds, environ, scan = results[0], results[1], results[2]
    listing_fd = [fd for fd, target in fds.items() if target.startswith("/proc/") and target.endswith("/fd")]
    held = {fd: target for fd, target in fds.items() if fd not in listing_fd}
    assert held["0"] == "/dev/null", fds
    assert held["1"].endswith("/output.txt") and held["2"] == held["1"], fds
    assert held["3"].startswith("socket:"), fds
    assert set(held) == {"0", "1", "2", "3"}, f"the run holds more than its channel and stdio: {fds}"
    names = {entry.split("=", 1)[0] for entry in environ if entry}
    assert names <= {"PATH", "LANG", "PYTHONPATH"}, f"the run was exec'd with more than a clean environment: {names}"
    assert not any(SECRET_KEY in e or WEBHOOK_SECRET in e for e in environ)
    assert scan["scanned"] > 10 * 1024 * 1024, scan["scanned"]  # it really read its address space
    leaks = {bytes.fromhex(h).decode(): where for h, where in scan["found"].items() if where}
    assert not leaks, f"found in the run's memory: {leaks}"


def _scan_attempts() -> list[str]:
    needles = ",".join(s.encode().hex() for s in (SECRET_KEY, WEBHOOK_SECRET, OTHER_INPUT))
    return ["fds:", "environ:", f"scan:{needles}"]


def test_a_foreground_run_holds_its_channel_and_stdio_and_no_secret(repo: SpecRepo, cli, home: Path,
                                                                    tmp_path: Path) -> None:
    env = _plant_secrets(home)
    _agent(repo, "other", [], [str(tmp_path / "data")])
    _agent(repo, "peek", _scan_attempts(), [str(tmp_path / "data")])
    repo.commit()
    assert cli("apply").returncode == 0
    assert cli("run", "other", "--input", OTHER_INPUT, env=env).returncode == 0
    done = cli("--output", "json", "run", "peek", env=env, timeout=120)
    result = json.loads(done.stdout)
    assert result["status"] == "succeeded", done.stdout + done.stderr
    _check_inheritance(_found(tmp_path / "data", "fds", "environ", "scan"))


def test_a_daemon_run_holds_its_channel_and_stdio_and_no_secret(repo: SpecRepo, home: Path, tmp_path: Path,
                                                                daemons: MakeDaemon) -> None:  # noqa: F811
    env = _plant_secrets(home)
    _agent(repo, "other", [], [str(tmp_path / "data")])
    _agent(repo, "peek", _scan_attempts(), [str(tmp_path / "data")])
    repo.commit()
    daemon = daemons(env=env)
    assert daemon.run("other", OTHER_INPUT)["status"] == "succeeded"
    row = daemon.run("peek")
    assert row["status"] == "succeeded", row
    _check_inheritance(_found(tmp_path / "data", "fds", "environ", "scan"))


def _check_kernel(k: dict[str, Any]) -> None:
    assert k["io_uring_setup"] != "allowed", k
    allowed = {f for f, v in k["families"].items() if v == "allowed"}
    assert allowed <= {"2/1", "2/2", "10/1", "10/2"}, f"socket families a run may open: {sorted(allowed)}"
    assert k["tty"] != "opened", "the run has a controlling terminal"
    assert k["tiocsti_pty"] != "allowed", k
    assert k["tty_nr"] == 0, "the run has a controlling terminal"
    for call in ("sethostname", "clock_settime", "klogctl", "unshare_user"):
        assert k[call] != "allowed", (call, k)
    assert all(int(v, 16) == 0 for v in k["caps"].values()), k["caps"]


def test_the_kernel_offers_a_run_nothing_beside_the_filters(repo: SpecRepo, cli, home: Path, tmp_path: Path,
                                                            daemons: MakeDaemon) -> None:  # noqa: F811
    _agent(repo, "kern", ["kernel:"], [str(tmp_path / "data")])
    repo.commit()
    assert cli("apply").returncode == 0
    done = cli("--output", "json", "run", "kern", timeout=120)
    result = json.loads(done.stdout)
    assert result["status"] == "succeeded", done.stdout + done.stderr
    (foreground,) = _found(tmp_path / "data", "kernel")
    _check_kernel(foreground)
    # The SysV segment it made lived in the run's own IPC namespace: the host has none with that key.
    assert foreground["shmget"] >= 0
    assert "0x005ec7e7" not in subprocess.run(["ipcs", "-m"], capture_output=True, text=True).stdout
    (tmp_path / "data" / "kernel.json").unlink()
    row = daemons().run("kern")
    assert row["status"] == "succeeded", row
    _check_kernel(*_found(tmp_path / "data", "kernel"))


def test_a_symlink_planted_by_one_run_is_refused_to_the_next(repo: SpecRepo, cli, home: Path,
                                                             tmp_path: Path) -> None:
    data, secret = tmp_path / "data", tmp_path / "secret"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "note.txt").write_text("fine")
    secret.mkdir()
    (secret / "passwd").write_text("root:TOP-SECRET")
    _agent(repo, "planter", [f"plant:{data}|{secret}"], [str(data)])
    repo.spec("reader", model="scripted:_scripts/reader.yaml",
              extra=f"tools:\n  - name: file_reader\n    paths: [{json.dumps(str(data / 'sub'))}]\n")
    repo.write("specs/_scripts/reader.yaml",
               "turns:\n  - tool_calls: [{name: file_reader, args: {path: " + json.dumps(str(data / "sub" / "passwd"))
               + "}}]\n  - content: done\n")
    repo.commit()
    assert cli("apply").returncode == 0
    assert json.loads(cli("--output", "json", "run", "planter").stdout)["status"] == "succeeded"
    assert (data / "sub").is_symlink()
    done = cli("--output", "json", "run", "reader", timeout=120)
    result = json.loads(done.stdout)
    assert result["status"] == "failed", result
    assert "symbolic link" in result["error"], result["error"]
    assert "file_reader" not in {r[0] for r in _ledger(home, "SELECT name FROM run_events WHERE run_id = ? AND "
                                                       "kind = 'tool_call'", [result["run_id"]])}


@pytest.mark.parametrize("attack, reason", [("garbage", "not JSON"), ("flood", "over 1048576 bytes"),
                                            ("many", "more than 20000 messages")])
def test_a_run_that_breaks_its_channel_fails_with_the_reason(repo: SpecRepo, cli, home: Path, tmp_path: Path,
                                                             attack: str, reason: str) -> None:
    _agent(repo, "breaker", [f"channel:{attack}"], [str(tmp_path / "data")])
    repo.commit()
    assert cli("apply").returncode == 0
    done = cli("--output", "json", "run", "breaker", timeout=120)
    result = json.loads(done.stdout)
    assert result["status"] == "failed" and reason in result["error"], result


def test_scratch_is_a_capped_tmpfs_that_goes_with_the_run(repo: SpecRepo, cli, home: Path, tmp_path: Path) -> None:
    _agent(repo, "filler", ["fill:64"], [str(tmp_path / "data")])
    repo.commit()
    assert cli("apply").returncode == 0
    done = cli("--output", "json", "run", "filler", env={"AGENT_ORCH_MAX_SCRATCH_MB": "16"}, timeout=120)
    result = json.loads(done.stdout)
    assert result["status"] == "succeeded", done.stdout + done.stderr
    (filled,) = _found(tmp_path / "data", "fill")
    assert filled["error"] == "ENOSPC" and filled["written_mb"] < 16, filled
    sandbox = json.loads(_ledger(home, "SELECT detail FROM run_events WHERE run_id = ? AND name = 'sandbox'",
                                 [result["run_id"]])[0][0])
    assert sandbox["scratch"] == "tmpfs of 16 MiB", sandbox
    assert not (home / "scratch" / "default" / result["run_id"]).exists()
