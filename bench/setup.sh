#!/bin/sh
# Install the benchmark's peer runners (strace, valgrind, qemu-user), and node for
# the JIT workload, when missing. Does nothing when all four are on PATH;
# otherwise says what is missing, then runs apt-get update and apt-get install -y
# for the missing packages only.
set -e

missing=""
command -v strace >/dev/null 2>&1 || missing="$missing strace"
command -v valgrind >/dev/null 2>&1 || missing="$missing valgrind"
command -v qemu-x86_64 >/dev/null 2>&1 || missing="$missing qemu-user"
command -v node >/dev/null 2>&1 || missing="$missing nodejs"

if [ -z "$missing" ]; then
    echo "bench/setup.sh: strace, valgrind, qemu-x86_64 and node are installed"
    exit 0
fi

echo "bench/setup.sh: missing:$missing; installing with apt-get"
sudo=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo="sudo"
    else
        echo "bench/setup.sh: not root and no sudo; install$missing by hand" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# shellcheck disable=SC2086
$sudo apt-get install -y -qq $missing
