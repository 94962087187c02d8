/**
 * Opening one WebSocket to the daemon and waiting for its `hello`, with either the platform
 * `WebSocket` (browsers, Deno, Node >= 22) or the `ws` package (Node without a global
 * `WebSocket`).
 *
 * The platform WebSocket cannot set headers, so the token travels as the `?token=` query
 * parameter the daemon accepts; it also cannot see the HTTP status of a refused handshake. With
 * `ws` the token is an `Authorization: Bearer` header and a refusal becomes a `RefusedError`
 * carrying the status (401, 403, 503) and the daemon's JSON body.
 */

import { ConnectionError, MlxdError, ProtocolError, RefusedError } from "./errors.js";
import type { HelloEvent, ServerMessage } from "./protocol.js";

/** The standard (browser) WebSocket API this client uses. */
export interface PlatformWebSocket {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: string, listener: (ev: any) => void): void;
}

/** A constructor of the standard WebSocket API (e.g. `globalThis.WebSocket`). */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => PlatformWebSocket;

/** Which WebSocket implementation to use. */
export type Transport = "auto" | "platform" | "ws";

/** An open connection. */
export interface Socket {
  send(text: string): void;
  close(): void;
}

/** How a connection ended. */
export interface CloseInfo {
  code: number;
  reason: string;
  error?: unknown;
}

export interface OpenOptions {
  url: string;
  token?: string;
  transport: Transport;
  WebSocket?: WebSocketConstructor;
  /** Handshake plus `hello`. */
  timeoutMs: number;
  onMessage(socket: Socket, message: ServerMessage): void;
  onClose(socket: Socket, info: CloseInfo): void;
}

function platformWebSocket(options: OpenOptions): WebSocketConstructor | undefined {
  return options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
}

function parse(text: string): ServerMessage | undefined {
  try {
    const v = JSON.parse(text);
    return v && typeof v === "object" && typeof v.type === "string" ? (v as ServerMessage) : undefined;
  } catch {
    return undefined;
  }
}

function checkHello(m: ServerMessage | undefined, url: string): HelloEvent {
  if (!m || m.type !== "hello") throw new ProtocolError(`${url} did not greet with a hello message; is it mlxd?`);
  if (m.protocol !== 1) {
    throw new ProtocolError(`${url} speaks mlxd protocol ${m.protocol}; this client speaks protocol 1 (update the client or the daemon)`);
  }
  return m;
}

/** Opens a connection and resolves once the daemon's `hello` has arrived. */
export async function openSocket(options: OpenOptions): Promise<{ socket: Socket; hello: HelloEvent }> {
  let url: URL;
  try {
    url = new URL(options.url);
  } catch {
    throw new MlxdError("config", `not a WebSocket URL: ${JSON.stringify(options.url)}`);
  }
  if (url.protocol === "http:") url.protocol = "ws:";
  if (url.protocol === "https:") url.protocol = "wss:";
  if (url.protocol !== "ws:" && url.protocol !== "wss:") {
    throw new MlxdError("config", `not a WebSocket URL: ${options.url} (expected ws://host:port/)`);
  }
  const Platform = platformWebSocket(options);
  const useWs = options.transport === "ws" || (options.transport === "auto" && !Platform);
  if (useWs) return openWithWs(url, options);
  if (!Platform) throw new MlxdError("config", "no WebSocket implementation: this platform has no global WebSocket (use transport \"ws\" on Node)");
  return openWithPlatform(Platform, url, options);
}

/**
 * The part of opening a connection both transports share: wait for the daemon's `hello` (or
 * time out), then hand every message to `options.onMessage`. `abort` closes the transport when
 * the handshake fails.
 */
