"""A real 2-node Slurm cluster on localhost for the tests: munged, slurmctld, two slurmd.

    cluster = SlurmCluster(tmp_dir); cluster.start(); ...; cluster.stop()

Everything (key, sockets, state, spool, pid and log files) lives under one temporary directory;
the daemons run in the foreground as children of the test process, and `stop()` terminates
exactly those. Nodes n1 and n2 are two slurmd on 127.0.0.1 with their own ports, so `sbatch -N 2`
runs one task per "node" with SLURM_NODEID 0 and 1. No accounting: job states come from
`scontrol show job` and a jobcomp/filetxt file.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")


def missing_binaries() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: Path, cpus_per_node: int = 2):
        self.root = Path(root)
        self.cpus = cpus_per_node
        self.procs: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.sock = self.root / "munge.sock"

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "spool-n1", "spool-n2", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        ctl_port, n1, n2 = _free_port(), _free_port(), _free_port()
        host = socket.gethostname()
        self.conf.write_text(f"""
ClusterName=ganpipetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctl_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.sock},cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
MailProg=/bin/true
JobCompType=jobcomp/filetxt
JobCompLoc={r}/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=30
MinJobAge=600
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname={host} Port={n1} CPUs={self.cpus} State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname={host} Port={n2} CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def start(self, timeout: float = 60) -> None:
        self._write_config()
        r = self.root
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.sock}",
                               f"--key-file={r}/munge/munge.key", f"--log-file={r}/munged.log",
                               f"--pid-file={r}/munged.pid", f"--seed-file={r}/munge/seed"])
        self._wait(lambda: self.sock.exists(), timeout, "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        time.sleep(1)
        for node in ("n1", "n2"):
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])

        def nodes_idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=self.env)
            states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
            return states.get("n1") == "idle" and states.get("n2") == "idle"
        self._wait(nodes_idle, timeout, "both nodes idle")

    def _wait(self, check, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if check():
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited early with {p.returncode}; see {self.root}: "
                                       + self.logs())
            time.sleep(0.3)
        raise RuntimeError(f"Slurm test cluster: timed out waiting for {what}; " + self.logs())

    def logs(self) -> str:
        out = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stdout")):
            out.append(f"--- {f.name}\n{f.read_text()[-1500:]}")
        return "\n".join(out)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stdout}{proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        fields = {}
        for token in out.split():
            k, _, v = token.partition("=")
            fields[k] = v
        return fields

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
