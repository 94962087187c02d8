// Pieces that need no daemon: backoff, discovery rules.

import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { backoffDelay, Client, ConfigError } from "../dist/index.js";
import { defaultStateDir, discover } from "../dist/discover.js";

test("backoff grows exponentially, is capped and jittered", () => {
  const opts = { initialDelayMs: 100, maxDelayMs: 1000, factor: 2, jitter: 0.5 };
  const hi = (a) => backoffDelay(a, opts, () => 1);
  const lo = (a) => backoffDelay(a, opts, () => 0);
  assert.deepEqual([0, 1, 2, 3, 4, 5, 50].map(hi), [100, 200, 400, 800, 1000, 1000, 1000]);
  assert.deepEqual([0, 1, 2, 3, 4].map(lo), [50, 100, 200, 400, 500]);
  for (let i = 0; i < 100; i++) {
    const d = backoffDelay(3, opts);
    assert.ok(d >= 400 && d <= 800, String(d));
  }
  assert.equal(backoffDelay(0, { jitter: 0 }), 250, "default initial delay");
  assert.equal(backoffDelay(100, { jitter: 0 }), 10_000, "default cap");
});

test("default state directory: macOS, XDG_STATE_HOME, ~/.local/state", () => {
  assert.equal(defaultStateDir({ platform: "darwin", home: "/Users/a", env: {} }), "/Users/a/Library/Application Support/mlxd");
  assert.equal(defaultStateDir({ platform: "linux", home: "/home/a", env: { XDG_STATE_HOME: "/x/state" } }), "/x/state/mlxd");
  assert.equal(defaultStateDir({ platform: "linux", home: "/home/a", env: {} }), "/home/a/.local/state/mlxd");
});

test("discovery: environment first, then the state directory's files, then the default", async () => {
  const dir = mkdtempSync(join(tmpdir(), "mlxd-discover-"));
  try {
    assert.deepEqual(await discover({ env: { MLXD_STATE_DIR: dir } }), { url: "ws://127.0.0.1:7878/", token: undefined });
    writeFileSync(join(dir, "endpoint"), "ws://127.0.0.1:4242/\n");
    writeFileSync(join(dir, "token"), "abc123\n");
    assert.deepEqual(await discover({ env: { MLXD_STATE_DIR: dir } }), { url: "ws://127.0.0.1:4242/", token: "abc123" });
    assert.deepEqual(await discover({ env: { MLXD_STATE_DIR: dir, MLXD_URL: "ws://h:1/", MLXD_TOKEN: "t" } }), { url: "ws://h:1/", token: "t" });
    // An explicit state directory wins over the environment.
    assert.deepEqual(await discover({ stateDir: dir, env: { MLXD_URL: "ws://h:1/", MLXD_TOKEN: "t" } }), { url: "ws://127.0.0.1:4242/", token: "abc123" });
    // XDG_STATE_HOME/mlxd.
    const xdg = mkdtempSync(join(tmpdir(), "mlxd-xdg-"));
    const { mkdirSync } = await import("node:fs");
    mkdirSync(join(xdg, "mlxd"));
    writeFileSync(join(xdg, "mlxd", "token"), "xdgtoken");
    assert.equal((await discover({ env: { XDG_STATE_HOME: xdg }, platform: "linux" })).token, "xdgtoken");
    rmSync(xdg, { recursive: true, force: true });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a bad URL is a configuration error", async () => {
  const c = new Client({ url: "http//nope", token: "x", reconnect: false });
  const err = await c.status().catch((e) => e);
  assert.equal(err.code, "config");
  const c2 = new Client({ url: "ftp://x/", token: "x" });
  assert.match((await c2.open().catch((e) => e)).message, /not a WebSocket URL/);
  assert.ok(new ConfigError("x").code === "config");
});
