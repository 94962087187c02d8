#!/usr/bin/env bash
# Installs, builds and tests the TypeScript client and the VS Code extension against a real
# daemon (the tests start `target/debug/mlxd serve` on port 0 themselves).
#
#   clients/test.sh            # from anywhere in the repository
#   MLXD_BIN=/path/to/mlxd clients/test.sh
#
# Needs Node >= 20 and npm. Dependencies come from the lockfiles (`npm ci`, offline when the npm
# cache has them). The daemon binary is built with `cargo build -p mlxd` when it is missing.
# Exits non-zero on any failure.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
user_bin="${MLXD_BIN:-}"
export MLXD_BIN="${MLXD_BIN:-$root/target/debug/mlxd}"

say() { printf '\n==> %s\n' "$*"; }
fail() { printf 'clients/test.sh: %s\n' "$*" >&2; exit 1; }

command -v node >/dev/null || fail "node is not installed (Node >= 20 is needed)"
command -v npm >/dev/null || fail "npm is not installed"
major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$major" -ge 20 ] || fail "Node $(node --version) is too old; the clients need Node >= 20"

if [ ! -x "$MLXD_BIN" ]; then
  [ -z "$user_bin" ] || fail "MLXD_BIN=$user_bin is not an executable"
  say "building the daemon (cargo build -p mlxd)"
  (cd "$root" && cargo build -p mlxd) || fail "cannot build the daemon; build it with \`cargo build -p mlxd\` or set MLXD_BIN"
fi

install() {
  if [ -f package-lock.json ]; then
    npm ci --prefer-offline --no-audit --no-fund
  else
    npm install --prefer-offline --no-audit --no-fund
  fi
}

start=$SECONDS

say "clients/typescript: install, build, test"
cd "$here/typescript"
install
npm run --silent build
npm test

say "clients/vscode: install, build, test"
cd "$here/vscode"
install
npm run --silent build
npm test

say "clients: all tests passed in $((SECONDS - start)) s"
