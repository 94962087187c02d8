// Streams one answer from a running mlxd (found like the CLI finds it: MLXD_URL / MLXD_TOKEN, or
// the daemon's state directory). Ctrl-C cancels the generation on the daemon.
//
//   node examples/stream.mjs "What is the capital of France?"

import { connect } from "@mlxd/client";

const question = process.argv[2] ?? "What is the capital of France?";
const client = await connect();
console.error(`connected to ${client.hello.server} at ${client.url}, model ${client.hello.default_model}`);

const stop = new AbortController();
process.once("SIGINT", () => stop.abort());

for await (const ev of client.generate({ messages: [{ role: "user", content: question }], max_tokens: 200 }, { signal: stop.signal })) {
  if (ev.type === "token") process.stdout.write(ev.text);
  if (ev.type === "done") console.error(`\n[${ev.finish_reason}: ${ev.usage.completion_tokens} tokens, ${ev.timings.tokens_per_second.toFixed(1)} tok/s]`);
}
client.close();
