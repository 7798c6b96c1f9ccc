"""The Ray executor's tests (docs/scale-out.md): one real Ray cluster on loopback for the whole session.

The cluster has a head (zone=head) and two workers (zone=a, zone=b), each node with a home of its own
(``AGENT_ORCH_HOME`` of its raylet, so of its node runner), and requires token authentication. Daemons
(``agentctl serve`` with ``AGENT_ORCH_EXECUTOR=ray``) are started per test by ``ray_daemons``, with the
cluster's address and token passed explicitly (the suite's autouse fixture clears ``AGENT_ORCH_*``).

Ray sends part of its traffic to the machine's own address whatever it is told: these tests run only in
a private network namespace with nothing but loopback (``make pytest`` makes one). Anywhere else the
whole directory is skipped, and Ray is never started.

Module names: this file and ``tests/conftest.py`` are both the module ``conftest`` (no ``__init__.py``
here, on purpose: a package ``tests/ray`` would shadow the real ``ray``). pytest replaces the module
``conftest`` with this one when it loads it; the helpers of the suite (``daemon_helpers``, ``test_run``)
import from ``tests/conftest.py``, so ``pytest_plugin_registered`` puts that one back.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parents[1]
for _path in (TESTS, TESTS.parent):  # the tests' helpers; bench.processes, the one cleanup of a local cluster
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench.processes import descendants, kill_all, with_marker  # noqa: E402

SESSION_MARKER = "AORCH_RAY_TEST_SESSION"  # not AGENT_ORCH_*: the suite's autouse fixture clears those
NAMESPACE = "agent-orchestrator"


def pytest_plugin_registered(plugin: Any, plugin_name: str, manager: Any) -> None:
    """Once this conftest is registered, ``conftest`` is ``tests/conftest.py`` again for the helpers."""
    if plugin is sys.modules[__name__]:
        parent = manager.get_plugin(str(TESTS / "conftest.py"))
        if parent is not None:
            sys.modules["conftest"] = parent


def private_network() -> str | None:
    """None in a private network namespace (only loopback), else why not."""
    others = [name for _index, name in socket.if_nameindex() if name != "lo"]
    if others:
        return (f"the Ray tests run only in a private network namespace with loopback alone (this one has "
                f"{', '.join(others)}): run them as `make pytest` does, under unshare -n")
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    why = private_network()
    if why is None:
        return
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=why))


# -- the cluster --------------------------------------------------------------------------------------


@dataclass
class RayCluster:
    """The session's cluster: its address and token, its nodes by zone label."""

    cluster: Any
    address: str
    token: str
    base: Path
    marker: str
    nodes: dict[str, Any] = field(default_factory=dict)  # zone: ray's Node handle (the head included)
    removed: list[Any] = field(default_factory=list)

    def node_env(self, zone: str) -> dict[str, str]:
        home = self.base / "nodes" / f"{zone}-{uuid.uuid4().hex[:6]}"
        home.mkdir(parents=True)
        return {"AGENT_ORCH_HOME": str(home), SESSION_MARKER: self.marker,
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def add_node(self, zone: str, num_cpus: int = 1) -> str:
        """A new worker node labelled zone=ZONE; its node id, once Ray lists it alive."""
        node = self.cluster.add_node(node_ip_address="127.0.0.1", num_cpus=num_cpus, labels={"zone": zone},
                                     env_vars=self.node_env(zone))
        self.cluster.wait_for_nodes()
        self.nodes[zone] = node
        return str(node.node_id)

    def remove_node(self, zone: str) -> None:
        """Kill the node labelled zone=ZONE at once (no graceful shutdown)."""
        node = self.nodes.pop(zone)
        self.cluster.remove_node(node, allow_graceful=False)
        self.removed.append(node)

    def node_id(self, zone: str) -> str:
        return str(self.nodes[zone].node_id)

    def daemon_env(self, **more: str) -> dict[str, str]:
        """What a daemon on this cluster needs: the executor, the address, the token."""
        return {"AGENT_ORCH_EXECUTOR": "ray", "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.token, **more}


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    why = private_network()
    if why is not None:  # never start Ray on a network others see
        pytest.skip(why)
    base = Path(tempfile.mkdtemp(prefix="aorch-ray-"))
    os.environ["RAY_TMPDIR"] = str(base)  # before Ray is imported: Cluster writes ray_current_cluster here
    (base / "ray").mkdir()
    token = secrets.token_hex(32)
    marker = uuid.uuid4().hex
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = token
    os.environ[SESSION_MARKER] = marker
    for key in ("RAY_ADDRESS",):
        os.environ.pop(key, None)
    from ray.cluster_utils import Cluster

    made = RayCluster(None, "", token, base, marker)
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        node_ip_address="127.0.0.1", temp_dir=str(base / "ray"), num_cpus=2, labels={"zone": "head"},
        include_dashboard=False, env_vars=made.node_env("head")))
    made.cluster, made.address = cluster, str(cluster.address)
    made.nodes["head"] = cluster.head_node
    try:
        for zone in ("a", "b"):
            made.nodes[zone] = cluster.add_node(node_ip_address="127.0.0.1", num_cpus=2, labels={"zone": zone},
                                                env_vars=made.node_env(zone))
        cluster.wait_for_nodes()
        yield made
    finally:
        spawned = descendants(os.getpid()) | with_marker(SESSION_MARKER, marker)
        try:
            cluster.shutdown()
        finally:  # what the cluster left: detached actors' workers, their zygotes and runs
            kill_all(descendants(os.getpid()) | with_marker(SESSION_MARKER, marker) | spawned)
            for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", SESSION_MARKER):
                os.environ.pop(key, None)
            shutil.rmtree(base, ignore_errors=True)


