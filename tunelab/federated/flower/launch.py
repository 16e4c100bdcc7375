"""`tunelab federate x.yaml`: Flower's deployment engine on this machine. A SuperLink and
federated.num_clients SuperNodes start as separate processes (each in its own process group, on
free ports of 127.0.0.1, with FLWR_HOME under the run directory), `flwr run` submits the app
(RUN/flower/app/pyproject.toml naming tunelab's ServerApp and ClientApp), and when the run ends
every process started here is stopped. The SuperNodes' ClientApps and the ServerApp run in
processes Flower starts for them, with this tunelab on their PYTHONPATH.

Runtime dependency installation is disabled (the apps need nothing beyond this environment) and
so is flwr's update check (no network). PIDs go to RUN/flower/pids.json, logs to RUN/flower/*.log."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab import config as C
from tunelab.errors import TunelabError

APP_TOML = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tunelab-federated"
version = "1.0.0"
description = "tunelab's federated fine-tuning (FedKSeed, FedAvg of adapters)"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "tunelab"

[tool.flwr.app.components]
serverapp = "tunelab.federated.flower.apps:server_app"
clientapp = "tunelab.federated.flower.apps:client_app"

[tool.flwr.app.config]
config = ""
"""


def tool(name: str) -> str:
    """A Flower executable of this Python environment."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise TunelabError(f"tunelab federate: {name} not found next to {sys.executable}; install Flower with "
                           "pip install 'tunelab[federated]'")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise TunelabError(f"the Flower process {proc.args[0]} exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TunelabError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


@dataclass
class Federation:
    """The processes of one local deployment."""
    root: Path
    env: dict
    port: int = 0
    link: subprocess.Popen | None = None
    nodes: list[subprocess.Popen] = field(default_factory=list)

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        return subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, cfg: C.RunConfig) -> None:
        self.port = cfg.federated.port or free_port()
        self.link = self.spawn("superlink", [tool("flower-superlink"), "--insecure", "--isolation", "subprocess",
                                             "--host", "127.0.0.1", "--port", str(self.port),
                                             "--disable-runtime-dependency-installation"])
        wait_for_port(self.port, 60, self.link)
        n = cfg.federated.num_clients
        for i in range(n):
            self.start_node(i, n)
        self.write_pids()

    def start_node(self, i: int, n: int) -> subprocess.Popen:
        node = self.spawn(f"supernode-{i}", [tool("flower-supernode"), "--insecure", "--superlink",
                                             f"127.0.0.1:{self.port}", "--port", str(free_port()),
                                             "--node-config", f"partition-id={i} num-partitions={n}"])
        self.nodes = [p for p in self.nodes if p.poll() is None] + [node]
        return node

    def write_pids(self) -> None:
        (self.root / "pids.json").write_text(json.dumps({"superlink": self.link.pid,
                                                         "supernodes": [p.pid for p in self.nodes]}))

    def stop(self) -> None:
        import signal
        for p in [*self.nodes, self.link]:
            if p is not None and p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(timeout=15)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    if p.poll() is None:
                        os.killpg(p.pid, signal.SIGKILL)


def prepare(cfg: C.RunConfig) -> tuple[Path, dict]:
    """RUN/flower/: the app directory, FLWR_HOME with a connection to our SuperLink; the env."""
    root = Path(cfg.output) / "flower"
    (root / "app").mkdir(parents=True, exist_ok=True)
    (root / "home").mkdir(exist_ok=True)
    (root / "app" / "pyproject.toml").write_text(APP_TOML)
    here = str(Path(__file__).resolve().parents[3])  # the folder holding this tunelab package
    env = dict(os.environ, FLWR_HOME=str(root / "home"), FLWR_DISABLE_UPDATE_CHECK="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),  # flwr's own tools
               PYTHONPATH=os.pathsep.join([here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return root, env


def submit(fed: Federation, config_path: Path) -> int:
    (fed.root / "home" / "config.toml").write_text(
        f'[superlink]\ndefault = "tunelab"\n\n[superlink.tunelab]\naddress = "127.0.0.1:{fed.port}"\ninsecure = true\n')
    with open(fed.root / "run.log", "ab") as log:
        return subprocess.run([tool("flwr"), "run", str(fed.root / "app"), "tunelab", "--stream",
                               "--run-config", f'config="{config_path}"'], env=fed.env, stdout=log,
                              stderr=subprocess.STDOUT).returncode


def federate(cfg: C.RunConfig) -> Path:
    """Run `cfg` as a Flower deployment on this machine; the run directory. Resumes after the
    server's last checkpointed round when the run directory has one."""
    from tunelab.federated.run import check
    from tunelab.run.rundir import write_config

    check(cfg)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    write_config(cfg, out)
    root, env = prepare(cfg)
    status = out / "federated" / "status.json"
    status.unlink(missing_ok=True)
    fed = Federation(root, env)
    try:
        fed.start(cfg)
        submit(fed, out / "config.yaml")
        while not status.exists() and fed.link.poll() is None:  # flwr run --stream returns when the run ends
            time.sleep(1)
    finally:
        fed.stop()
    state = json.loads(status.read_text()) if status.exists() else {"state": "failed", "error": "the server stopped"}
    if state["state"] != "finished":
        raise TunelabError(f"federated run failed: {state.get('error')}; logs in {root}; run the same command "
                           f"again to resume after the last complete round")
    return out
