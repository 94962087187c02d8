/**
 * One `@mlxd/client` connection for the extension, created on first use from the settings and
 * replaced when they change. The token is found like every mlxd client finds it: `MLXD_TOKEN`,
 * else the `token` file in the daemon's state directory (`MLXD_STATE_DIR`,
 * `$XDG_STATE_HOME/mlxd`, `~/.local/state/mlxd`, `~/Library/Application Support/mlxd`).
 */

import type { Client } from "@mlxd/client" with { "resolution-mode": "import" };

export interface ConnectionSettings {
  /** `ws://host:port/`; empty: discover (`MLXD_URL`, the state directory's `endpoint` file, the default port). */
  endpoint: string;
}

export class ClientManager {
  #client: Promise<Client> | undefined;
  #current: Client | undefined;
  #settings: () => ConnectionSettings;
  #onState?: (state: string, detail?: string) => void;

  constructor(settings: () => ConnectionSettings, onState?: (state: string, detail?: string) => void) {
    this.#settings = settings;
    this.#onState = onState;
  }

  /**
   * The connected client. Connecting fails fast when the daemon is not running (the next call
   * tries again); once connected the client reconnects by itself with backoff.
   */
  get(): Promise<Client> {
    if (this.#current?.state === "closed") this.reset();
    if (!this.#client) {
      const p = this.#connect();
      this.#client = p;
      p.catch(() => {
        if (this.#client === p) this.#client = undefined;
      });
    }
    return this.#client;
  }

  async #connect(): Promise<Client> {
    const { Client } = await import("@mlxd/client");
    const endpoint = this.#settings().endpoint.trim();
    // `ws` (shipped with the extension) rather than a global WebSocket the extension host may
    // have: it sends the token as a header and reports the HTTP status of a refusal.
    const client = new Client({ url: endpoint || undefined, transport: "ws", reconnect: { maxDelayMs: 30_000 } });
    client.on("open", (h) => this.#onState?.("connected", `${client.url} (${h.server}, default model ${h.default_model})`));
    client.on("disconnect", (e) => this.#onState?.("disconnected", e.message));
    client.on("close", (c) => this.#onState?.("closed", c.error ? String((c.error as Error).message ?? c.error) : undefined));
    try {
      await client.open();
    } catch (e) {
      client.close();
      this.#onState?.("unreachable", (e as Error).message);
      throw e;
    }
    this.#current = client;
    return client;
  }

  /** Drops the connection; the next `get()` connects with the current settings. */
  reset(): void {
    const p = this.#client;
    this.#client = undefined;
    this.#current = undefined;
    p?.then((c) => c.close(), () => {});
  }

  dispose(): void {
    this.reset();
  }
}
