import { ConfigError, DisconnectedError, ProtocolError, RequestError, abortReason } from "./errors.js";
import { Generation } from "./generation.js";
import type {
  ClientMessage,
  DetokenizeResult,
  GenerateRequest,
  HelloEvent,
  LoadResult,
  ModelsResult,
  PluginsResult,
  ServerMessage,
  StatusResult,
  TokenizeResult,
  UnloadResult,
} from "./protocol.js";
import { openSocket, type CloseInfo, type Socket, type Transport, type WebSocketConstructor } from "./transport.js";

/** Reconnection after a connection that was open drops (daemon restart, network). */
export interface ReconnectOptions {
  /** The first delay (default 250 ms). */
  initialDelayMs?: number;
  /** The cap on the delay (default 10 000 ms). */
  maxDelayMs?: number;
  /** Growth per failed attempt (default 2). */
  factor?: number;
  /**
   * Fraction of each delay that is random (default 0.5: a delay d becomes uniform in
   * [d/2, d]), so that many clients do not retry in lockstep.
   */
  jitter?: number;
  /** Give up after this many failed attempts in a row (default: never). */
  maxAttempts?: number;
}

export interface ConnectOptions {
  /** `ws://host:port/`; discovered (Node only) when absent. */
  url?: string;
  /** The daemon's bearer token; discovered (Node only) when absent. */
  token?: string;
  /** Discover from this state directory instead of `MLXD_STATE_DIR` / the platform default. */
  stateDir?: string;
  /**
   * Reconnect with jittered exponential backoff when an open connection drops (default true).
   * URL and token that were discovered are discovered again before every attempt, so a daemon
   * restarted on another port is found.
   */
  reconnect?: boolean | ReconnectOptions;
  /** `auto` (default): the platform WebSocket where there is one, `ws` otherwise. */
  transport?: Transport;
  /** A WebSocket constructor with the standard API to use instead of the global one. */
  WebSocket?: WebSocketConstructor;
  /** How long the handshake and the daemon's `hello` may take (default 10 000 ms). */
  connectTimeoutMs?: number;
}

/** Where a client stands. */
export type ClientState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

/** What `on` can listen to. */
export interface ClientEvents {
  /** A connection opened (first or after a reconnect). */
  open: HelloEvent;
  /** An open connection dropped; in-flight requests failed with this error. */
  disconnect: DisconnectedError;
  /** A reconnect attempt is scheduled. */
  reconnecting: { attempt: number; delayMs: number; error?: unknown };
  /** The client is closed for good (by `close()`, or reconnecting gave up). */
  close: { error?: unknown };
  /** A daemon error that names no running request (e.g. `frame_too_large`). */
  error: RequestError;
}

interface Route {
  onMessage(m: ServerMessage): void;
  onDisconnect(e: DisconnectedError): void;
}

interface Waiter {
  resolve(s: Socket): void;
  reject(e: unknown): void;
}

/** Per-request options. */
export interface RequestOptions {
  /**
   * Aborts the request. For a generation that reached the daemon this sends `cancel` and the
   * stream ends with `finish_reason: "cancelled"`; otherwise the promise / iterator rejects with
   * the signal's reason.
   */
  signal?: AbortSignal;
}

/** The delay before reconnect attempt `attempt` (0-based). */
export function backoffDelay(attempt: number, options: ReconnectOptions = {}, random: () => number = Math.random): number {
  const initial = options.initialDelayMs ?? 250;
  const max = options.maxDelayMs ?? 10_000;
  const factor = options.factor ?? 2;
  const jitter = Math.min(1, Math.max(0, options.jitter ?? 0.5));
  const capped = Math.min(max, initial * Math.pow(factor, Math.min(attempt, 64)));
  return Math.round(capped * (1 - jitter + jitter * random()));
}

function isNode(): boolean {
  return typeof process !== "undefined" && !!process.versions?.node;
}

