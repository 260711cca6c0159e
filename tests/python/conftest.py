"""pytest set-up for kvmig's Python tests: `import kvmig` from the build tree
(KVMIG_BUILD_DIR, default <repo>/build) for this process and, through
PYTHONPATH, for every engine process a test starts; the `kvmig` binary of
the same build for tests that need a C++ agent."""

import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("KVMIG_BUILD_DIR", ROOT / "build")).resolve()
PKG_DIR = BUILD / "src" / "python"
KVMIG_BIN = BUILD / "tools" / "kvmig"

for path in (str(PKG_DIR), str(ROOT / "examples"), str(ROOT / "tests" / "python")):
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(PKG_DIR), str(ROOT / "examples")]
    + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


class CppAgent:
    """A `kvmig serve` process on a free loopback port."""

    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [str(KVMIG_BIN), "serve", "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        self.address = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if "listening on " in line:
                self.address = line.split("listening on ", 1)[1].split()[0]
                break
        if self.address is None:
            self.proc.kill()
            raise RuntimeError("kvmig serve did not start: "
                               + self.proc.stderr.read())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def cpp_agent():
    """Starts `kvmig serve ARGS...`; every agent is stopped at teardown."""
    agents = []

    def start(*args):
        agent = CppAgent(*args)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.stop()
