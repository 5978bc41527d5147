/**
 * The service as real processes (`npm run web`, `npm run listener`, run through tsx like npm does), with the
 * Qiscus simulator as Qiscus, on loopback. Tests can kill -9 them, restart them, and read their logs.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort } from '../../src/db/embedded.ts';
import { startSimulator, type Simulator, type SimulatorOptions } from '../../src/simulator/qiscus-simulator.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

export const APP_ID = 'test-app';
export const SECRET_KEY = 'test-secret-key';

export interface Proc {
  name: string;
  child: ChildProcess;
  /** Every line it printed (stdout and stderr). */
  lines: string[];
  exited: Promise<number | null>;
  /** Resolves with the first line (already printed or to come) matching `re`. */
  waitFor(re: RegExp, ms?: number): Promise<string>;
  kill(signal?: NodeJS.Signals): void;
  /** SIGTERM, then waits for the exit (SIGKILL after `ms`). */
  stop(ms?: number): Promise<number | null>;
}

export function spawnProc(name: string, script: string, env: Record<string, string | undefined>): Proc {
  const child = spawn(process.execPath, ['--import', 'tsx', script], {
    cwd: root,
    env: { ...process.env, LOG_FORMAT: 'json', LOG_LEVEL: 'info', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const lines: string[] = [];
  const waiters: Array<{ re: RegExp; resolve: (l: string) => void }> = [];
  const onData = (buf: Buffer) => {
    for (const line of buf.toString().split('\n')) {
      if (!line) continue;
      lines.push(line);
      if (process.env.TEST_PROC_LOGS) process.stderr.write(`[${name}] ${line}\n`);
      for (const w of [...waiters]) {
        if (w.re.test(line)) {
          waiters.splice(waiters.indexOf(w), 1);
          w.resolve(line);
        }
      }
    }
  };
  child.stdout!.on('data', onData);
  child.stderr!.on('data', onData);
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  return {
    name,
    child,
    lines,
    exited,
    waitFor(re, ms = 20_000) {
      const seen = lines.find((l) => re.test(l));
      if (seen) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        const t = setTimeout(
          () => reject(new Error(`${name}: no line matching ${re} within ${ms} ms; last lines:\n${lines.slice(-15).join('\n')}`)),
          ms,
        );
        waiters.push({ re, resolve: (l) => (clearTimeout(t), resolve(l)) });
        void exited.then((code) => {
          clearTimeout(t);
          reject(new Error(`${name} exited (${code}) before printing ${re}:\n${lines.slice(-15).join('\n')}`));
        });
      });
    },
    kill(signal = 'SIGKILL') {
      child.kill(signal);
    },
    async stop(ms = 15_000) {
      if (child.exitCode !== null || child.signalCode !== null) return child.exitCode;
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), ms);
      const code = await exited;
      clearTimeout(t);
      return code;
    },
  };
}

export interface Stack {
  databaseUrl: string;
  sim: Simulator;
  web: Proc;
  webUrl: string;
  listeners: Proc[];
  startListener(env?: Record<string, string>): Promise<Proc>;
  restartWeb(): Promise<void>;
  stop(): Promise<void>;
}

/**
 * Simulator + one web process + `listeners` listener processes against `databaseUrl`, at the shipped defaults
 * (AGENT_SYNC_SECONDS 30, SWEEP_SECONDS 5, QISCUS_TIMEOUT_MS 10 s: src/config/index.ts), as a user gets them.
 * `env` goes to every process: a test shortens a period there only when that period is what it is about, and
 * says so.
 */
export async function startStack(opts: {
  databaseUrl: string;
  listeners?: number;
  env?: Record<string, string>;
  sim?: SimulatorOptions;
}): Promise<Stack> {
  const sim = await startSimulator({ appId: APP_ID, secretKey: SECRET_KEY, ...opts.sim });
  const webPort = await freePort();
  const webUrl = `http://127.0.0.1:${webPort}`;
  sim.webhookBaseUrl = webUrl;
  const env = {
    DATABASE_URL: opts.databaseUrl,
    QISCUS_BASE_URL: sim.url,
    QISCUS_APP_ID: APP_ID,
    QISCUS_SECRET_KEY: SECRET_KEY,
    // unset (not inherited from the shell running the tests): the processes take the shipped defaults
    AGENT_SYNC_SECONDS: undefined,
    SWEEP_SECONDS: undefined,
    QISCUS_TIMEOUT_MS: undefined,
    METRICS_PORT: '0',
    ...opts.env,
  };
  const startWeb = async () => {
    const web = spawnProc('web', 'src/http/main.ts', { ...env, PORT: String(webPort) });
    await waitForHttp(`${webUrl}/healthz`, web);
    return web;
  };
  const stack: Stack = {
    databaseUrl: opts.databaseUrl,
    sim,
    web: await startWeb(),
    webUrl,
    listeners: [],
    async startListener(extra = {}) {
      const p = spawnProc(`listener-${stack.listeners.length + 1}`, 'src/listener/main.ts', { ...env, ...extra });
      stack.listeners.push(p);
      await p.waitFor(/listener started/);
      return p;
    },
    async restartWeb() {
      await stack.web.stop();
      stack.web = await startWeb();
    },
    async stop() {
      await Promise.all([stack.web, ...stack.listeners].map((p) => p.stop(5000)));
      await sim.close();
    },
  };
  for (let i = 0; i < (opts.listeners ?? 1); i++) await stack.startListener();
  return stack;
}

async function waitForHttp(url: string, proc: Proc, ms = 20_000): Promise<void> {
  const end = Date.now() + ms;
  let exited = false;
  void proc.exited.then(() => (exited = true));
  for (;;) {
    if (exited) throw new Error(`${proc.name} exited:\n${proc.lines.slice(-15).join('\n')}`);
    try {
      const r = await fetch(url);
      if (r.ok) return;
    } catch {
      // not listening yet
    }
    if (Date.now() > end) throw new Error(`${url} did not answer within ${ms} ms:\n${proc.lines.slice(-15).join('\n')}`);
    await sleep(100);
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Polls `check` until it returns a truthy value (returned) or `ms` passes (throws with `what`). */
export async function eventually<T>(what: string, check: () => Promise<T> | T, ms = 15_000, every = 50): Promise<T> {
  const end = Date.now() + ms;
  let last: unknown;
  for (;;) {
    try {
      const v = await check();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}${last ? `: ${String(last)}` : ''}`);
    await sleep(every);
  }
}
