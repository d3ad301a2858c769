#!/usr/bin/env bash
# System tools the deployment tests use (tests/integration/test_deploy.py), from Debian's packages: Prometheus and
# promtool (package prometheus) and the compose v1 client (package docker-compose, used when the docker client has
# no `compose` plugin). Needs root (or sudo) and apt-get; .ci/run calls it before `make test`.
# The package's own Prometheus service is never started: invoke-rc.d is denied through policy-rc.d while
# installing (the tests run their own Prometheus on loopback).
set -euo pipefail

packages=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || packages+=(prometheus)
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
    packages+=(docker-compose)
fi
if [ ${#packages[@]} -eq 0 ]; then
    echo "install-test-tools: prometheus, promtool and a compose client are present"
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo -n"
fi

policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# Written by moeserve scripts/install-test-tools.sh while installing; removed after.\nexit 101\n' \
        | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
    own_policy=1
fi
trap 'if [ "$own_policy" = 1 ]; then $sudo rm -f "$policy"; fi' EXIT

echo "install-test-tools: installing ${packages[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
prometheus --version 2>&1 | head -n 1
