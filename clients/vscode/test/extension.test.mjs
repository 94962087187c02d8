// The extension's VS Code glue with the `vscode` module stubbed, against a live daemon found by
// discovery (MLXD_STATE_DIR), the way the extension finds it in an editor.

import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { after, before, test } from "node:test";
import { connect } from "@mlxd/client";
import { startDaemon } from "../../typescript/test/daemon.js";

const require = createRequire(import.meta.url);
const { install } = require("./vscode-stub.cjs");

let daemon;
let stub;
let extension;
const context = { subscriptions: [] };

before(async () => {
  daemon = await startDaemon();
  process.env.MLXD_STATE_DIR = daemon.stateDir; // the endpoint and token files
  delete process.env.MLXD_URL;
  delete process.env.MLXD_TOKEN;
  stub = install();
  extension = require("../dist/extension.js");
  stub.config.set("mlxd.inlineCompletions.debounceMs", 20);
  stub.config.set("mlxd.maxTokens", 24);
  extension.activate(context);
});

after(async () => {
  extension?.deactivate();
  for (const d of context.subscriptions) d.dispose();
  stub?.uninstall();
  await daemon?.dispose();
});

test("activation registers the provider and the commands", () => {
  assert.equal(stub.registered.inlineProviders.length, 1);
  assert.deepEqual(stub.registered.inlineProviders[0].selector, { pattern: "**" });
  assert.ok(stub.registered.commands.has("mlxd.chat"));
  assert.ok(stub.registered.commands.has("mlxd.newChat"));
});

test("the inline provider completes at the cursor with the discovered daemon", async () => {
  const { provider } = stub.registered.inlineProviders[0];
  const text = "def add(a, b):\n    \n";
  const doc = stub.document(text);
  const pos = new stub.vscode.Position(1, 4);
  const source = new stub.vscode.CancellationTokenSource();
  const items = await provider.provideInlineCompletionItems(doc, pos, {}, source.token);
  assert.equal(items.length, 1);
  assert.match(items[0].insertText, /return/);
  assert.deepEqual(items[0].range.start, pos);
  assert.match(stub.outputs.get("mlxd").text, /connected: ws:\/\/127\.0\.0\.1:\d+\//);
});

test("a document change cancels the completion in flight", async () => {
  stub.config.set("mlxd.maxTokens", 300);
  const { provider } = stub.registered.inlineProviders[0];
  const doc = stub.document("The following is a very long essay about the history of Rome. Rome was", "file:///essay.txt");
  const pos = doc.positionAt(1e9);
  const source = new stub.vscode.CancellationTokenSource();
  const started = Date.now();
  const pending = provider.provideInlineCompletionItems(doc, pos, {}, source.token);
  await new Promise((r) => setTimeout(r, 1500)); // debounce, FIM detection cached, generating
  for (const l of stub.registered.changeListeners) l({ document: doc, contentChanges: [{ text: "x" }] });
  assert.equal(await pending, undefined);
  assert.ok(Date.now() - started < 5000);
  // The daemon stopped generating (checked over a connection of our own).
  const probe = await connect({ url: daemon.url, token: daemon.token });
  try {
    let running = -1;
    for (let i = 0; i < 100 && running !== 0; i++) {
      running = (await probe.status()).resident_models[0].running;
      if (running) await new Promise((r) => setTimeout(r, 20));
    }
    assert.equal(running, 0);
  } finally {
    probe.close();
  }
  stub.config.set("mlxd.maxTokens", 24);
});

test("disabled completions return nothing", async () => {
  stub.config.set("mlxd.inlineCompletions.enabled", false);
  const { provider } = stub.registered.inlineProviders[0];
  const doc = stub.document("x = ");
  assert.equal(await provider.provideInlineCompletionItems(doc, doc.positionAt(4), {}, new stub.vscode.CancellationTokenSource().token), undefined);
  stub.config.set("mlxd.inlineCompletions.enabled", true);
});

test("mlxd.chat streams the answer into the chat output channel and keeps the history", async () => {
  stub.config.set("mlxd.chat.maxTokens", 24);
  stub.inputAnswers.push("What is the capital of France?");
  const a = await stub.vscode.commands.executeCommand("mlxd.chat");
  assert.equal(a.finishReason, "stop");
  const out = stub.outputs.get("mlxd chat");
  assert.ok(out.shown);
  assert.match(out.text, /> What is the capital of France\?/);
  assert.match(out.text, /Paris/);
  assert.match(out.text, /tokens, [\d.]+ tok\/s\]/);
  // A follow-up, passed as the command's argument, goes with the conversation so far.
  const b = await stub.vscode.commands.executeCommand("mlxd.chat", "And of Italy? One word.");
  assert.ok(b.text.length > 0);
  assert.deepEqual(stub.errors, []);
});

test("cancelling the chat's progress notification stops the answer", async () => {
  stub.config.set("mlxd.chat.maxTokens", 300);
  const pending = stub.vscode.commands.executeCommand("mlxd.chat", "Write a long story about a dragon.");
  const out = stub.outputs.get("mlxd chat");
  const before = out.text.length;
  for (let i = 0; i < 500 && out.text.length <= before; i++) await new Promise((r) => setTimeout(r, 10)); // a token arrived
  stub.vscode.window.lastProgress.cancel();
  const a = await pending;
  assert.equal(a.finishReason, "cancelled");
  assert.ok(a.completionTokens < 50);
  assert.match(out.text, /\(cancelled\)\]/);
});

test("sampling and plugin settings reach the daemon (its errors name them)", async () => {
  stub.config.set("mlxd.chat.maxTokens", 4);
  stub.config.set("mlxd.sampling", { top_p: 1.5 });
  assert.equal(await stub.vscode.commands.executeCommand("mlxd.chat", "Hi"), undefined);
  assert.match(stub.errors.at(-1), /invalid_request: `sampling\.top_p`/);
  stub.config.set("mlxd.sampling", { top_p: 0.9, seed: 1 });
  stub.config.set("mlxd.temperature", 0.5);
  stub.config.set("mlxd.plugins", [{ name: "no-such-plugin", params: {} }]);
  assert.equal(await stub.vscode.commands.executeCommand("mlxd.chat", "Hi"), undefined);
  assert.match(stub.errors.at(-1), /plugin_error: .*no-such-plugin/);
  stub.config.set("mlxd.plugins", []);
  const a = await stub.vscode.commands.executeCommand("mlxd.chat", "Hi");
  assert.equal(a.completionTokens, 4);
  assert.match(stub.outputs.get("mlxd chat").text, /\[error\] plugin_error/);
});
