"""A fork server for tests that signal real training processes.

Starting `python -m tunelab` costs 5-10 s on a busy 2-core machine, almost all of it importing
torch and transformers. The server pays that once: it imports them (and tunelab) and then, per
`spawn`, forks a fresh process that runs `tunelab.cli.main(argv)` exactly as the console script
does, with its own environment, working directory and stdout/stderr files, and exits with its
return code. The processes are real: SIGKILL, SIGINT and SIGTERM reach them from the kernel, and
nothing in tunelab is mocked. The server itself never computes with torch before forking, so no
thread pool is inherited half-initialised; every child runs single-threaded (as the reference
does), which keeps results bitwise comparable between children.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SERVER = r"""
import json, os, signal, sys, time, traceback
import torch
torch.set_num_threads(1)
import transformers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # resolve lazy imports once
import tunelab.cli, tunelab.data, tunelab.methods, tunelab.models, tunelab.objectives, tunelab.training.loop

def child(req):
    os.environ.update(req["env"])
    for fd, path in ((1, req["out"]), (2, req["err"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir(req["cwd"])
    try:
        rc = tunelab.cli.main(req["argv"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        rc = 1
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(rc)

def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n"); sys.stdout.flush()

reply({"ready": True})
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "spawn":
        pid = os.fork()
        if pid == 0:
            child(req)
        reply({"pid": pid})
    elif req["op"] == "wait":
        deadline = time.monotonic() + req["timeout"]
        while True:
            done, status = os.waitpid(req["pid"], os.WNOHANG)
            if done:
                reply({"rc": os.waitstatus_to_exitcode(status)}); break
            if time.monotonic() > deadline:
                reply({"rc": None}); break
            time.sleep(0.01)
"""


class Child:
    """A forked `tunelab` process: its pid, its output files and ways to meet or end it."""

    def __init__(self, server: ForkServer, pid: int, out: Path, err: Path):
        self.server, self.pid, self.out, self.err = server, pid, out, err
        self.rc: int | None = None

    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""  # the child creates it

    def stdout(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def wait_paused(self, point: str, timeout: float = 120) -> bool:
        """True once the process prints it is paused at `point`; False if it exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if f"TUNELAB_PAUSED {point}\n" in self.stderr():
                return True
            if self.wait(timeout=0.05) is not None:
                return False
        raise TimeoutError(f"pid {self.pid} never reached {point}:\n{self.stderr()[-2000:]}")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 180) -> int | None:
        """The exit code (negative: killed by that signal), or None if still running at `timeout`."""
        if self.rc is None:
            self.rc = self.server.wait(self.pid, timeout)
        return self.rc


class ForkServer:
    def __init__(self, workdir: Path, env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.count = 0
        full_env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                        **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=full_env, cwd=self.workdir)
        assert self._read().get("ready"), "fork server did not start"

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("fork server died")
        return json.loads(line)

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> Child:
        """Start `tunelab ARGV` in a new process; `env` is added to its environment."""
        self.count += 1
        out, err = (self.workdir / f"child-{self.count}.{s}" for s in ("out", "err"))
        pid = self._ask({"op": "spawn", "argv": argv, "env": env or {}, "cwd": str(self.workdir),
                         "out": str(out), "err": str(err)})["pid"]
        return Child(self, pid, out, err)

    def wait(self, pid: int, timeout: float) -> int | None:
        return self._ask({"op": "wait", "pid": pid, "timeout": timeout})["rc"]

    def run(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> Child:
        """Run `tunelab ARGV` to the end; the returned child has `.rc` set."""
        child = self.spawn(argv, env)
        if child.wait(timeout) is None:
            child.signal(signal.SIGKILL)
            child.wait()
            raise TimeoutError(f"tunelab {' '.join(argv)} ran past {timeout} s")
        return child

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
