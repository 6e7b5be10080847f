"""A throw-away single-node SLURM cluster on this machine, for tests and benchmarks.

Everything lives in one folder (config, munge key and socket, state, spool, logs); nothing
under /etc is touched. Client commands (sbatch, squeue, sinfo...) find the cluster through
the ``SLURM_CONF`` variable of :attr:`SlurmCluster.env`. The daemons are started in the
foreground as children in their own session, their PIDs are kept (and written to
``<root>/pids``), and :meth:`SlurmCluster.stop` ends exactly those PIDs.

Design choices, for a container without systemd or cgroups:

- munged with its own key and socket (``AuthInfo=socket=...``), started with ``--force``
  because temporary folders live below the world-writable /tmp;
- ``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``,
  ``JobAcctGatherType=jobacct_gather/none``: no cgroup plugin anywhere;
- no slurmdbd: ``AccountingStorageType=accounting_storage/none``. The job completion log
  (``JobCompType=jobcomp/filetxt``) records every finished job (:meth:`completed_jobs`),
  and ``MinJobAge`` is 10 minutes so that ``squeue --states=all`` still lists finished jobs:
  snakemake-executor-plugin-slurm must then use ``--slurm-status-command squeue``;
- partitions ``cpu`` (default) and ``gpu`` on the same node, which announces one GPU
  as a count-only GRES (``Gres=gpu:1``, no device file), so that ``sbatch --gpus=1`` is
  accepted and scheduled like on a real GPU partition (the job sees no device).

Use it from Python::

    with SlurmCluster(tmp_path / "slurm") as cluster:
        subprocess.run(["sbatch", "--wrap", "hostname"], env=cluster.env)

or from a shell (it prints ``export SLURM_CONF=... PATH=...``)::

    eval "$(python tests/slurm_cluster.py start /tmp/slurm)"   # sets SLURM_CONF and PATH
    python tests/slurm_cluster.py stop /tmp/slurm
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order (reverse of start)
REQUIRED_COMMANDS = (
    "munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel",
)
PARTITIONS = ("cpu", "gpu")


class SlurmUnavailable(RuntimeError):
    """SLURM or munge is not installed (or cannot run here); the message says why."""


def missing_commands() -> list[str]:
    """The SLURM/munge programs that are not on PATH (sbin included)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    return [cmd for cmd in REQUIRED_COMMANDS if shutil.which(cmd, path=path) is None]


