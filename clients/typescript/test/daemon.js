// Starts the real daemon for tests: `target/debug/mlxd serve --config FILE` on port 0 with a
// temporary state directory (the default model, SmolLM2-135M, on the CPU). The address comes
// from the first stdout line, the token from `<state_dir>/token`. Also used by the VS Code
// extension's tests.

import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const repoRoot = resolve(here, "..", "..", "..");
export const daemonBinary = process.env.MLXD_BIN || join(repoRoot, "target", "debug", "mlxd");

/**
 * @param {{ extra?: string }} [options] extra lines for the `[server]` table (and any tables after it)
 */
export async function startDaemon(options = {}) {
  if (!existsSync(daemonBinary)) {
    throw new Error(`${daemonBinary} does not exist: build it with \`cargo build -p mlxd\` (or set MLXD_BIN)`);
  }
  const dir = mkdtempSync(join(tmpdir(), "mlxd-client-test-"));
  const stateDir = join(dir, "state");
  const config = join(dir, "config.toml");
  writeFileSync(config, `[server]\nlisten = "127.0.0.1:0"\nstate_dir = ${JSON.stringify(stateDir)}\n${options.extra ?? ""}`);

  const d = {
    dir,
    stateDir,
    config,
    /** @type {import("node:child_process").ChildProcess | undefined} */
    child: undefined,
    url: "",
    token: "",
    log: "",
    /** (Re)starts the process with the same config and state directory (a new port). */
    async start() {
      const child = spawn(daemonBinary, ["serve", "--config", config], {
        env: { ...process.env, MLXD_LOG: process.env.MLXD_LOG ?? "warn" },
        stdio: ["ignore", "pipe", "pipe"],
      });
      d.child = child;
      child.stderr.on("data", (b) => (d.log += b.toString()));
      const lines = createInterface({ input: child.stdout });
      const first = await new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`mlxd did not print its address within 60 s\n${d.log}`)), 60_000);
        lines.once("line", (l) => {
          clearTimeout(timer);
          resolve(l);
        });
        child.once("exit", (code) => {
          clearTimeout(timer);
          reject(new Error(`mlxd exited with ${code} before listening\n${d.log}`));
        });
      });
      lines.on("line", () => {}); // keep draining stdout
      const m = /^mlxd listening on (ws:\/\/\S+)$/.exec(first.trim());
      if (!m) throw new Error(`unexpected first line from mlxd: ${JSON.stringify(first)}`);
      d.url = m[1].endsWith("/") ? m[1] : `${m[1]}/`;
      d.token = readFileSync(join(stateDir, "token"), "utf8").trim();
      return d;
    },
    /** Stops the process (SIGTERM: finishes requests as cancelled; SIGKILL: drops them). */
    async stop(signal = "SIGTERM") {
      const child = d.child;
      if (!child || child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((resolve) => child.once("exit", resolve));
      child.kill(signal);
      await exited;
    },
    async restart(signal = "SIGTERM") {
      await d.stop(signal);
      return d.start();
    },
    /** Stops the process and removes the temporary directory. */
    async dispose() {
      await d.stop("SIGKILL");
      rmSync(dir, { recursive: true, force: true });
    },
  };
  try {
    await d.start();
  } catch (e) {
    await d.dispose();
    throw e;
  }
  return d;
}
