/**
 * The PostgreSQL server for a benchmark run: DATABASE_URL if set (a server where we may CREATE DATABASE), else an
 * embedded PostgreSQL in a temporary folder, removed at the end. One migrated template database per run; every
 * measurement gets a fresh clone of it (a file copy), so no phase sees another's rows.
 */
import { randomBytes } from 'node:crypto';
import { appendFileSync, readFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import path from 'node:path';
import pg from 'pg';
import { startEmbeddedPostgres, tempDataDir, type EmbeddedServer } from '../../src/db/embedded.ts';
import { runMigrations } from '../../src/db/migrate.ts';

export interface BenchDatabase {
  name: string;
  url: string;
  drop(): Promise<void>;
}

/**
 * BENCH_SQL_PATCH: comma-separated SQL files applied to the template after the migrations, to measure a proposed
 * change before it becomes a migration: run once without, once with, compare.
 */
export function sqlPatches(): string[] {
  return (process.env.BENCH_SQL_PATCH ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)
    .map((f) => path.resolve(f));
}

/**
 * BENCH_PGSS=1: load pg_stat_statements (track = all) into the embedded server, for profiling: parts that support it
 * write the statements that cost most in each run to bench/results/profiles/. It costs a little on every statement,
 * so figures measured with it are not comparable with those without.
 */
export function pgssWanted(): boolean {
  return !!process.env.BENCH_PGSS && !process.env.DATABASE_URL;
}

/**
 * BENCH_AUTO_EXPLAIN=<rate> (e.g. 0.02): auto_explain logs the plan (ANALYZE, BUFFERS, no timing) of that share of
 * all statements, nested ones included, of every session, to the embedded server's log; parts that support it sum
 * them by statement into bench/results/profiles/. Embedded server only.
 */
export function autoExplainRate(): number | null {
  const raw = process.env.BENCH_AUTO_EXPLAIN;
  if (!raw || process.env.DATABASE_URL) return null;
  const r = Number(raw);
  return Number.isFinite(r) && r > 0 && r <= 1 ? r : null;
}

export interface BenchServer {
  /** 'embedded' or 'DATABASE_URL'. */
  kind: 'embedded' | 'DATABASE_URL';
  adminUrl: string;
  /** The postmaster's pid when the server runs on this machine and we know it (embedded), for CPU accounting. */
  postmasterPid: number | null;
  /** The server's log file when BENCH_AUTO_EXPLAIN made it keep one. */
  logFile: string | null;
  /** A fresh database cloned from the migrated template. */
  createDatabase(label: string): Promise<BenchDatabase>;
  stop(): Promise<void>;
}

function urlWithDb(base: string, db: string): string {
  const u = new URL(base);
  u.pathname = `/${db}`;
  return u.toString();
}

async function withClient<T>(url: string, f: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    return await f(c);
  } finally {
    await c.end().catch(() => {});
  }
}

