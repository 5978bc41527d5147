/**
 * The embedded PostgreSQL of `npm start`, in a process group (a session) of its own.
 *
 * Ctrl-C in a terminal sends SIGINT to the whole foreground process group. A PostgreSQL started as our child would
 * be in it, get the SIGINT too and shut down at once ("fast" shutdown: connections cut), so the assignments in flight
 * could not report their outcome. Run from this file as a separate process started with `detached: true`, it is out
 * of that group's reach: the service finishes its work, then stops it (the demo does the same with
 * src/demo/postgres-holder.ts, for a throwaway database).
 *
 * This file is both sides: `startDetachedPostgres()` for the service, and, run as a script, the process that holds
 * PostgreSQL. Protocol: the holder prints one JSON line `{"url": ...}` once PostgreSQL accepts connections, and stops
 * it when its stdin ends (the service closes it, or died in any way: nothing outlives the service) or on SIGTERM.
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { startEmbeddedPostgres, type EmbeddedServer } from './embedded.ts';

interface HolderOptions {
  dataDir: string;
  port: number;
}

export interface DetachedPostgres {
  /** Connection string of the `postgres` database. */
  url: string;
  urlFor(database: string): string;
  /** Stops PostgreSQL (cleanly: committed data is kept) and waits until its process group is gone. */
  stop(): Promise<void>;
}

const self = fileURLToPath(import.meta.url);

export async function startDetachedPostgres(
  opts: HolderOptions & { onLog?: (line: string) => void },
): Promise<DetachedPostgres> {
  const child = spawn(process.execPath, ['--import', import.meta.resolve('tsx'), self, JSON.stringify(opts)], {
    detached: true, // a new session: Ctrl-C in our terminal does not reach it
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const log = opts.onLog ?? (() => {});
  let stderr = '';
  child.stderr.on('data', (b: Buffer) => {
    stderr = (stderr + b.toString()).slice(-4000);
    for (const line of b.toString().split('\n')) if (line.trim()) log(line);
  });
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const ready = await new Promise<{ url: string }>((resolve, reject) => {
    let out = '';
    child.stdout.on('data', (b: Buffer) => {
      out += b.toString();
      const nl = out.indexOf('\n');
      if (nl >= 0) resolve(JSON.parse(out.slice(0, nl)) as { url: string });
    });
    void exited.then((code) => reject(new Error(`exited (${code}) before PostgreSQL accepted connections: ${stderr.trim()}`)));
  });
  const base = new URL(ready.url);
  let stopped: Promise<void> | undefined;
  return {
    url: ready.url,
    urlFor: (db) => Object.assign(new URL(base), { pathname: `/${db}` }).toString(),
    stop: () =>
      (stopped ??= (async () => {
        child.stdin.end();
        const kill = setTimeout(() => killGroup(child.pid!), 30_000);
        await exited;
        clearTimeout(kill);
      })()),
  };
}

function killGroup(pid: number) {
  try {
    process.kill(-pid, 'SIGKILL');
  } catch {
    // gone already
  }
}

/** The holder: run as `node --import tsx detached-postgres.ts '{"dataDir":...,"port":...}'`. */
async function hold(opts: HolderOptions): Promise<void> {
  const starting: Promise<EmbeddedServer> = startEmbeddedPostgres({
    dataDir: opts.dataDir,
    port: opts.port,
    persistent: true,
    onLog: (line) => process.stderr.write(line.endsWith('\n') ? line : `${line}\n`),
  });
  let stopping = false;
  const stop = async (code = 0) => {
    if (!stopping) {
      stopping = true;
      const server = await starting.catch(() => undefined);
      await server?.stop().catch(() => {});
    }
    process.exit(code);
  };
  process.on('SIGINT', () => {}); // not ours to act on: the service stops us when its work is done
  process.on('SIGTERM', () => void stop());
  process.on('SIGHUP', () => void stop());
  process.stdin.on('end', () => void stop());
  process.stdin.on('error', () => void stop());
  process.stdin.resume();
  try {
    const server = await starting;
    process.stdout.write(JSON.stringify({ url: server.url }) + '\n');
  } catch (e) {
    process.stderr.write(`cannot start the embedded PostgreSQL: ${e instanceof Error ? e.message : String(e)}\n`);
    await stop(1);
  }
}

if (process.argv[1] === self) await hold(JSON.parse(process.argv[2]!) as HolderOptions);