/**
 * A connection to mlxd that multiplexes any number of requests by id and reconnects when the
 * connection drops. Create with {@link connect} (or `new Client(options)`, which connects on
 * the first request).
 */
export class Client {
  readonly options: Readonly<ConnectOptions>;
  #state: ClientState = "idle";
  #socket: Socket | undefined;
  #hello: HelloEvent | undefined;
  #url = "";
  #routes = new Map<string, Route>();
  #waiters = new Set<Waiter>();
  #nextId = 1;
  #opening: Promise<void> | undefined;
  #attempt = 0;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #closedError: unknown;
  #lastServerError: RequestError | undefined;
  #listeners = new Map<keyof ClientEvents, Set<(v: any) => void>>();

  constructor(options: ConnectOptions = {}) {
    this.options = { ...options };
  }

  /** The `hello` of the current (or last) connection. */
  get hello(): HelloEvent | undefined {
    return this.#hello;
  }

  get state(): ClientState {
    return this.#state;
  }

  /** The URL of the current (or last) connection. */
  get url(): string {
    return this.#url;
  }

  /** Listens to a client event; returns a function that stops listening. */
  on<K extends keyof ClientEvents>(event: K, listener: (value: ClientEvents[K]) => void): () => void {
    let set = this.#listeners.get(event);
    if (!set) this.#listeners.set(event, (set = new Set()));
    set.add(listener);
    return () => set!.delete(listener);
  }

