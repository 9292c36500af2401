#!/bin/sh
# Install what tests/test_slurm.py needs for a real one-node SLURM cluster (Debian/Ubuntu, as root):
# slurmctld, slurmd, the client commands (sbatch/srun/scontrol/...) and munge. No-op when sbatch exists.
# The packages' own services are not started (no systemd needed): tests/slurm_cluster.py runs the daemons.
set -eu
if command -v sbatch >/dev/null 2>&1 && { command -v slurmd || test -x /usr/sbin/slurmd; } >/dev/null 2>&1; then
    echo "install_slurm: SLURM already installed: $(command -v sbatch)"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: needs root and apt-get; the SLURM tests will be skipped" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