# -- a second cluster, without authentication -----------------------------------------------------------


INSECURE = r"""
import os, sys
base = sys.argv[1]
os.environ["RAY_TMPDIR"] = base
os.makedirs(base + "/ray", exist_ok=True)
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args=dict(
    node_ip_address="127.0.0.1", temp_dir=base + "/ray", num_cpus=1, include_dashboard=False,
    labels={"zone": "insecure"}, env_vars={"AGENT_ORCH_HOME": base + "/node"}))
cluster.wait_for_nodes()
print(cluster.address, flush=True)
sys.stdin.read()  # until the test is done with it
cluster.shutdown()
"""


@pytest.fixture
def insecure_cluster(ray_cluster: RayCluster) -> Iterator[str]:
    """The address of a one-node Ray cluster that requires no token (started without RAY_AUTH_*, in a process
    of its own); shut down, and whatever it left killed, at the end."""
    base = Path(tempfile.mkdtemp(prefix="aorch-insecure-"))  # short: Ray's socket paths must fit 107 bytes
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {SESSION_MARKER: marker}
    proc = subprocess.Popen([sys.executable, "-c", INSECURE, str(base)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        assert address, "the insecure cluster did not start"
        yield address
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        kill_all(with_marker(SESSION_MARKER, marker))
        shutil.rmtree(base, ignore_errors=True)


# -- daemons on it --------------------------------------------------------------------------------------


MakeRayDaemon = Callable[..., Any]


@pytest.fixture
def ray_daemons(ray_cluster: RayCluster, tmp_path: Path, home: Path, repo: Any) -> Iterator[MakeRayDaemon]:
    """Start daemons on Ray (``AGENT_ORCH_EXECUTOR=ray``) for this test's home; all are stopped at the end,
    whatever the test did (SIGTERM, then SIGKILL)."""
    from daemon_helpers import Daemon

    made: list[Any] = []

    def make(env: dict[str, str] | None = None, start: bool = True, home_: Path | None = None,
             ray: bool = True, timeout: float = 120.0) -> Any:
        daemon = Daemon(home_ or home, repo.path, tmp_path / f"daemon-{len(made)}.log",
                        {**(ray_cluster.daemon_env() if ray else {}), **(env or {})})
        made.append(daemon)
        return daemon.start(timeout=timeout) if start else daemon

    yield make
    problems = []
    for daemon in made:
        if daemon.proc is None or daemon.proc.poll() is not None:
            continue
        try:
            daemon.terminate(timeout=60)
        except AssertionError as exc:
            problems.append(str(exc))
    if problems:
        pytest.fail("\n".join(problems))

