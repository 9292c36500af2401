#!/bin/sh
# Install what tests/test_slurm.py and tests/test_multinode.py need (Debian/Ubuntu, as root): slurmctld, slurmd,
# the client commands (sbatch/srun/scontrol/...) and munge for a real SLURM cluster, and iproute2 + util-linux
# (ip, nsenter, unshare) for the namespaced two-node one. No-op when all of them are there.
# The packages' own services are not started (no systemd needed): tests/slurm_cluster.py runs the daemons.
set -eu
have() { command -v "$1" >/dev/null 2>&1 || test -x "/usr/sbin/$1" || test -x "/sbin/$1"; }
if have sbatch && have slurmd && have ip && have nsenter && have unshare; then
    echo "install_slurm: SLURM and namespace tools already installed: $(command -v sbatch)"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: needs root and apt-get; the SLURM tests will be skipped" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge iproute2 util-linux
