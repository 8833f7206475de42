"""``torchrun --nproc-per-node 2 -m rankwise.cli ...`` for the tests: two CPU processes (gloo), one thread each."""
import os
import signal
import socket
import subprocess
import sys

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, timeout=240):
    """``torchrun --nproc-per-node 2 -m rankwise.cli ARGS`` on one thread per process; (rc, stdout, stderr).

    The rendezvous is on 127.0.0.1 at a free port (``--standalone`` resolves the host name, which on some
    machines is not the loopback). On a timeout the launcher and its processes are killed and the test
    fails: a hang is a failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "rankwise.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun {' '.join(args)} hung for {timeout} s")
    return proc.returncode, out, err