def _which(cmd: str) -> str:
    found = shutil.which(cmd, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin")
    if found is None:
        raise SlurmUnavailable(f"'{cmd}' is not installed (run: bash .ci/install_slurm.sh)")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_hardware() -> dict[str, int]:
    """CPUs/sockets/cores/threads and memory as slurmd itself detects them (``slurmd -C``)."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    line = next(text for text in out.splitlines() if text.startswith("NodeName="))
    fields = dict(item.split("=", 1) for item in line.split())
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    return {key: int(fields[key]) for key in keys if key in fields}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child counts as dead
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class SlurmCluster:
    """A single-node SLURM cluster rooted at ``root`` (created; must be short: socket paths).

    ``mem_mb``: memory the node offers (default: detected minus ``headroom_mb``, at least
    ``min_mem_mb``: memory is not enforced without cgroups, only counted by the scheduler);
    ``cpus``: CPUs the node offers (default: detected; fewer than detected is allowed);
    ``gpus``: count-only GPUs announced by the node (0 disables the GRES).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        mem_mb: int | None = None,
        headroom_mb: int = 2048,
        min_mem_mb: int = 16000,
        cpus: int | None = None,
        gpus: int = 1,
        min_job_age: int = 600,
    ) -> None:
        self.root = Path(root).resolve()
        self.mem_mb = mem_mb
        self.headroom_mb = headroom_mb
        self.min_mem_mb = min_mem_mb
        self.cpus = cpus
        self.gpus = gpus
        self.min_job_age = min_job_age
        self.hostname = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        self.jobcomp_log = self.root / "log" / "jobcomp.log"
        self.pids: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ environment
    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF, and PATH with <root>/bin (the srun shim) first and sbin
        last: pass it to every SLURM client and to Snakemake."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join(
            [str(self.root / "bin"), env.get("PATH", ""), "/usr/sbin", "/sbin"]
        )
        for key in list(env):  # never inherit a surrounding job's context
            if key.startswith(("SLURM_JOB", "SLURM_STEP", "SBATCH_", "SRUN_", "SALLOC_")):
                env.pop(key)
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """Run a SLURM client command against this cluster; return its stdout."""
        proc = subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc.stdout

    # ------------------------------------------------------------------ configuration
    def write_config(self) -> None:
        socket_path = self.root / "munge" / "munge.socket"
        if len(str(socket_path)) > 100:  # sockaddr_un holds 108 bytes
            raise ValueError(f"cluster root {self.root} is too long for a Unix socket path")
        for sub in ("etc", "munge", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o755)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)

        hw = _node_hardware()
        cpus = min(self.cpus or hw["CPUs"], hw["CPUs"])
        if cpus == hw["CPUs"]:
            topology = " ".join(
                f"{k}={hw[k]}"
                for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
                if k in hw
            )
        else:
            topology = f"CPUs={cpus}"
        # Memory is bookkeeping only here (no cgroups enforce it), and rules ask for a few GB
        # each: offer at least min_mem_mb even on a small machine (config_overrides below
        # lets slurmd accept a figure above the detected one).
        mem = self.mem_mb or max(self.min_mem_mb, hw["RealMemory"] - self.headroom_mb)
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        user = getpass.getuser()
        r = self.root
        ctld_port, slurmd_port = _free_port(), _free_port()
        lines = [
            "# written by tests/slurm_cluster.py",
            "ClusterName=msdseg",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r}/munge/munge.socket",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp_log}",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "SchedulerType=sched/backfill",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            f"MinJobAge={self.min_job_age}",
            "KillWait=5",
            "InactiveLimit=0",
            "Waittime=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "GresTypes=gpu",
            f"PlugStackConfig={r}/etc/plugstack.conf",
            f"NodeName={self.hostname} NodeAddr=127.0.0.1 {topology} RealMemory={mem}{gres} State=UNKNOWN",
            f"PartitionName=cpu Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP",
            f"PartitionName=gpu Nodes={self.hostname} MaxTime=INFINITE State=UP",
            "",
        ]
        self.conf.write_text("\n".join(lines))
        (r / "etc" / "plugstack.conf").write_text("")
        # snakemake-executor-plugin-slurm-jobstep starts each job with `srun` after removing
        # every SLURM_* variable (SLURM_CONF included) from the environment; a real cluster
        # has its config at /etc/slurm or configless, this one lives here: srun on PATH is
        # a two-line shim that names this cluster's config and runs the real srun.
        (r / "bin").mkdir(exist_ok=True)
        shim = r / "bin" / "srun"
        shim.write_text(
            f"#!/bin/sh\nSLURM_CONF='{self.conf}' exec '{_which('srun')}' \"$@\"\n"
        )
        shim.chmod(0o755)
        # slurmd drops GPUs without a device file; empty regular files named like NVIDIA
        # devices stand in for them (no cgroup device constraint exists to notice)
        gres_conf = ""
        if self.gpus:
            (r / "dev").mkdir(exist_ok=True)
            for index in range(self.gpus):
                (r / "dev" / f"nvidia{index}").touch()
            files = f"{r}/dev/nvidia[0-{self.gpus - 1}]" if self.gpus > 1 else f"{r}/dev/nvidia0"
            gres_conf = f"NodeName={self.hostname} Name=gpu File={files}\n"
        (r / "etc" / "gres.conf").write_text("AutoDetect=off\n" + gres_conf)

    # ------------------------------------------------------------------ lifecycle
    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        proc = subprocess.Popen(
            argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.root,
        )
        log.close()
        self._procs[name] = proc
        self.pids[name] = proc.pid
        (self.root / "pids").write_text(json.dumps(self.pids))

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                        + self.logs_tail()
                    )
            if ready():
                return
            time.sleep(0.25)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}:\n" + self.logs_tail())

    def start(self, timeout: float = 60) -> SlurmCluster:
        """Write the configuration, start munged, slurmctld and slurmd; wait for an idle node."""
        for cmd in REQUIRED_COMMANDS:
            _which(cmd)
        self.write_config()
        r = self.root
        socket_path = r / "munge" / "munge.socket"
        try:
            self._spawn(
                "munged",
                [
                    _which("munged"), "--foreground", "--force",
                    f"--socket={socket_path}",
                    f"--key-file={r}/munge/munge.key",
                    f"--pid-file={r}/run/munged.pid",
                    f"--log-file={r}/log/munged.log",
                    f"--seed-file={r}/munge/munged.seed",
                ],
            )
            self._wait("munged", socket_path.exists, timeout)
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait("slurmctld", lambda: self._ping(), timeout)
            self._spawn(
                "slurmd", [_which("slurmd"), "-D", "-N", self.hostname, "-f", str(self.conf)]
            )
            self._wait("an idle node", self._node_idle, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _ping(self) -> bool:
        proc = subprocess.run(
            ["scontrol", "ping"], env=self.env, capture_output=True, text=True, timeout=10
        )
        return proc.returncode == 0 and "UP" in proc.stdout

    def _node_idle(self) -> bool:
        proc = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True,
            timeout=10,
        )
        return proc.returncode == 0 and "idle" in proc.stdout.split()

    def stop(self, timeout: float = 15) -> None:
        """Terminate the daemons this object (or the ``pids`` file in root) started, by PID."""
        pids = dict(self.pids)
        pid_file = self.root / "pids"
        if not pids and pid_file.exists():
            pids = json.loads(pid_file.read_text())
        # cancel what is still queued or running, so that no job step outlives the cluster
        if pids.get("slurmctld") and _pid_alive(pids["slurmctld"]):
            subprocess.run(
                ["scancel", "--full", "--user", getpass.getuser()], env=self.env,
                capture_output=True, timeout=10,
            )
        for name in DAEMONS:
            pid = pids.get(name)
            if pid is None or not _pid_alive(pid):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + timeout
            while _pid_alive(pid) and time.monotonic() < deadline:
                proc = self._procs.get(name)
                if proc is not None:
                    try:
                        proc.wait(timeout=0.2)
                    except subprocess.TimeoutExpired:
                        pass
                else:
                    time.sleep(0.2)
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
            proc = self._procs.get(name)
            if proc is not None:
                proc.wait(timeout=5)
        # slurmstepd processes of jobs that were killed are children of init now;
        # they belong to this cluster when their command line names our spool folder
        for pid in self._stray_stepds():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pids.clear()
        self._procs.clear()
        if pid_file.exists():
            pid_file.unlink()

    def _stray_stepds(self) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                environ = (entry / "environ").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if cmdline.startswith("slurmstepd") and f"SLURM_CONF={self.conf}" in environ:
                found.append(int(entry.name))
        return found

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection
    def completed_jobs(self) -> list[dict[str, str]]:
        """Finished jobs from the job completion log: one dict per job (JobId, JobState...)."""
        if not self.jobcomp_log.exists():
            return []
        jobs = []
        for line in self.jobcomp_log.read_text().splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if fields:
                jobs.append(fields)
        return jobs

    def jobs(self, name: str | None = None) -> list[dict[str, str]]:
        """Jobs slurmctld still knows (finished ones for MinJobAge seconds), from
        ``scontrol -o show job``: one dict per job (JobId, JobName, JobState, Partition,
        Comment, TresPerJob, NumCPUs, MinMemoryNode, TimeLimit, ExitCode...)."""
        out = self.run("scontrol", "-o", "show", "job", check=False)
        jobs = []
        for line in out.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if "JobId" in fields and (name is None or fields.get("JobName") == name):
                jobs.append(fields)
        return sorted(jobs, key=lambda job: int(job["JobId"]))

    def logs_tail(self, lines: int = 15) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            if path.name == self.jobcomp_log.name:
                continue
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(parts)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("start", "stop"):
        print(f"usage: {argv[0]} start|stop ROOT", file=sys.stderr)
        return 2
    cluster = SlurmCluster(argv[2])
    if argv[1] == "start":
        cluster.start()
        print(f"export SLURM_CONF='{cluster.conf}' PATH='{cluster.root / 'bin'}':\"$PATH\"")
        print(f"# stop with: python {argv[0]} stop {cluster.root}", file=sys.stderr)
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
