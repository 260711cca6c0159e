"""kvmig.Cluster on a real etcd: the scheduler's view and moves from Python,
with agents as `kvmig serve` processes registered there."""

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest

import kvmig

ETCD = os.environ.get("KVMIG_ETCD", "/usr/bin/etcd")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eventually(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(0.05)


@pytest.fixture
def etcd():
    """A throwaway etcd on free loopback ports: its client endpoint."""
    if not os.access(ETCD, os.X_OK):
        pytest.skip(f"etcd is not installed ({ETCD}, or set KVMIG_ETCD)")
    data = tempfile.mkdtemp(prefix="kvmig-py-etcd-")
    client, peer = free_port(), free_port()
    log = open(os.path.join(data, "etcd.log"), "w")
    proc = subprocess.Popen(
        [ETCD, "--name", "t", "--data-dir", os.path.join(data, "d"),
         "--listen-client-urls", f"http://127.0.0.1:{client}",
         "--advertise-client-urls", f"http://127.0.0.1:{client}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"t=http://127.0.0.1:{peer}"],
        stdout=log, stderr=subprocess.STDOUT)

    def healthy():
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{client}/health", timeout=1) as r:
                return b"true" in r.read()
        except OSError:
            return False

    try:
        assert eventually(healthy, 30), open(os.path.join(data, "etcd.log")).read()
        yield f"127.0.0.1:{client}"
    finally:
        proc.kill()
        proc.wait()
        log.close()
        shutil.rmtree(data, ignore_errors=True)


def test_agents_drain_and_rebalance_from_python(etcd, cpp_agent):
    prefix = "/py-test"
    flags = ["--etcd", etcd, "--etcd-prefix", prefix]
    src = cpp_agent(*flags, "--name", "src", "--populate", "3:40")
    dst = cpp_agent(*flags, "--name", "dst")
    cluster = kvmig.Cluster(etcd=[etcd], prefix=prefix)
    listed = eventually(lambda: len(cluster.agents()["agents"]) == 2
                        and cluster.agents())
    assert listed and listed["ok"]
    by_name = {a["name"]: a for a in listed["agents"]}
    assert by_name["src"]["address"] == src.address
    assert by_name["src"]["requests"] == 3
    assert by_name["dst"]["draining"] is False

    before = {s["id"]: s["digest"]
              for s in kvmig.Client(src.address).status()["seqs"]}
    report = cluster.drain("src")
    assert report["ok"] and report["agent"] == "src"
    assert sorted(m["seq"] for m in report["moved"]) == [1, 2, 3]
    assert {m["to"] for m in report["moved"]} == {"dst"}
    after = {s["id"]: s["digest"]
             for s in kvmig.Client(dst.address).status()["seqs"]}
    assert after == before
    assert kvmig.Client(src.address).status(digests=False)["seqs"] == []

    # Draining src: rebalancing never moves anything back to it.
    assert cluster.rebalance_once(threshold=0.0, settle_ms=0)["moves"] == []
    cluster.set_draining("src", False)
    assert eventually(lambda: not {a["name"]: a for a in
                                   cluster.agents()["agents"]}["src"]["draining"])


def test_errors_are_kvmig_errors(etcd):
    cluster = kvmig.Cluster(etcd=[etcd], prefix="/py-empty")
    assert cluster.agents() == {"ok": True, "agents": []}
    with pytest.raises(kvmig.Error) as err:
        cluster.drain("nobody")
    assert err.value.code == "NotFound"
    with pytest.raises(kvmig.Error) as err:
        kvmig.Cluster(etcd=["not a url"])
    assert err.value.code == "InvalidArgument"
    down = kvmig.Cluster(etcd=[f"127.0.0.1:{free_port()}"], etcd_timeout_ms=500)
    with pytest.raises(kvmig.Error) as err:
        down.agents()
    assert err.value.code in ("Unavailable", "DeadlineExceeded")
