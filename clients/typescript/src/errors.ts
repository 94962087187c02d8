import type { ErrorCode } from "./protocol.js";

/**
 * Base class of every error this package throws. `code` is the daemon's stable error code for
 * errors the daemon reported, or one of this client's own codes (`connection_failed`,
 * `unauthorized`, `origin_not_allowed`, `refused`, `disconnected`, `protocol_mismatch`,
 * `config`).
 */
export class MlxdError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "MlxdError";
    this.code = code;
  }
}

/** The daemon answered a request with an `error` event. */
export class RequestError extends MlxdError {
  declare readonly code: ErrorCode;
  /** The request id the error names, when the daemon could read it. */
  readonly id: string | undefined;
  /** The daemon's message without the code prefix (it names the offending field or file). */
  readonly detail: string;
  constructor(code: ErrorCode, message: string, id?: string) {
    super(code, `${code}: ${message}`);
    this.name = "RequestError";
    this.id = id;
    this.detail = message;
  }
}

/**
 * The daemon refused the WebSocket handshake: HTTP 401 (missing or wrong token, `code`
 * `unauthorized`), 403 (browser origin not allowed, `origin_not_allowed`) or 503 (too many
 * connections).
 */
export class RefusedError extends MlxdError {
  readonly status: number;
  readonly body: string;
  constructor(status: number, code: string, message: string, body: string) {
    super(code, message);
    this.name = "RefusedError";
    this.status = status;
    this.body = body;
  }
}

/** The daemon could not be reached (not running, wrong address, handshake timed out). */
export class ConnectionError extends MlxdError {
  readonly url: string;
  constructor(url: string, reason: string, options?: { cause?: unknown }) {
    super("connection_failed", `cannot reach mlxd at ${url}: ${reason} (is the daemon running? start it with \`mlxd serve\`)`, options);
    this.name = "ConnectionError";
    this.url = url;
  }
}

/** The connection closed while a request was in flight, or the client was closed. */
export class DisconnectedError extends MlxdError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("disconnected", message, options);
    this.name = "DisconnectedError";
  }
}

/** The daemon speaks another protocol version, or sent something this client cannot read. */
export class ProtocolError extends MlxdError {
  constructor(message: string) {
    super("protocol_mismatch", message);
    this.name = "ProtocolError";
  }
}

/** Local configuration problem: unreadable token file, bad URL, discovery outside Node. */
export class ConfigError extends MlxdError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("config", message, options);
    this.name = "ConfigError";
  }
}

/** The error an aborted signal carries (its `reason`), or a standard AbortError. */
export function abortReason(signal: AbortSignal): unknown {
  if (signal.reason !== undefined) return signal.reason;
  const e = new Error("the operation was aborted");
  e.name = "AbortError";
  return e;
}
