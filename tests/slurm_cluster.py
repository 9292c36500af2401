"""Bring up (and tear down) a real one-node SLURM cluster on this machine, for tests.

No systemd: munged runs as the munge user, ``slurmctld -D`` and ``slurmd -D`` run in the background
(each in its own session) from a generated slurm.conf in a scratch folder. Nothing under /etc/slurm
is written: every SLURM command (the daemons, sbatch/srun/scontrol/..., and the srun/scontrol calls
made inside jobs) finds the configuration through the ``SLURM_CONF`` environment variable, which
:attr:`SlurmCluster.env` carries and ``sbatch --export=ALL`` passes on to jobs.

What it needs: the Debian packages ``slurmctld slurmd slurm-client munge`` (see
scripts/install_slurm.sh) and root (munge key/dirs, daemons running jobs as root). Facts it relies on
are in the project notes (one-node SLURM on CI): slurm 22.05, munge 0.5.

Usable from Python (tests/test_slurm.py) or the command line::

    python tests/slurm_cluster.py up /tmp/megapix-slurm     # prints `export SLURM_CONF=...`
    python tests/slurm_cluster.py down /tmp/megapix-slurm   # stops by the saved PIDs
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SLURM_BINARIES = ("sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo", "slurmctld", "slurmd")
MUNGE_BINARIES = ("munged", "munge", "unmunge")
INSTALL_HINT = ("apt-get update && apt-get install -y --no-install-recommends "
                "slurmctld slurmd slurm-client munge   (or: bash scripts/install_slurm.sh)")


def _which(name: str) -> str | None:
    # Debian puts the daemons in /usr/sbin, which is not always on a test runner's PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def missing_binaries() -> list[str]:
    return [b for b in SLURM_BINARIES + MUNGE_BINARIES if _which(b) is None]


def why_unavailable() -> str | None:
    """None if a cluster can be brought up here, else the reason (for pytest.skip)."""
    missing = missing_binaries()
    if missing:
        return f"SLURM/munge not installed (missing: {', '.join(missing)}); install with: {INSTALL_HINT}"
    if os.geteuid() != 0 and not _munge_works():
        return "bringing up munge/slurm needs root (or an already running munged)"
    if os.geteuid() != 0:
        return "the local SLURM bring-up runs slurmd as root (SlurmdUser=root); run the tests as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_works() -> bool:
    munge, unmunge = _which("munge"), _which("unmunge")
    if not (munge and unmunge):
        return False
    try:
        cred = subprocess.run([munge, "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        out = subprocess.run([unmunge], input=cred.stdout, capture_output=True, timeout=10)
        return out.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _node_line(hostname: str) -> str:
    """The NodeName= line for this machine from `slurmd -C` (real CPU count and memory)."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
    for line in out.splitlines():
        if line.startswith("NodeName="):
            fields = [f for f in line.split() if not f.startswith(("NodeName=", "UpTime="))]
            return " ".join([f"NodeName={hostname}", *fields, "State=UNKNOWN"])
    cpus = os.cpu_count() or 1
    return f"NodeName={hostname} CPUs={cpus} State=UNKNOWN"


def _ensure_hostname_resolves(hostname: str) -> None:
    try:
        socket.gethostbyname(hostname)
        return
    except OSError:
        pass
    with open("/etc/hosts", "a") as f:
        f.write(f"\n127.0.0.1 {hostname}\n")


