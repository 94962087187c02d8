// A long-lived client across daemon restarts: in-flight generations fail clearly, the client
// reconnects with backoff (finding the restarted daemon's new port through the state directory).

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { connect, DisconnectedError } from "../dist/index.js";
import { startDaemon } from "./daemon.js";

/** @type {Awaited<ReturnType<typeof startDaemon>>} */
let daemon;

before(async () => {
  daemon = await startDaemon();
});

after(async () => {
  await daemon?.dispose();
});

const story = { messages: [{ role: "user", content: "Write a long story about a lighthouse." }], max_tokens: 300 };

function once(client, event) {
  return new Promise((resolve) => {
    const off = client.on(event, (v) => {
      off();
      resolve(v);
    });
  });
}

test("a killed daemon fails in-flight generations; the client reconnects to its restart", async () => {
  const client = await connect({ stateDir: daemon.stateDir, reconnect: { initialDelayMs: 50, maxDelayMs: 400 } });
  try {
    const firstUrl = client.url;
    const opened = [];
    const attempts = [];
    client.on("open", (h) => opened.push(h));
    client.on("reconnecting", (r) => attempts.push(r));

    const gen = client.generate(story);
    for await (const ev of gen) if (ev.type === "token") break; // one token: it is running
    const gen2 = client.generate(story);
    assert.equal((await gen2.next()).value.type, "started");

    const disconnected = once(client, "disconnect");
    await daemon.stop("SIGKILL");
    const err = await gen2.collect().catch((e) => e);
    assert.ok(err instanceof DisconnectedError, String(err));
    assert.equal(err.code, "disconnected");
    assert.match(err.message, /closed .*in flight/);
    await disconnected;
    assert.equal(client.state, "reconnecting");

    // Requests made while the daemon is down wait for the reconnection.
    const pending = client.tokenize("Hello world");
    await new Promise((r) => setTimeout(r, 300)); // a few refused attempts
    await daemon.start(); // same state directory, new port
    const t = await pending;
    assert.ok(t.tokens.length >= 2);
    assert.equal(client.state, "open");
    assert.notEqual(client.url, firstUrl, "found the new port");
    assert.equal(client.url, daemon.url);
    assert.equal(opened.length, 1);
    assert.ok(attempts.length >= 2, `${attempts.length} attempts`);
    // Backoff grows and stays under the cap.
    assert.ok(attempts.every((a) => a.delayMs <= 400));
    assert.ok(attempts[0].delayMs <= 50);

    const r = await client.generate({ prompt: "Hello", max_tokens: 3 }).collect();
    assert.equal(r.tokens.length, 3);
  } finally {
    client.close();
  }
});

test("a daemon shut down with SIGTERM ends generations as cancelled, then the client reconnects", async () => {
  const client = await connect({ stateDir: daemon.stateDir, reconnect: { initialDelayMs: 50, maxDelayMs: 200 } });
  try {
    const gen = client.generate(story);
    for await (const ev of gen) if (ev.type === "token") break;
    const gen2 = client.generate(story);
    await gen2.next();
    const stopping = daemon.stop("SIGTERM");
    const r = await gen2.collect();
    assert.equal(r.done.finish_reason, "cancelled");
    await stopping;
    await daemon.start();
    assert.equal((await client.status()).connections, 1);
    assert.equal(client.url, daemon.url);
  } finally {
    client.close();
  }
});

test("without reconnect a drop closes the client; with maxAttempts it gives up", async () => {
  const once1 = await connect({ url: daemon.url, token: daemon.token, reconnect: false });
  const limited = await connect({ url: daemon.url, token: daemon.token, reconnect: { initialDelayMs: 10, maxDelayMs: 20, maxAttempts: 3 } });
  const closedOnce = once(once1, "close");
  const closedLimited = once(limited, "close");
  const droppedLimited = once(limited, "disconnect");
  await daemon.stop("SIGKILL");
  await closedOnce;
  // Each client sees the drop on its own socket; the request below must not race `limited`'s.
  await droppedLimited;
  assert.equal(once1.state, "closed");
  await assert.rejects(once1.status(), DisconnectedError);
  // A waiting request keeps the process alive while the client retries (retrying alone does not).
  await assert.rejects(limited.tokenize("x"), /gave up reconnecting to mlxd after 3 attempts/);
  const { error } = await closedLimited;
  assert.match(error.message, /gave up/);
  assert.equal(limited.state, "closed");
  await daemon.start();
});