  #emit<K extends keyof ClientEvents>(event: K, value: ClientEvents[K]): void {
    for (const l of this.#listeners.get(event) ?? []) {
      try {
        l(value);
      } catch {
        /* a listener's failure is not the client's */
      }
    }
  }

  #reconnectOptions(): ReconnectOptions | undefined {
    const r = this.options.reconnect ?? true;
    if (r === false) return undefined;
    return r === true ? {} : r;
  }

  /** Connects (if not connected) and resolves once the daemon's `hello` arrived. */
  open(): Promise<void> {
    if (this.#state === "open") return Promise.resolve();
    if (this.#state === "closed") return Promise.reject(this.#closedError ?? new DisconnectedError("the mlxd client is closed"));
    if (this.#state === "reconnecting") return this.#whenOpen().then(() => undefined);
    if (!this.#opening) {
      this.#state = "connecting";
      this.#opening = this.#connectOnce().then(
        () => {
          this.#opening = undefined;
        },
        (e) => {
          this.#opening = undefined;
          if (this.#state === "connecting") this.#state = "idle"; // the next request tries again
          this.#rejectWaiters(e);
          throw e;
        },
      );
    }
    return this.#opening;
  }

  async #endpoint(): Promise<{ url: string; token?: string }> {
    const { url, token } = this.options;
    if (url !== undefined && token !== undefined) return { url, token: token || undefined };
    if (!isNode()) {
      if (url !== undefined) return { url, token: token || undefined };
      throw new ConfigError("discovery of the daemon's address needs Node; pass `url` and `token` to connect()");
    }
    const { discover } = await import("./discover.js");
    const found = await discover({ stateDir: this.options.stateDir });
    return { url: url ?? found.url, token: token ?? found.token };
  }

  async #connectOnce(): Promise<void> {
    const ep = await this.#endpoint();
    this.#url = ep.url;
    // Events that arrive after the hello but before this connection is adopted (the same
    // network read can carry a close frame) are replayed once it is.
    let early: (() => void)[] | undefined = [];
    const later = (f: () => void) => (early ? early.push(f) : f());
    const { socket, hello } = await openSocket({
      url: ep.url,
      token: ep.token,
      transport: this.options.transport ?? "auto",
      WebSocket: this.options.WebSocket,
      timeoutMs: this.options.connectTimeoutMs ?? 10_000,
      onMessage: (s, m) => later(() => this.#dispatch(s, m)),
      onClose: (s, info) => later(() => this.#onClose(s, info)),
    });
    if (this.#state === "closed") {
      early = undefined;
      socket.close(); // close() was called while connecting
      throw this.#closedError ?? new DisconnectedError("the mlxd client is closed");
    }
    this.#socket = socket;
    this.#hello = hello;
    this.#state = "open";
    this.#attempt = 0;
    this.#lastServerError = undefined;
    const waiters = [...this.#waiters];
    this.#waiters.clear();
    this.#emit("open", hello);
    const pending = early;
    early = undefined;
    for (const f of pending) f();
    for (const w of waiters) {
      if (this.#socket === socket) w.resolve(socket);
      else if ((this.#state as ClientState) === "closed") w.reject(this.#closedError ?? new DisconnectedError("the mlxd client is closed"));
      else {
        this.#waiters.add(w); // it closed at once: wait for the next connection
        (this.#timer as { ref?: () => void } | undefined)?.ref?.();
      }
    }
  }

  #dispatch(socket: Socket, m: ServerMessage): void {
    if (socket !== this.#socket) return;
    const id = "id" in m ? m.id : undefined;
    const route = id === undefined ? undefined : this.#routes.get(id);
    if (!route) {
      // Errors naming no request (e.g. frame_too_large), or naming one that already ended
      // (a cancel that raced the final event): not any running request's business.
      if (m.type === "error" && id === undefined) {
        this.#lastServerError = new RequestError(m.code, m.message);
        this.#emit("error", this.#lastServerError);
      }
      return;
    }
    if (m.type === "done" || m.type === "error" || m.type === "result") this.#routes.delete(id!);
    route.onMessage(m);
  }

  #onClose(socket: Socket, info: CloseInfo): void {
    if (socket !== this.#socket) return;
    this.#socket = undefined;
    const why = this.#lastServerError ? `${this.#lastServerError.message}` : info.reason ? `code ${info.code}: ${info.reason}` : `code ${info.code}`;
    const what = this.#state === "closed" ? "the client was closed" : `the connection to mlxd at ${this.#url} closed (${why})`;
    this.#failRoutes(what);
    if (this.#state === "closed") return;
    const error = new DisconnectedError(what);
    this.#emit("disconnect", error);
    const r = this.#reconnectOptions();
    if (!r) {
      this.#shut(error);
      return;
    }
    this.#state = "reconnecting";
    this.#scheduleReconnect(r, error);
  }

  #failRoutes(what: string): void {
    const routes = [...this.#routes];
    this.#routes.clear();
    for (const [id, r] of routes) {
      r.onDisconnect(new DisconnectedError(`request ${JSON.stringify(id)} failed: ${what} while it was in flight; the daemon cancels the requests of a closed connection`));
    }
  }

  #scheduleReconnect(r: ReconnectOptions, error: unknown): void {
    if (r.maxAttempts !== undefined && this.#attempt >= r.maxAttempts) {
      this.#shut(new DisconnectedError(`gave up reconnecting to mlxd after ${this.#attempt} attempts: ${(error as Error)?.message ?? error}`, { cause: error }));
      return;
    }
    const delayMs = backoffDelay(this.#attempt, r);
    this.#attempt++;
    this.#emit("reconnecting", { attempt: this.#attempt, delayMs, error });
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      if (this.#state !== "reconnecting") return;
      this.#connectOnce().catch((e) => {
        if (this.#state !== "reconnecting") return;
        if (e instanceof ProtocolError) this.#shut(e);
        else this.#scheduleReconnect(r, e);
      });
    }, delayMs);
    // Retrying alone must not keep a Node process alive; a waiting request does.
    if (this.#waiters.size === 0) (this.#timer as { unref?: () => void }).unref?.();
  }

  #shut(error: unknown): void {
    this.#state = "closed";
    this.#closedError = error;
    this.#rejectWaiters(error);
    this.#emit("close", { error });
  }

  #rejectWaiters(e: unknown): void {
    const ws = [...this.#waiters];
    this.#waiters.clear();
    for (const w of ws) w.reject(e);
  }

  /** The open socket, waiting for a (re)connection when there is none. */
  #whenOpen(signal?: AbortSignal): Promise<Socket> {
    if (signal?.aborted) return Promise.reject(abortReason(signal));
    if (this.#state === "open" && this.#socket) return Promise.resolve(this.#socket);
    if (this.#state === "closed") return Promise.reject(this.#closedError ?? new DisconnectedError("the mlxd client is closed"));
    return new Promise<Socket>((resolve, reject) => {
      const onAbort = () => {
        this.#waiters.delete(w);
        reject(abortReason(signal!));
      };
      const w: Waiter = {
        resolve: (s) => {
          signal?.removeEventListener("abort", onAbort);
          resolve(s);
        },
        reject: (e) => {
          signal?.removeEventListener("abort", onAbort);
          reject(e);
        },
      };
      this.#waiters.add(w);
      signal?.addEventListener("abort", onAbort, { once: true });
      if (this.#state === "idle") this.open().catch(() => { /* reaches the waiters */ });
      else if (this.#state === "reconnecting" && this.#timer) (this.#timer as { ref?: () => void }).ref?.();
    });
  }

  /**
   * A message over the daemon's frame limit would make it close the connection, failing every
   * request on it; such a request fails alone, here.
   */
  #tooLarge(text: string, id: string): RequestError | undefined {
    const max = this.#hello?.capabilities?.max_frame_bytes;
    if (typeof max !== "number") return undefined;
    const bytes = text.length * 3 <= max ? text.length : new TextEncoder().encode(text).byteLength;
    if (bytes <= max) return undefined;
    return new RequestError("frame_too_large", `the request is ${bytes} bytes; the daemon accepts messages of at most ${max} bytes (server.max_frame_bytes); it was not sent`, id);
  }

  #id(prefix: string): string {
    return `${prefix}${this.#nextId++}`;
  }

  /**
   * Starts a generation; iterate the result for its events. Pass exactly one of `prompt` and
   * `messages`.
   */
  generate(request: GenerateRequest, options: RequestOptions = {}): Generation {
    const id = this.#id("g");
    const gen = new Generation(id);
    const { signal } = options;
    void (async () => {
      let socket: Socket;
      try {
        socket = await this.#whenOpen(signal);
      } catch (e) {
        gen._fail(e);
        return;
      }
      if (gen._cancelRequested) {
        gen._fail(signal?.aborted ? abortReason(signal) : abortError());
        return;
      }
      const text = JSON.stringify({ ...request, type: "generate", id } satisfies ClientMessage);
      const tooLarge = this.#tooLarge(text, id);
      if (tooLarge) {
        gen._fail(tooLarge);
        return;
      }
      this.#routes.set(id, { onMessage: (m) => gen._push(m), onDisconnect: (e) => gen._fail(e) });
      try {
        socket.send(text);
      } catch (e) {
        this.#routes.delete(id);
        gen._fail(new DisconnectedError(`could not send generation ${id}: ${(e as Error).message}`, { cause: e }));
        return;
      }
      gen._attach({
        cancel: () => {
          if (this.#socket === socket && this.#routes.has(id)) {
            try {
              socket.send(JSON.stringify({ type: "cancel", id } satisfies ClientMessage));
            } catch { /* the close handler fails the generation */ }
          }
        },
      });
      if (signal) {
        const onAbort = () => gen.cancel();
        signal.addEventListener("abort", onAbort, { once: true });
        gen._onFinish(() => signal.removeEventListener("abort", onAbort));
      }
    })();
    return gen;
  }

  /** Sends a request answered by one `result` and resolves with its `data`. */
  async request<T>(message: DistributiveOmit<Exclude<ClientMessage, { type: "generate" | "cancel" }>, "id">, options: RequestOptions = {}): Promise<T> {
    const { signal } = options;
    const socket = await this.#whenOpen(signal);
    const id = this.#id("r");
    const text = JSON.stringify({ ...message, id });
    const tooLarge = this.#tooLarge(text, id);
    if (tooLarge) throw tooLarge;
    return new Promise<T>((resolve, reject) => {
      const onAbort = () => {
        this.#routes.delete(id);
        reject(abortReason(signal!));
      };
      const done = () => signal?.removeEventListener("abort", onAbort);
      this.#routes.set(id, {
        onMessage: (m) => {
          done();
          if (m.type === "result") resolve(m.data as T);
          else if (m.type === "error") reject(new RequestError(m.code, m.message, m.id));
          else reject(new ProtocolError(`unexpected ${m.type} event for request ${id}`));
        },
        onDisconnect: (e) => {
          done();
          reject(e);
        },
      });
      signal?.addEventListener("abort", onAbort, { once: true });
      try {
        socket.send(text);
      } catch (e) {
        this.#routes.delete(id);
        done();
        reject(new DisconnectedError(`could not send ${message.type}: ${(e as Error).message}`, { cause: e }));
      }
    });
  }

  /** Text to token ids. `add_special` adds the model's BOS where it uses one. */
  tokenize(text: string, options: RequestOptions & { model?: string; add_special?: boolean } = {}): Promise<TokenizeResult> {
    const { signal, ...rest } = options;
    return this.request<TokenizeResult>({ type: "tokenize", text, ...rest }, { signal });
  }

  /** Token ids to text. */
  detokenize(tokens: number[], options: RequestOptions & { model?: string } = {}): Promise<DetokenizeResult> {
    const { signal, ...rest } = options;
    return this.request<DetokenizeResult>({ type: "detokenize", tokens, ...rest }, { signal });
  }

  /** Configured models and whether they are resident. */
  models(options: RequestOptions = {}): Promise<ModelsResult> {
    return this.request<ModelsResult>({ type: "models" }, options);
  }

  /** Makes a model resident. */
  load(model: string, options: RequestOptions = {}): Promise<LoadResult> {
    return this.request<LoadResult>({ type: "load", model }, options);
  }

  /** Releases a resident model (`busy` while it has requests in flight). */
  unload(model: string, options: RequestOptions = {}): Promise<UnloadResult> {
    return this.request<UnloadResult>({ type: "unload", model }, options);
  }

  /** Sampler plugins the daemon has loaded. */
  plugins(options: RequestOptions = {}): Promise<PluginsResult> {
    return this.request<PluginsResult>({ type: "plugins" }, options);
  }

  /** Rescans the daemon's plugin directories (where `hello.capabilities.messages` lists `reload_plugins`). */
  reloadPlugins(options: RequestOptions = {}): Promise<PluginsResult> {
    return this.request<PluginsResult>({ type: "reload_plugins" }, options);
  }

  /** Server, memory and per-model counters. */
  status(options: RequestOptions = {}): Promise<StatusResult> {
    return this.request<StatusResult>({ type: "status" }, options);
  }

  /**
   * Closes the connection for good. In-flight requests fail with a `DisconnectedError` (the
   * daemon cancels a closed connection's generations).
   */
  close(): void {
    if (this.#state === "closed") return;
    const error = new DisconnectedError("the mlxd client was closed");
    this.#state = "closed";
    this.#closedError = error;
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#failRoutes("the client was closed");
    this.#rejectWaiters(error);
    const s = this.#socket;
    this.#socket = undefined;
    try {
      s?.close();
    } catch { /* already closed */ }
    this.#emit("close", {});
  }
}

type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;

function abortError(): Error {
  const e = new Error("the generation was cancelled before it was sent");
  e.name = "AbortError";
  return e;
}

/** Connects to the daemon (discovering its address and token on Node when not given). */
export async function connect(options: ConnectOptions = {}): Promise<Client> {
  const client = new Client(options);
  await client.open();
  return client;
}