class SlurmCluster:
    """A one-node SLURM cluster whose config, state, spool and logs live in ``workdir``."""

    def __init__(self, workdir: str | os.PathLike, partition: str = "debug"):
        self.workdir = Path(workdir).resolve()
        self.partition = partition
        self.hostname = socket.gethostname().split(".")[0]
        self.conf = self.workdir / "slurm.conf"
        self.pids: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}

    # -- environment for clients -------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        env.setdefault("USER", pwd.getpwuid(os.geteuid()).pw_name)
        # A job submitted from inside another job (CI under SLURM, a torchrun shell) must not inherit its ids.
        for k in list(env):
            if (k.startswith("SLURM_") and k != "SLURM_CONF") or k in (
                    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                del env[k]
        return env

    client_prefix: list[str] = []  # how a client command reaches the controller (a namespace's `ip netns exec`)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*self.client_prefix, *cmd], env=self.env, capture_output=True, text=True, check=check,
                              timeout=timeout, **kw)

    # -- munge ---------------------------------------------------------------------------------
    def _start_munge(self) -> None:
        if _munge_works():
            # a munged is already running (system one or another bring-up): reuse it. The bring-up that started it
            # stops it, so two test sessions at once on one machine can pull munge from under each other's jobs.
            return
        munge_user = pwd.getpwnam("munge")
        uid, gid = munge_user.pw_uid, munge_user.pw_gid
        for path, mode in (("/etc/munge", 0o700), ("/var/log/munge", 0o700), ("/var/lib/munge", 0o711),
                           ("/run/munge", 0o755)):
            os.makedirs(path, exist_ok=True)
            os.chown(path, uid, gid)
            os.chmod(path, mode)
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            mungekey = _which("mungekey")
            if mungekey:
                subprocess.run([mungekey, "--create", "--keyfile", str(key)], check=True)
            else:
                key.write_bytes(os.urandom(1024))
        os.chown(key, uid, gid)
        os.chmod(key, 0o400)
        log = open(self.workdir / "munged.out", "ab")
        proc = subprocess.Popen(
            ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", _which("munged"), "-F", "--force"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs["munged"] = proc
        self.pids["munged"] = proc.pid
        deadline = time.time() + 20
        while time.time() < deadline:
            if _munge_works():
                return
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"munged did not come up; see {self.workdir / 'munged.out'}")

    # -- slurm ---------------------------------------------------------------------------------
    def write_conf(self) -> Path:
        return self._write_conf(controller=f"{self.hostname}(127.0.0.1)", node_lines=[_node_line(self.hostname)],
                                nodes=self.hostname, slurmd_suffix="")

    def _write_conf(self, controller: str, node_lines: list[str], nodes: str, slurmd_suffix: str) -> Path:
        """slurm.conf; `slurmd_suffix` ("-%n" for several slurmds on one machine) keeps their files apart."""
        d = self.workdir
        for sub in ("state", "spool", "logs"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text("\n".join([
            "# generated by tests/slurm_cluster.py: a test cluster on this machine, no accounting",
            "ClusterName=megapixtest",
            f"SlurmctldHost={controller}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # How long a requeued job waits before it may start again (default 120 s).
            "AuthInfo=cred_expire=30",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "ReturnToService=2",
            "MailProg=/bin/true",
            "JobRequeue=1",
            "KillWait=10",
            "MinJobAge=600",
            "InactiveLimit=0",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}{slurmd_suffix.replace('-', '/')}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd'}{slurmd_suffix}.pid",
            f"SlurmctldLogFile={d / 'logs' / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'logs' / 'slurmd'}{slurmd_suffix}.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            *node_lines,
            f"PartitionName={self.partition} Nodes={nodes} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        return self.conf

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.workdir / f"{name}.out", "ab")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs[name] = proc
        self.pids[name] = proc.pid

    def start(self, timeout: float = 60) -> "SlurmCluster":
        reason = why_unavailable()
        if reason:
            raise RuntimeError(reason)
        self.workdir.mkdir(parents=True, exist_ok=True)
        _ensure_hostname_resolves(self.hostname)
        self._start_munge()
        self.write_conf()
        self._spawn_daemons()
        self._save_pids()
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name in list(self._procs):
                if self._procs[name].poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{name} exited at start; see {self.workdir}/{name}.out and logs/")
            ping = self.run("scontrol", "ping", check=False, timeout=15)
            if "UP" in ping.stdout:
                states = self.run("sinfo", "-h", "-N", "-o", "%t", check=False, timeout=15).stdout.split()
                if states and all(st.startswith("idle") for st in states):
                    return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SLURM did not become idle in {timeout}s; logs in {self.workdir}/logs")

    def _spawn_daemons(self) -> None:
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf)])

    def _save_pids(self) -> None:
        (self.workdir / "pids.json").write_text(json.dumps(self.pids))

    def stop(self, timeout: float = 20) -> None:
        """Cancel remaining jobs, then stop the daemons this object started, by their PIDs."""
        if self.conf.exists() and "slurmctld" in self.pids:
            self.run("scancel", "--user", self.env["USER"], check=False, timeout=15)
            deadline = time.time() + 15
            while time.time() < deadline:
                q = self.run("squeue", "-h", check=False, timeout=15)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
        stop_pids(self.pids, timeout=timeout, procs=self._procs)
        self.pids.clear()
        self._procs.clear()
        pidfile = self.workdir / "pids.json"
        if pidfile.exists():
            pidfile.unlink()

