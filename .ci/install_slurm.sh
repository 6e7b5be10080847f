#!/usr/bin/env bash
# Install what tests/test_slurm.py needs for its single-node SLURM cluster:
# Debian's slurm-wlm (slurmctld, slurmd, client commands) and munge, plus the Snakemake
# SLURM executor plugin. No slurmdbd/MariaDB: the test cluster has no accounting database
# and the plugin polls job status with squeue (see docs/slurm.md).
#
# Idempotent and quiet. It always exits 0: when the packages cannot be installed (not root
# and no sudo, no network...) it says why, and the SLURM tests skip with that reason.
#   usage: bash .ci/install_slurm.sh
set -u

PLUGIN_SPEC='snakemake-executor-plugin-slurm>=2.8,<3'
LOG="${TMPDIR:-/tmp}/install_slurm.$$.log"
PYTHON="${PYTHON:-python3}"

have_slurm() {
    local cmd
    for cmd in munged slurmctld slurmd sbatch srun squeue sinfo scontrol scancel; do
        command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || return 1
    done
}

if have_slurm; then
    echo "install_slurm: slurm-wlm and munge already installed"
else
    if [ "$(id -u)" = 0 ]; then
        SUDO=""
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_slurm: SKIP: slurm-wlm/munge are missing and installing them needs root" \
            "(or password-less sudo); the SLURM tests will be skipped"
        exit 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install_slurm: SKIP: no apt-get on this machine (Debian/Ubuntu expected);" \
            "install slurm-wlm and munge by hand; the SLURM tests will be skipped"
        exit 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    # The packages' scripts would start munge/slurmctld/slurmd as system services, which fail
    # without /etc/slurm/slurm.conf (and fail the install); the tests start their own daemons.
    # Forbid service starts for the install, as container images do, unless already forbidden.
    POLICY=/usr/sbin/policy-rc.d
    if [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\n# temporary, from .ci/install_slurm.sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null \
            && $SUDO chmod 755 "$POLICY" && trap '$SUDO rm -f "$POLICY"' EXIT
    fi
    if ! { $SUDO apt-get update -qq \
        && $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge; } >"$LOG" 2>&1; then
        echo "install_slurm: SKIP: apt-get could not install slurm-wlm munge" \
            "(last lines of $LOG follow); the SLURM tests will be skipped"
        tail -n 5 "$LOG" | sed 's/^/install_slurm:   /'
        exit 0
    fi
    rm -f "$LOG"
    if have_slurm; then
        echo "install_slurm: installed $(dpkg-query -W -f='slurm-wlm ${Version}' slurm-wlm 2>/dev/null)," \
            "$(dpkg-query -W -f='munge ${Version}' munge 2>/dev/null)"
    else
        echo "install_slurm: SKIP: slurm-wlm installed but commands are missing; the SLURM tests will be skipped"
        exit 0
    fi
fi

if "$PYTHON" -c 'import snakemake_executor_plugin_slurm' 2>/dev/null; then
    echo "install_slurm: snakemake-executor-plugin-slurm already installed"
elif "$PYTHON" -m pip install -q "$PLUGIN_SPEC" >"$LOG" 2>&1; then
    rm -f "$LOG"
    echo "install_slurm: installed $("$PYTHON" -m pip show snakemake-executor-plugin-slurm 2>/dev/null | sed -n 's/^Version: /snakemake-executor-plugin-slurm /p')"
else
    echo "install_slurm: SKIP: pip could not install $PLUGIN_SPEC (last lines of $LOG follow);" \
        "the SLURM tests will be skipped"
    tail -n 5 "$LOG" | sed 's/^/install_slurm:   /'
fi
exit 0