function handshake(
  shown: string,
  options: OpenOptions,
  socket: Socket,
  abort: () => void,
  resolve: (v: { socket: Socket; hello: HelloEvent }) => void,
  reject: (e: unknown) => void,
) {
  let hello: HelloEvent | undefined;
  let settled = false;
  const fail = (e: unknown) => {
    if (settled) return;
    settled = true;
    clearTimeout(timer);
    abort();
    reject(e);
  };
  const timer = setTimeout(() => fail(new ConnectionError(shown, `no hello within ${options.timeoutMs} ms`)), options.timeoutMs);
  const onText = (text: string) => {
    const m = parse(text);
    if (!hello) {
      try {
        hello = checkHello(m, shown);
      } catch (e) {
        fail(e);
        return;
      }
      settled = true;
      clearTimeout(timer);
      resolve({ socket, hello });
      return;
    }
    if (m) options.onMessage(socket, m);
  };
  const onClose = (code: number, reason: string) => {
    if (!hello) fail(new ConnectionError(shown, `the connection closed before the hello (code ${code})`));
    else options.onClose(socket, { code, reason });
  };
  return { fail, onText, onClose, greeted: () => hello !== undefined };
}

function openWithPlatform(Impl: WebSocketConstructor, url: URL, options: OpenOptions): Promise<{ socket: Socket; hello: HelloEvent }> {
  if (options.token) url.searchParams.set("token", options.token);
  const shown = redact(url);
  return new Promise((resolve, reject) => {
    let ws: PlatformWebSocket;
    try {
      ws = new Impl(url.toString());
    } catch (e) {
      reject(new ConnectionError(shown, (e as Error).message, { cause: e }));
      return;
    }
    const socket: Socket = { send: (t) => ws.send(t), close: () => ws.close(1000) };
    const h = handshake(shown, options, socket, () => { try { ws.close(); } catch { /* already closing */ } }, resolve, reject);
    const fail = h.fail;
    ws.addEventListener("message", (ev: { data: unknown }) => {
      if (typeof ev.data === "string") h.onText(ev.data); // the daemon sends only text frames
    });
    ws.addEventListener("error", () => {
      if (!h.greeted()) {
        fail(new ConnectionError(shown, "the WebSocket handshake failed (the daemon is not running, or it refused the token or this page's origin; the browser does not say which)"));
      }
    });
    ws.addEventListener("close", (ev: { code: number; reason: string }) => h.onClose(ev.code, ev.reason));
  });
}

async function openWithWs(url: URL, options: OpenOptions): Promise<{ socket: Socket; hello: HelloEvent }> {
  let WS: typeof import("ws").default;
  try {
    WS = (await import("ws")).default;
  } catch (e) {
    throw new MlxdError("config", "the `ws` package is not installed and this platform has no global WebSocket", { cause: e });
  }
  const shown = redact(url);
  return new Promise((resolve, reject) => {
    const headers: Record<string, string> = {};
    if (options.token) headers.authorization = `Bearer ${options.token}`;
    const ws = new WS(url.toString(), { headers, handshakeTimeout: options.timeoutMs, perMessageDeflate: false });
    const socket: Socket = { send: (t) => ws.send(t), close: () => ws.close(1000) };
    const h = handshake(shown, options, socket, () => ws.terminate(), resolve, reject);
    const fail = h.fail;
    ws.on("unexpected-response", (req, res) => {
      const chunks: Buffer[] = [];
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("end", () => {
        const body = Buffer.concat(chunks).toString("utf8");
        const status = res.statusCode ?? 0;
        let code = status === 401 ? "unauthorized" : status === 403 ? "origin_not_allowed" : "refused";
        let message = body;
        try {
          const j = JSON.parse(body);
          if (typeof j.error === "string") code = j.error;
          if (typeof j.message === "string") message = j.message;
        } catch { /* not JSON */ }
        const hint = status === 401 ? " (check MLXD_TOKEN or the token file in the daemon's state directory)" : "";
        fail(new RefusedError(status, code, `mlxd at ${shown} refused the connection (HTTP ${status}): ${message || res.statusMessage}${hint}`, body));
        req.destroy();
      });
    });
    ws.on("error", (e: Error) => {
      if (!h.greeted()) fail(new ConnectionError(shown, e.message, { cause: e }));
    });
    ws.on("message", (data, isBinary) => {
      if (!isBinary) h.onText(data.toString());
    });
    ws.on("close", (code: number, reason: Buffer) => h.onClose(code, reason.toString()));
  });
}

/** The URL without its token, for messages. */
function redact(url: URL): string {
  const u = new URL(url.toString());
  if (u.searchParams.has("token")) u.searchParams.set("token", "***");
  return u.toString();
}
