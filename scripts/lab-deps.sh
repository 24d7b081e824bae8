#!/usr/bin/env bash
# Installs what the local lab needs on Debian or Ubuntu, as root: the OpenSSH server and
# client, sudo, Python with PyYAML, iproute2 (network namespaces for bastion labs) and
# openssl (sudo password hashes). Does nothing when they are already installed.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "$0: run as root (the lab starts sshd in mount namespaces)" >&2
  exit 2
fi
packages="openssh-server openssh-client sudo python3 python3-yaml iproute2 openssl procps"
missing=""
for package in $packages; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing="$missing $package"
done
if [ -n "$missing" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # shellcheck disable=SC2086
  apt-get install -y -q --no-install-recommends $missing
fi
mkdir -p /run/sshd