export async function startBenchServer(log: (m: string) => void = () => {}): Promise<BenchServer> {
  let adminUrl: string;
  let embedded: EmbeddedServer | null = null;
  let kind: BenchServer['kind'];
  let serverLog: string | null = null;
  const given = process.env.DATABASE_URL?.trim();
  if (given) {
    adminUrl = given;
    kind = 'DATABASE_URL';
    log('PostgreSQL from DATABASE_URL');
  } else {
    const dataDir = await tempDataDir('allocator-bench-');
    // With BENCH_PGSS or BENCH_AUTO_EXPLAIN the server is restarted once to load the modules, so it must keep its
    // data on stop (the temporary folder is removed at the end either way).
    const restart = pgssWanted() || autoExplainRate() !== null;
    // The server's own output (where auto_explain writes) is kept in a file beside the data directory.
    const logPath = path.join(path.dirname(dataDir), 'server.log');
    embedded = await startEmbeddedPostgres({
      dataDir,
      persistent: restart,
      onLog: autoExplainRate() !== null ? (chunk) => appendFileSync(logPath, chunk) : undefined,
    });
    serverLog = autoExplainRate() !== null ? logPath : null;
    adminUrl = embedded.url;
    kind = 'embedded';
    log(`embedded PostgreSQL in ${dataDir}`);
    if (restart) {
      const libs = [pgssWanted() ? 'pg_stat_statements' : null, autoExplainRate() !== null ? 'auto_explain' : null].filter(Boolean);
      await withClient(adminUrl, async (c) => {
        await c.query(`alter system set shared_preload_libraries = ${libs.map((l) => `'${l}'`).join(', ')}`);
        if (pgssWanted()) {
          await c.query(`alter system set pg_stat_statements.track = 'all'`);
          await c.query(`alter system set track_io_timing = on`);
        }
        const rate = autoExplainRate();
        if (rate !== null) {
          for (const setting of [
            `auto_explain.sample_rate = ${rate}`,
            'auto_explain.log_min_duration = 0',
            'auto_explain.log_analyze = on',
            'auto_explain.log_buffers = on',
            'auto_explain.log_timing = off',
            'auto_explain.log_nested_statements = on',
            'log_autovacuum_min_duration = 0',
          ]) {
            await c.query(`alter system set ${setting}`);
          }
        }
      });
      await embedded.stop();
      await embedded.start();
      log(`profiling modules loaded: ${libs.join(', ')}`);
    }
  }

  const run = randomBytes(3).toString('hex');
  const template = `allocator_bench_tpl_${run}`;
  await withClient(adminUrl, (c) => c.query(`create database ${template}`));
  await runMigrations(urlWithDb(adminUrl, template));
  if (pgssWanted()) await withClient(urlWithDb(adminUrl, template), (c) => c.query('create extension if not exists pg_stat_statements'));
  const patches = sqlPatches();
  for (const file of patches) {
    log(`applying ${path.relative(process.cwd(), file)} to the template (BENCH_SQL_PATCH)`);
    const sql = readFileSync(file, 'utf8');
    await withClient(urlWithDb(adminUrl, template), (c) => c.query(sql));
  }
  const created = new Set<string>([template]);

  let postmasterPid: number | null = null;
  if (embedded) {
    try {
      postmasterPid = Number(readFileSync(path.join(embedded.dataDir, 'postmaster.pid'), 'utf8').split('\n')[0]);
    } catch {
      postmasterPid = null;
    }
  }

  const dropDb = async (name: string) => {
    await withClient(adminUrl, (c) => c.query(`drop database if exists ${name} with (force)`)).catch(() => {});
    created.delete(name);
  };

  let n = 0;
  return {
    kind,
    adminUrl,
    postmasterPid,
    logFile: serverLog,
    async createDatabase(label: string) {
      const name = `allocator_bench_${run}_${label.replace(/[^a-z0-9_]/gi, '_').toLowerCase()}_${++n}`;
      await withClient(adminUrl, (c) => c.query(`create database ${name} template ${template}`));
      created.add(name);
      return { name, url: urlWithDb(adminUrl, name), drop: () => dropDb(name) };
    },
    async stop() {
      for (const name of [...created]) await dropDb(name);
      if (embedded) {
        await embedded.stop().catch(() => {});
        await rm(path.dirname(embedded.dataDir), { recursive: true, force: true }).catch(() => {});
      }
    },
  };
}

/** A pool of `n` dedicated connections (each worker of a tight loop gets its own). */
export async function connectClients(url: string, n: number): Promise<pg.Client[]> {
  const clients = await Promise.all(
    Array.from({ length: n }, async () => {
      const c = new pg.Client({ connectionString: url, application_name: 'allocator-bench' });
      await c.connect();
      return c;
    }),
  );
  return clients;
}

/**
 * A pinned horizon: a connection of its own holding a REPEATABLE READ snapshot open (`begin isolation level
 * repeatable read; select count(*) from allocator.sessions;`, as a long report or a forgotten psql session would).
 * While it lives, no row version changed since can be cleaned. End it with releaseSnapshot().
 */
export async function holdSnapshot(url: string): Promise<pg.Client> {
  const snap = new pg.Client({ connectionString: url, application_name: 'allocator-bench-snapshot' });
  await snap.connect();
  await snap.query('begin isolation level repeatable read');
  await snap.query('select count(*) from allocator.sessions');
  return snap;
}

export async function releaseSnapshot(snap: pg.Client): Promise<void> {
  await snap.query('commit');
  await snap.end();
}

export async function endClients(clients: pg.Client[]): Promise<void> {
  await Promise.all(clients.map((c) => c.end().catch(() => {})));
}

export { withClient };
