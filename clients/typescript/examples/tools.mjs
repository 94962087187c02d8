// Models, status, tokenize / detokenize and two multiplexed generations on one connection.
//
//   node examples/tools.mjs

import { connect, RequestError } from "@mlxd/client";

const client = await connect();
const { models } = await client.models();
console.log("models:", models.map((m) => `${m.name}${m.default ? " (default)" : ""}${m.loaded ? " [loaded]" : ""}`).join(", "));

const { tokens } = await client.tokenize("Hello world");
console.log("tokens:", tokens, "->", JSON.stringify((await client.detokenize(tokens)).text));

// Two generations at once; each event names its request.
const [a, b] = await Promise.all([
  client.generate({ prompt: "Once upon a time", max_tokens: 12 }).collect(),
  client.generate({ prompt: "The three primary colors are", max_tokens: 12, sampling: { temperature: 0.8, seed: 3 } }).collect(),
]);
console.log("a:", JSON.stringify(a.text), a.done.finish_reason);
console.log("b:", JSON.stringify(b.text), b.done.finish_reason);

// Errors carry the daemon's code and name the offending field.
try {
  await client.generate({ prompt: "hi", sampling: { top_p: 1.5 } }).collect();
} catch (e) {
  if (e instanceof RequestError) console.log("error:", e.code, "-", e.detail);
}

const s = await client.status();
console.log("status:", s.server, `${s.resident_models.length} resident model(s), backend ${s.runtime.backend}`);
client.close();
