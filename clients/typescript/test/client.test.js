// The client against a real daemon (SmolLM2-135M on the CPU, started by the test on port 0).

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { after, before, describe, test } from "node:test";
import { Client, connect, DisconnectedError, MlxdError, RefusedError, RequestError } from "../dist/index.js";
import { startDaemon } from "./daemon.js";

/** @type {Awaited<ReturnType<typeof startDaemon>>} */
let daemon;
/** @type {Client} */
let client;

before(async () => {
  daemon = await startDaemon();
  client = await connect({ url: daemon.url, token: daemon.token });
});

after(async () => {
  client?.close();
  await daemon?.dispose();
});

const chat = (content, max_tokens) => ({ messages: [{ role: "user", content }], max_tokens });

async function idle(c = client) {
  for (let i = 0; i < 100; i++) {
    const s = await c.status();
    const m = s.resident_models[0];
    if (!m || (m.running === 0 && m.queued === 0)) return s;
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.fail("the daemon still runs a generation");
}

describe("connection", () => {
  test("hello is checked and kept", () => {
    assert.equal(client.state, "open");
    assert.equal(client.hello.protocol, 1);
    assert.equal(client.hello.default_model, "smollm2-135m-instruct");
    assert.ok(client.hello.capabilities.messages.includes("generate"));
  });

  test("a wrong or missing token is refused with HTTP 401", async () => {
    for (const token of ["0000", ""]) {
      const err = await connect({ url: daemon.url, token, reconnect: false }).then(
        () => assert.fail("connected with a wrong token"),
        (e) => e,
      );
      assert.ok(err instanceof RefusedError, String(err));
      assert.ok(err instanceof MlxdError);
      assert.equal(err.status, 401);
      assert.equal(err.code, "unauthorized");
      assert.match(err.message, /401/);
    }
  });

  test("an address where nothing listens is a connection error", async () => {
    const err = await connect({ url: "ws://127.0.0.1:9/", token: "x" }).catch((e) => e);
    assert.ok(err instanceof MlxdError);
    assert.equal(err.code, "connection_failed");
    assert.match(err.message, /is the daemon running/);
  });

  test("discovery reads the endpoint and token files of the state directory", async () => {
    const c = await connect({ stateDir: daemon.stateDir });
    try {
      assert.equal(c.url, daemon.url);
      const { tokens } = await c.tokenize("Hello");
      assert.ok(tokens.length >= 1);
    } finally {
      c.close();
    }
  });

  test("the platform WebSocket (Node's experimental global one) works, token in the query", async () => {
    const script = `
      const { connect } = await import(${JSON.stringify(new URL("../dist/index.js", import.meta.url).href)});
      if (typeof WebSocket !== "function") throw new Error("no global WebSocket");
      const c = await connect({ url: process.argv[1], token: process.argv[2], transport: "platform" });
      const r = await c.generate({ prompt: "The capital of France is", max_tokens: 3 }).collect();
      const t = await c.tokenize("Hello world");
      console.log(JSON.stringify({ finish: r.done.finish_reason, n: r.tokens.length, t: t.tokens.length }));
      c.close();`;
    const child = spawn(process.execPath, ["--experimental-websocket", "--no-warnings", "--input-type=module", "-e", script, daemon.url, daemon.token], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    let err = "";
    child.stdout.on("data", (b) => (out += b));
    child.stderr.on("data", (b) => (err += b));
    const code = await new Promise((r) => child.on("exit", r));
    assert.equal(code, 0, err);
    assert.deepEqual(JSON.parse(out), { finish: "length", n: 3, t: 2 });
  });
});

describe("generation", () => {
  test("streams started, tokens and done", async () => {
    const events = [];
    for await (const ev of client.generate(chat("What is the capital of France?", 16))) events.push(ev);
    assert.equal(events[0].type, "started");
    assert.equal(events.at(-1).type, "done");
    const tokens = events.filter((e) => e.type === "token");
    assert.ok(tokens.length >= 2);
    const text = tokens.map((e) => e.text).join("");
    assert.match(text, /Paris/);
    const done = events.at(-1);
    assert.equal(done.finish_reason, "stop");
    assert.equal(done.usage.completion_tokens, tokens.flatMap((e) => e.tokens).length);
    assert.ok(done.timings.time_to_first_token_ms > 0);
    assert.ok(events.every((e) => e.id === events[0].id));
  });

  test("multiplexes two generations on one connection", async () => {
    const a = { prompt: "Once upon a time", max_tokens: 8 };
    const b = { prompt: "The three primary colors are", max_tokens: 8 };
    const alone = await client.generate(a).collect();
    const order = [];
    const run = async (req, tag) => {
      let text = "";
      for await (const ev of client.generate(req)) {
        order.push(`${tag}:${ev.type}`);
        if (ev.type === "token") text += ev.text;
      }
      return text;
    };
    const [ta, tb] = await Promise.all([run(a, "a"), run(b, "b")]);
    assert.equal(ta, alone.text, "greedy output is the same alone and multiplexed");
    assert.ok(tb.length > 0);
    // Both were running at once: each got a token before the other finished.
    const firstDone = Math.min(order.indexOf("a:done"), order.indexOf("b:done"));
    assert.ok(order.slice(0, firstDone).includes("a:token") && order.slice(0, firstDone).includes("b:token"), order.join(" "));
  });

  test("an AbortSignal cancels on the daemon: finish_reason cancelled, promptly", async () => {
    const ac = new AbortController();
    const gen = client.generate(chat("Write a long story about a dragon.", 400), { signal: ac.signal });
    let aborted = 0;
    let after = 0;
    let done;
    for await (const ev of gen) {
      if (ev.type === "token") {
        if (aborted) after++;
        else {
          aborted = performance.now();
          ac.abort();
        }
      }
      if (ev.type === "done") done = ev;
    }
    const ms = performance.now() - aborted;
    assert.equal(done.finish_reason, "cancelled");
    assert.ok(after < 10, `${after} tokens after the abort`);
    assert.ok(ms < 3000, `done ${ms} ms after the abort`);
    assert.ok(done.usage.completion_tokens < 20);
    await idle();
  });

  test("leaving a for-await loop early cancels the generation", async () => {
    const before = (await client.status()).resident_models[0].tokens;
    for await (const ev of client.generate(chat("Write a long story about a castle.", 400))) {
      if (ev.type === "token") break;
    }
    await idle();
    const spent = (await client.status()).resident_models[0].tokens - before;
    assert.ok(spent < 40, `${spent} tokens generated after the break`);
  });

  test("a signal aborted before sending rejects without reaching the daemon", async () => {
    const ac = new AbortController();
    ac.abort(new Error("never mind"));
    const err = await client.generate({ prompt: "Hi", max_tokens: 2 }, { signal: ac.signal }).collect().catch((e) => e);
    assert.equal(err.message, "never mind");
    const err2 = await client.tokenize("Hi", { signal: ac.signal }).catch((e) => e);
    assert.equal(err2.message, "never mind");
  });

  test("sampling, stop strings and logprobs pass through", async () => {
    const r = await client
      .generate({ prompt: "Count: 1, 2, 3,", max_tokens: 12, stop: [" 6"], logprobs: 2, sampling: { temperature: 0.7, top_p: 0.9, seed: 7 } })
      .collect();
    assert.ok(["stop", "length"].includes(r.done.finish_reason));
    assert.ok(!r.text.includes(" 6"));
    const again = await client
      .generate({ prompt: "Count: 1, 2, 3,", max_tokens: 12, stop: [" 6"], logprobs: 2, sampling: { temperature: 0.7, top_p: 0.9, seed: 7 } })
      .collect();
    assert.equal(again.text, r.text, "a seed makes sampling reproducible");
  });
});

describe("errors", () => {
  test("a bad sampling value is a RequestError naming the field", async () => {
    for (const [sampling, field] of [
      [{ top_p: 1.5 }, "top_p"],
      [{ temperature: -1 }, "temperature"],
      [{ colour: 1 }, "colour"],
    ]) {
      const err = await client.generate({ prompt: "hi", max_tokens: 2, sampling }).collect().catch((e) => e);
      assert.ok(err instanceof RequestError, String(err));
      assert.equal(err.code, "invalid_request");
      assert.ok(err.message.includes(field), err.message);
      assert.ok(err.detail.includes(field));
      assert.match(err.id, /^g\d+$/);
    }
  });

  test("unknown models and plugins carry their codes; the connection survives", async () => {
    const e1 = await client.generate({ model: "nope", prompt: "hi" }).collect().catch((e) => e);
    assert.equal(e1.code, "unknown_model");
    const e2 = await client.tokenize("hi", { model: "nope" }).catch((e) => e);
    assert.equal(e2.code, "unknown_model");
    const e3 = await client.generate({ prompt: "hi", max_tokens: 2, plugins: [{ name: "no-such-plugin" }] }).collect().catch((e) => e);
    assert.equal(e3.code, "plugin_error");
    assert.match(e3.message, /no-such-plugin/);
    const e4 = await client.load("nope").catch((e) => e);
    assert.equal(e4.code, "unknown_model");
    assert.equal((await client.generate({ prompt: "Hello", max_tokens: 2 }).collect()).tokens.length, 2);
  });

  test("a message over the daemon's frame limit fails alone, without closing the connection", async () => {
    const big = "x".repeat(client.hello.capabilities.max_frame_bytes + 1);
    const err = await client.generate({ prompt: big, max_tokens: 1 }).collect().catch((e) => e);
    assert.ok(err instanceof RequestError);
    assert.equal(err.code, "frame_too_large");
    await assert.rejects(client.tokenize(big), { code: "frame_too_large" });
    assert.equal(client.state, "open");
    assert.equal((await client.tokenize("ok")).tokens.length, 1);
  });

  test("close() fails in-flight requests with a DisconnectedError", async () => {
    const c = await connect({ url: daemon.url, token: daemon.token });
    const gen = c.generate(chat("Write a long story about the sea.", 200));
    const first = await gen.next();
    assert.equal(first.value.type, "started");
    c.close();
    const err = await gen.collect().catch((e) => e);
    assert.ok(err instanceof DisconnectedError, String(err));
    assert.equal(err.code, "disconnected");
    assert.equal(c.state, "closed");
    await assert.rejects(c.status(), DisconnectedError);
    await idle();
  });
});

describe("requests", () => {
  test("tokenize / detokenize round trip", async () => {
    const t = await client.tokenize("Hello world");
    assert.equal(t.model, "smollm2-135m-instruct");
    assert.ok(t.tokens.length >= 2);
    const d = await client.detokenize(t.tokens);
    assert.equal(d.text, "Hello world");
    const special = await client.tokenize("<|endoftext|>");
    assert.equal(special.tokens.length, 1, "special tokens are matched in text");
  });

  test("models, status, plugins, load and unload", async () => {
    const m = await client.models();
    const def = m.models.find((x) => x.default);
    assert.equal(def.name, "smollm2-135m-instruct");
    assert.equal(def.loaded, true);
    const s = await client.status();
    assert.ok(s.requests_total > 0);
    assert.equal(s.runtime.backend, "cpu");
    assert.ok(s.resident_models[0].requests >= 1);
    const p = await client.plugins();
    assert.ok(Array.isArray(p.plugins) && Array.isArray(p.dirs));
    const u = await client.unload(def.name);
    assert.deepEqual(u, { model: def.name, unloaded: true });
    assert.equal((await client.models()).models.find((x) => x.default).loaded, false);
    const l = await client.load(def.name);
    assert.equal(l.loaded, true);
    assert.equal(typeof l.ms, "number");
  });

  test("many requests multiplexed at once resolve to their own answers", async () => {
    const words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"];
    const results = await Promise.all(words.map((w) => client.tokenize(w).then((t) => client.detokenize(t.tokens))));
    assert.deepEqual(results.map((r) => r.text), words);
  });
});
