/**
 * Finding the running daemon and its token without configuration (Node only; in browsers pass
 * `url` and `token` to `connect`). The same rules as the Rust client (`clients/rust/src/endpoint.rs`):
 *
 * - URL: `MLXD_URL`, else the `endpoint` file the daemon writes into its state directory on
 *   start, else `ws://127.0.0.1:7878/`;
 * - token: `MLXD_TOKEN`, else the `token` file in the state directory, else none;
 * - state directory: `MLXD_STATE_DIR`, else `$XDG_STATE_HOME/mlxd` or `~/.local/state/mlxd`
 *   (`~/Library/Application Support/mlxd` on macOS).
 */

import { readFile } from "node:fs/promises";
import { homedir } from "node:os";
import { join } from "node:path";
import { ConfigError } from "./errors.js";

/** The address of a daemon and the token it wants. */
export interface Endpoint {
  url: string;
  token?: string;
}

export interface DiscoverOptions {
  /**
   * Read this state directory's `endpoint` and `token` files, ignoring `MLXD_URL`, `MLXD_TOKEN`
   * and `MLXD_STATE_DIR` (an explicit choice wins over the environment).
   */
  stateDir?: string;
  /** The environment to read (default `process.env`). */
  env?: Record<string, string | undefined>;
  /** The platform (default `process.platform`). */
  platform?: string;
  /** The home directory (default `os.homedir()`). */
  home?: string;
}

export const DEFAULT_URL = "ws://127.0.0.1:7878/";

/** The daemon's default state directory (the rule the daemon itself uses). */
export function defaultStateDir(options: Omit<DiscoverOptions, "stateDir"> = {}): string {
  const env = options.env ?? process.env;
  const home = options.home ?? (env.HOME || homedir() || ".");
  if ((options.platform ?? process.platform) === "darwin") return join(home, "Library", "Application Support", "mlxd");
  const xdg = env.XDG_STATE_HOME;
  return xdg ? join(xdg, "mlxd") : join(home, ".local", "state", "mlxd");
}

/** The state directory discovery reads: `stateDir`, else `MLXD_STATE_DIR`, else the default. */
export function stateDir(options: DiscoverOptions = {}): string {
  const env = options.env ?? process.env;
  return options.stateDir ?? (env.MLXD_STATE_DIR || defaultStateDir(options));
}

async function readTrimmed(path: string): Promise<string | undefined> {
  try {
    return (await readFile(path, "utf8")).trim();
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw new ConfigError(`cannot read ${path}: ${(e as Error).message}`, { cause: e });
  }
}

/** Finds the daemon's URL and token (see the module comment for the order). */
export async function discover(options: DiscoverOptions = {}): Promise<Endpoint> {
  const env = options.stateDir === undefined ? options.env ?? process.env : {};
  const dir = stateDir(options);
  let url = env.MLXD_URL;
  if (!url) {
    // An unreadable endpoint file is not fatal: the default address may still be right.
    url = await readTrimmed(join(dir, "endpoint")).catch(() => undefined);
  }
  const token = env.MLXD_TOKEN ?? (await readTrimmed(join(dir, "token")));
  return { url: url || DEFAULT_URL, token: token || undefined };
}