# ------------------------------------------------------------------------------------------------------------
# Several nodes on this machine: network namespaces on a private bridge
# ------------------------------------------------------------------------------------------------------------
SUBNET = "10.213.0"  # a private (RFC 1918) /24 that exists only inside the namespaces below; no route leaves them


def why_no_namespaces() -> str | None:
    """None if network + UTS namespaces can be made here, else the reason (for pytest.skip)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "nsenter"):
        if _which(tool) is None:
            return f"`{tool}` is not installed (apt-get install -y iproute2 util-linux)"
    probe = f"mpxprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        uts = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--uts", "hostname", "probe"],
                             capture_output=True, text=True)
        if uts.returncode != 0:
            return f"cannot give a namespace its own hostname: {uts.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class NamespaceNodes:
    """`n` "nodes" on this machine, each a network namespace with an address on a bridge (in a namespace of its
    own), a hostname of its own (a UTS namespace per command started with :meth:`prefix`) and an /etc/hosts that
    names every node (`ip netns exec` bind-mounts /etc/netns/NS/hosts over /etc/hosts). Namespaces and the files
    under /etc/netns are this object's (named with the creating process's pid) and :meth:`down` removes them."""

    def __init__(self, n: int = 2):
        tag = f"mpx{os.getpid()}"
        if _which("nsenter") is None:
            raise RuntimeError("nsenter is not installed (apt-get install -y util-linux)")
        self.hostnames = [f"mpxnode{i}" for i in range(n)]
        self.netns = [f"{tag}-{h}" for h in self.hostnames]
        self.hub = f"{tag}-hub"
        self.addrs = [f"{SUBNET}.{10 + i}" for i in range(n)]
        self._made: list[str] = []

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def up(self) -> "NamespaceNodes":
        try:
            self._ip("netns", "add", self.hub)
            self._made.append(self.hub)
            self._ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            self._ip("-n", self.hub, "link", "set", "br0", "up")
            hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for a, h in zip(self.addrs, self.hostnames))
            for i, ns in enumerate(self.netns):
                self._ip("netns", "add", ns)
                self._made.append(ns)
                self._ip("link", "add", f"port{i}", "netns", self.hub, "type", "veth", "peer", "name", "eth0",
                         "netns", ns)
                self._ip("-n", self.hub, "link", "set", f"port{i}", "master", "br0", "up")
                self._ip("-n", ns, "addr", "add", f"{self.addrs[i]}/24", "dev", "eth0")
                self._ip("-n", ns, "link", "set", "eth0", "up")
                self._ip("-n", ns, "link", "set", "lo", "up")
                etc = Path("/etc/netns") / ns
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "hosts").write_text(hosts)
        except BaseException:
            self.down()
            raise
        return self

    def prefix(self, i: int) -> list[str]:
        """Run a command on node i: in its network namespace, with its hostname and /etc/hosts. (nsenter, not
        `ip netns exec`: that one also mounts a fresh /sys, without the /sys/fs/cgroup slurmd needs.)"""
        return ["nsenter", f"--net=/run/netns/{self.netns[i]}", "unshare", "--uts", "--mount", "sh", "-c",
                'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"', self.hostnames[i],
                f"/etc/netns/{self.netns[i]}/hosts"]

    def set_link(self, i: int, up: bool) -> None:
        """Unplug (or plug back) node i's cable: its bridge port goes down, its processes keep running."""
        self._ip("-n", self.hub, "link", "set", f"port{i}", "up" if up else "down")

    def down(self) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        self._made.clear()


