/**
 * `@mlxd/client`: a typed client for mlxd's WebSocket protocol (docs/protocol.md), for Node >= 20
 * and browsers.
 *
 * ```ts
 * import { connect } from "@mlxd/client";
 * const client = await connect(); // finds the daemon and its token (Node)
 * for await (const ev of client.generate({ messages: [{ role: "user", content: "Hi!" }], max_tokens: 40 })) {
 *   if (ev.type === "token") process.stdout.write(ev.text);
 * }
 * client.close();
 * ```
 */

export * from "./protocol.js";
export * from "./errors.js";
export { Generation, type GenerationResult } from "./generation.js";
export {
  Client,
  connect,
  backoffDelay,
  type ConnectOptions,
  type ReconnectOptions,
  type ClientState,
  type ClientEvents,
  type RequestOptions,
} from "./client.js";
export type { Transport, WebSocketConstructor, PlatformWebSocket } from "./transport.js";
export type { Endpoint, DiscoverOptions } from "./discover.js";

/**
 * Finds the daemon's URL and token (Node only): `MLXD_URL` / `MLXD_TOKEN`, else the `endpoint`
 * and `token` files in the state directory (`MLXD_STATE_DIR`, `$XDG_STATE_HOME/mlxd`,
 * `~/.local/state/mlxd`, or `~/Library/Application Support/mlxd` on macOS).
 */
export async function discover(options?: import("./discover.js").DiscoverOptions): Promise<import("./discover.js").Endpoint> {
  return (await import("./discover.js")).discover(options);
}

/** The daemon's default state directory on this machine (Node only). */
export async function defaultStateDir(): Promise<string> {
  return (await import("./discover.js")).defaultStateDir();
}
