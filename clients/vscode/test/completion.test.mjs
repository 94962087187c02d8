// The completion engine (no `vscode` import) against a live daemon.

import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { after, before, describe, test } from "node:test";
import { connect } from "@mlxd/client";
import { startDaemon } from "../../typescript/test/daemon.js";

const require = createRequire(import.meta.url);
const { buildPrompt, postprocess, detectFim, CompletionEngine, DEFAULT_SETTINGS, FIM_FORMATS } = require("../dist/completion.js");

const starcoder = FIM_FORMATS.find((f) => f.name === "starcoder");

describe("prompt construction", () => {
  test("fill-in-the-middle: prefix, suffix, middle markers; markers and end-of-text stop", () => {
    const p = buildPrompt({ prefix: "def add(a, b):\n    ", suffix: "\n\nprint(add(1, 2))\n" }, starcoder);
    assert.equal(p.mode, "fim");
    assert.equal(p.prompt, "<fim_prefix>def add(a, b):\n    <fim_suffix>\n\nprint(add(1, 2))\n<fim_middle>");
    assert.equal(p.singleLine, false);
    assert.deepEqual(p.stop.slice(0, 4), ["\n\n", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"]);
    assert.ok(p.stop.includes("<|endoftext|>"));
    const qwen = buildPrompt({ prefix: "a", suffix: "b" }, FIM_FORMATS.find((f) => f.name === "qwen"));
    assert.equal(qwen.prompt, "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>");
  });

  test("prefix-only without FIM tokens; code after the cursor asks for the rest of the line only", () => {
    const p = buildPrompt({ prefix: "x = [1, 2", suffix: "]\nprint(x)\n" }, null);
    assert.equal(p.mode, "prefix");
    assert.equal(p.prompt, "x = [1, 2");
    assert.equal(p.singleLine, true);
    assert.equal(p.stop[0], "\n");
    assert.ok(p.stop.includes("```"));
    assert.ok(p.stop.length <= 16 && p.stop.every((s) => s.length >= 1 && s.length <= 256));
  });

  test("context is clipped to the configured sizes, nearest the cursor", () => {
    const p = buildPrompt({ prefix: "a".repeat(50) + "TAIL", suffix: "HEAD" + "b".repeat(50) }, starcoder, { maxPrefixChars: 10, maxSuffixChars: 8 });
    assert.equal(p.prompt, `<fim_prefix>aaaaaaTAIL<fim_suffix>HEADbbbb<fim_middle>`);
  });

  test("postprocess: trailing space, typed indentation, code repeated from after the cursor", () => {
    assert.equal(postprocess(" return a + b\n\n", { prefix: "", suffix: "" }), " return a + b");
    // BPE puts the blank in front of the word: no doubled space after typed indentation.
    assert.equal(postprocess(" return a + b", { prefix: "def add(a, b):\n    ", suffix: "" }), "return a + b");
    assert.equal(postprocess(" 5", { prefix: "x = ", suffix: "" }), "5");
    // Starting on the next line after typed indentation: moved up to the cursor's line.
    assert.equal(postprocess("\n    with open(p) as f:", { prefix: "def f(p):\n    ", suffix: "" }), "with open(p) as f:");
    // The rest of the line, or the next line (a closing brace), is not typed twice.
    assert.equal(postprocess(", 3, 4]", { prefix: "x = [1, 2", suffix: "]\n" }), ", 3, 4");
    assert.equal(postprocess("return 1;\n}", { prefix: "function f() {\n  ", suffix: "\n}\n" }), "return 1;");
  });

  test("FIM detection: markers that encode to single ids", async () => {
    const ids = new Map([["<|fim_prefix|>", 151659], ["<|fim_suffix|>", 151661], ["<|fim_middle|>", 151660]]);
    const fake = { tokenize: async (t) => ({ model: "m", tokens: ids.has(t) ? [ids.get(t)] : [1, 2, 3] }), generate() {} };
    assert.equal((await detectFim(fake)).name, "qwen");
    const none = { tokenize: async () => ({ model: "m", tokens: [5, 6] }), generate() {} };
    assert.equal(await detectFim(none), null);
  });
});

describe("live daemon", () => {
  /** @type {Awaited<ReturnType<typeof startDaemon>>} */
  let daemon;
  let client;
  before(async () => {
    daemon = await startDaemon();
    client = await connect({ url: daemon.url, token: daemon.token });
  });
  after(async () => {
    client?.close();
    await daemon?.dispose();
  });

  /** An engine whose generate calls and events are recorded. */
  function engine(overrides = {}) {
    const events = [];
    const calls = [];
    const counting = {
      generate: (req, opts) => {
        calls.push(req);
        return client.generate(req, opts);
      },
      tokenize: (t, o) => client.tokenize(t, o),
    };
    const e = new CompletionEngine({
      client: async () => counting,
      settings: () => ({ ...DEFAULT_SETTINGS, debounceMs: 30, maxTokens: 24, ...overrides }),
      onEvent: (ev) => events.push(ev),
    });
    return { e, events, calls };
  }
  const waitFor = async (pred, what) => {
    for (let i = 0; i < 600; i++) {
      if (pred()) return;
      await new Promise((r) => setTimeout(r, 10));
    }
    assert.fail(`timed out waiting for ${what}`);
  };
  /** The daemon's running count for the model, once it is 0 (the gauge may trail the done event). */
  const running = async () => {
    let n = -1;
    for (let i = 0; i < 100 && n !== 0; i++) {
      n = (await client.status()).resident_models[0]?.running ?? 0;
      if (n) await new Promise((r) => setTimeout(r, 20));
    }
    return n;
  };

  test("SmolLM2's tokenizer has no FIM tokens: prefix-only", async () => {
    assert.equal(await detectFim(client), null);
    assert.equal((await client.tokenize("<fim_prefix>")).tokens.length > 1, true);
  });

  test("a completion returns code", async () => {
    const { e, calls } = engine();
    const r = await e.complete({ prefix: "def add(a, b):\n    ", suffix: "\n" });
    assert.ok(r, "a completion");
    assert.equal(r.mode, "prefix");
    assert.match(r.text, /^return a \+ b/);
    assert.equal(calls.length, 1);
    assert.equal(calls[0].prompt, "def add(a, b):\n    ");
    assert.equal(calls[0].max_tokens, 24);
  });

  test("debounce: a burst of keystrokes reaches the daemon once", async () => {
    const { e, calls, events } = engine({ debounceMs: 150 });
    const before = (await client.status()).resident_models[0].requests;
    const prefixes = ["def mul(a, b):\n", "def mul(a, b):\n ", "def mul(a, b):\n   ", "def mul(a, b):\n    "];
    const results = [];
    for (const p of prefixes) {
      results.push(e.complete({ prefix: p, suffix: "" }));
      await new Promise((r) => setTimeout(r, 20));
    }
    const out = await Promise.all(results);
    assert.deepEqual(out.slice(0, 3), [undefined, undefined, undefined]);
    assert.ok(out[3]?.text, "the last keystroke gets a completion");
    assert.equal(calls.length, 1);
    assert.equal(events.filter((x) => x.type === "debounced").length, 3);
    const afterwards = (await client.status()).resident_models[0].requests;
    assert.equal(afterwards - before, 1, "one generation ran on the daemon");
  });

  test("a newer request cancels the stale one on the daemon", async () => {
    const { e, events } = engine({ maxTokens: 300, debounceMs: 0 });
    const stale = e.complete({ prefix: "The following is a very long essay about the history of Rome. Rome was", suffix: "" });
    await waitFor(() => events.some((x) => x.type === "token" && x.seq === 1), "the stale request's first token");
    const fresh = e.complete({ prefix: "def add(a, b):\n    ", suffix: "\n" });
    assert.equal(await stale, undefined);
    const doneStale = events.find((x) => x.type === "done" && x.seq === 1);
    assert.equal(doneStale.finishReason, "cancelled");
    assert.ok(doneStale.completionTokens < 50, `${doneStale.completionTokens} tokens`);
    const r = await fresh;
    assert.match(r.text, /return/);
    assert.equal(await running(), 0);
  });

  test("a document change and VS Code's cancellation token stop the generation", async () => {
    const { e, events } = engine({ maxTokens: 300, debounceMs: 0 });
    const longPrefix = "Once upon a time, in a kingdom far away, there lived";
    const p1 = e.complete({ prefix: longPrefix, suffix: "" }, undefined, "file:///a.py");
    await waitFor(() => events.some((x) => x.type === "token" && x.seq === 1), "first token");
    e.cancelPending("file:///other.py"); // another document: no effect
    e.cancelPending("file:///a.py");
    assert.equal(await p1, undefined);
    assert.equal(events.find((x) => x.type === "done" && x.seq === 1).finishReason, "cancelled");

    let fire;
    const token = {
      isCancellationRequested: false,
      onCancellationRequested(l) {
        fire = () => {
          token.isCancellationRequested = true;
          l();
        };
        return { dispose() {} };
      },
    };
    const p2 = e.complete({ prefix: longPrefix, suffix: "" }, token);
    await waitFor(() => events.some((x) => x.type === "token" && x.seq === 2), "first token");
    fire();
    assert.equal(await p2, undefined);
    assert.equal(events.find((x) => x.type === "done" && x.seq === 2).finishReason, "cancelled");
    assert.equal(await running(), 0);
  });

  test("cancelled during the debounce: nothing reaches the daemon", async () => {
    const { e, calls } = engine({ debounceMs: 200 });
    const p = e.complete({ prefix: "x = ", suffix: "" }, undefined, "file:///b.py");
    setTimeout(() => e.cancelPending("file:///b.py"), 20);
    assert.equal(await p, undefined);
    assert.equal(calls.length, 0);
  });
});