class MultiNodeSlurmCluster(SlurmCluster):
    """A SLURM cluster of NamespaceNodes: slurmctld on node 0 (its head node), one ``slurmd -N NAME`` per node,
    munge shared through the filesystem (its socket and key). Client commands run on node 0 (:attr:`client_prefix`),
    as on a login node that is also the head."""

    def __init__(self, workdir: str | os.PathLike, nodes: NamespaceNodes, partition: str = "debug"):
        super().__init__(workdir, partition)
        self.nodes = nodes
        self.hostname = nodes.hostnames[0]
        self.client_prefix = nodes.prefix(0)

    def write_conf(self) -> Path:
        line = _node_line("X").split(" ", 1)[1]  # this machine's CPUs/memory, which every node shares
        n = self.nodes
        for h in n.hostnames:
            (self.workdir / "spool" / h).mkdir(parents=True, exist_ok=True)
        return self._write_conf(controller=f"{n.hostnames[0]}({n.addrs[0]})",
                                node_lines=[f"NodeName={h} NodeAddr={a} {line}" for h, a in zip(n.hostnames, n.addrs)],
                                nodes=",".join(n.hostnames), slurmd_suffix="-%n")

    def _spawn_daemons(self) -> None:
        n = self.nodes
        self._spawn("slurmctld", [*n.prefix(0), _which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for i, h in enumerate(n.hostnames):
            self._spawn(f"slurmd-{h}", [*n.prefix(i), _which("slurmd"), "-D", "-N", h, "-f", str(self.conf)])


def stop_pids(pids: dict[str, int], timeout: float = 20, procs: dict | None = None) -> None:
    """SIGTERM each daemon (slurmd before slurmctld before munged), SIGKILL after ``timeout``."""
    order = sorted((n for n in pids if n.startswith("slurmd")), reverse=True)  # every node's slurmd first
    order += [n for n in ("slurmctld", "munged") if n in pids]
    for name in order:
        pid = pids[name]
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        proc = (procs or {}).get(name)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc is not None:
                if proc.poll() is not None:
                    break
            elif not _alive(pid):
                break
            time.sleep(0.2)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if proc is not None:
                proc.wait(timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("up", "down"):
        print(__doc__)
        return 2
    workdir = Path(argv[2]).resolve()
    if argv[1] == "up":
        cluster = SlurmCluster(workdir).start()
        for proc in cluster._procs.values():  # keep them running after we exit
            proc.returncode = 0
        print(f"export SLURM_CONF={cluster.conf}")
        print(f"# pids: {cluster.pids} (saved in {workdir / 'pids.json'}); stop with: "
              f"python {argv[0]} down {workdir}", file=sys.stderr)
        return 0
    pidfile = workdir / "pids.json"
    if not pidfile.exists():
        print(f"no {pidfile}: nothing to stop", file=sys.stderr)
        return 1
    env = dict(os.environ, SLURM_CONF=str(workdir / "slurm.conf"))
    subprocess.run(["scancel", "--user", env.get("USER") or pwd.getpwuid(os.geteuid()).pw_name],
                   env=env, check=False)
    time.sleep(2)
    stop_pids(json.loads(pidfile.read_text()))
    pidfile.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
