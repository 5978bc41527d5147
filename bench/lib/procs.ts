/**
 * The service as real child processes, started the way `npm run web` / `npm run listener` start them (node with
 * tsx), plus the bare Hono server used as the HTTP baseline. Every child is killed when the benchmark exits.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { memoryMiB } from './cpu.ts';
import { sleep } from './stats.ts';

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

/**
 * Where the web and listener scripts are run from: this repository, or BENCH_APP_ROOT, a patched copy of it (with
 * node_modules linked), to measure a proposed change to src/ against the same benchmark.
 */
const appRoot = process.env.BENCH_APP_ROOT ? path.resolve(process.env.BENCH_APP_ROOT) : root;

export interface Service {
  name: string;
  pid: number;
  child: ChildProcess;
  lines: string[];
  /** Peak (VmHWM) and current RSS in MiB. */
  memory(): { peak: number | null; rss: number | null };
  stop(ms?: number): Promise<void>;
}

const live = new Set<ChildProcess>();
let hooked = false;
function hookExit(): void {
  if (hooked) return;
  hooked = true;
  process.on('exit', () => {
    for (const c of live) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  });
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => {
      for (const c of live) c.kill('SIGKILL');
      process.exit(130);
    });
  }
}

/**
 * Spawns `node [nodeArgs] --import tsx <script>` from appRoot (a relative script is taken from there). Output is kept (last 300 lines) for
 * error messages; with BENCH_PROC_LOGS=1 it is echoed.
 */
export function spawnService(
  name: string,
  script: string,
  env: Record<string, string>,
  nodeArgs: string[] = [],
): Service {
  hookExit();
  const child = spawn(process.execPath, [...nodeArgs, '--import', 'tsx', script], {
    cwd: appRoot,
    env: { ...process.env, LOG_FORMAT: 'json', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  live.add(child);
  const lines: string[] = [];
  const onData = (buf: Buffer) => {
    for (const line of buf.toString().split('\n')) {
      if (!line) continue;
      lines.push(line);
      if (lines.length > 300) lines.shift();
      if (process.env.BENCH_PROC_LOGS) process.stderr.write(`[${name}] ${line}\n`);
    }
  };
  child.stdout!.on('data', onData);
  child.stderr!.on('data', onData);
  const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
  void exited.then(() => live.delete(child));
  return {
    name,
    pid: child.pid!,
    child,
    lines,
    memory: () => memoryMiB(child.pid!),
    async stop(ms = 10_000) {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), ms);
      await exited;
      clearTimeout(t);
    },
  };
}

function alive(s: Service): boolean {
  return s.child.exitCode === null && s.child.signalCode === null;
}

/** Waits until GET `url` answers 2xx, or throws with the service's last lines. */
export async function waitForHttp(url: string, s: Service, ms = 30_000): Promise<void> {
  const end = Date.now() + ms;
  for (;;) {
    if (!alive(s)) throw new Error(`${s.name} exited:\n${s.lines.slice(-20).join('\n')}`);
    try {
      const r = await fetch(url);
      if (r.ok) return;
    } catch {
      /* not listening yet */
    }
    if (Date.now() > end) throw new Error(`${url} did not answer within ${ms} ms:\n${s.lines.slice(-20).join('\n')}`);
    await sleep(100);
  }
}

/**
 * Waits until `n` listener processes hold their LISTEN connection on `databaseUrl`. With LOG_LEVEL=warn the
 * listener prints nothing on start, so we look at PostgreSQL instead: pg-listen's connection runs
 * `LISTEN allocator` (then a periodic `SELECT pg_backend_pid()`), after the first roster sync is done.
 */
export async function waitForListeners(databaseUrl: string, n: number, procs: Service[], ms = 60_000): Promise<void> {
  const c = new pg.Client({ connectionString: databaseUrl });
  await c.connect();
  try {
    const end = Date.now() + ms;
    for (;;) {
      for (const p of procs) if (!alive(p)) throw new Error(`${p.name} exited:\n${p.lines.slice(-20).join('\n')}`);
      const r = await c.query<{ n: number }>(
        `select count(*)::int as n from pg_stat_activity
         where datname = current_database() and query in ('LISTEN allocator', 'SELECT pg_backend_pid()')`,
      );
      if (r.rows[0]!.n >= n) break;
      if (Date.now() > end) {
        throw new Error(`listeners not listening after ${ms} ms:\n${procs.map((p) => p.lines.slice(-10).join('\n')).join('\n')}`);
      }
      await sleep(100);
    }
  } finally {
    await c.end();
  }
  await sleep(300); // the catch-up sweep right after LISTEN
}
