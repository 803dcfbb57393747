#!/usr/bin/env bash
# Every test, on a fresh Debian machine that has only the Rust toolchain: installs what the tests
# need when it is missing, then runs `cargo test` (arguments are passed on to it).
#
# Beyond Rust the tests need systemd-analyze (to verify the unit file), the Autobahn runner
# kosoku (pinned), python-socketio with aiohttp (pinned in tests/socketio/requirements.txt), and
# for the browser test Chromium, node with playwright-core (pinned in
# tests/browser/package-lock.json), ss, and redis-server (the cluster tests start their own, on
# a Unix socket of each test's). Everything else they use (upstream chat cores,
# clients, certificates, keys) is made inside the tests, on loopback.
set -euo pipefail
cd "$(dirname "$0")"

KOSOKU_VERSION=0.1.0

# Installing packages needs root: as root, or through sudo when there is one.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        echo "test.sh: $* needs root, and there is no sudo" >&2
        exit 1
    fi
}

missing=()
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v chromium >/dev/null || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v ss >/dev/null || missing+=(iproute2)
command -v pip3 >/dev/null || missing+=(python3-pip)
command -v redis-server >/dev/null || missing+=(redis-server)
# jemalloc, the binary's allocator, is built from C source with its configure and make.
command -v make >/dev/null || missing+=(make)
if [ ${#missing[@]} -gt 0 ]; then
    echo "test.sh: installing ${missing[*]}" >&2
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

# playwright-core as pinned, unless that is what is installed already.
pinned=$(sed -n 's/.*"playwright-core": "\(.*\)".*/\1/p' tests/browser/package.json)
installed=$(cd tests/browser && node -p "require('playwright-core/package.json').version" 2>/dev/null || true)
if [ "$installed" != "$pinned" ]; then
    npm ci --prefix tests/browser --no-audit --no-fund --silent
fi

# pip puts a user's scripts in ~/.local/bin.
export PATH="$HOME/.local/bin:$PATH"
if [ "$(pip3 show kosoku 2>/dev/null | sed -n 's/^Version: //p')" != "$KOSOKU_VERSION" ]; then
    pip3 install --quiet "kosoku==$KOSOKU_VERSION" ||
        pip3 install --quiet --break-system-packages "kosoku==$KOSOKU_VERSION"
fi

# The Socket.IO peers, as pinned, unless every pin is installed already.
requirements=tests/socketio/requirements.txt
if grep -v '^#' "$requirements" | grep -vxFf <(pip3 freeze 2>/dev/null) | grep -q .; then
    pip3 install --quiet -r "$requirements" ||
        pip3 install --quiet --break-system-packages -r "$requirements"
fi

# Every test binary runs even when one fails, so that one failure does not hide the others.
cargo test --no-fail-fast "$@"
