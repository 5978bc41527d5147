/**
 * The PostgreSQL server for a benchmark run: DATABASE_URL if set (a server where we may CREATE DATABASE), else an
 * embedded PostgreSQL in a temporary folder, removed at the end. One migrated template database per run; every
 * measurement gets a fresh clone of it (a file copy), so no phase sees another's rows.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
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

export interface BenchServer {
  /** 'embedded' or 'DATABASE_URL'. */
  kind: 'embedded' | 'DATABASE_URL';
  adminUrl: string;
  /** The postmaster's pid when the server runs on this machine and we know it (embedded), for CPU accounting. */
  postmasterPid: number | null;
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
  const given = process.env.DATABASE_URL?.trim();
  if (given) {
    adminUrl = given;
    kind = 'DATABASE_URL';
    log('PostgreSQL from DATABASE_URL');
  } else {
    const dataDir = await tempDataDir('allocator-bench-');
    embedded = await startEmbeddedPostgres({ dataDir, persistent: false });
    adminUrl = embedded.url;
    kind = 'embedded';
    log(`embedded PostgreSQL in ${dataDir}`);
  }

  const run = randomBytes(3).toString('hex');
  const template = `allocator_bench_tpl_${run}`;
  await withClient(adminUrl, (c) => c.query(`create database ${template}`));
  await runMigrations(urlWithDb(adminUrl, template));
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

export async function endClients(clients: pg.Client[]): Promise<void> {
  await Promise.all(clients.map((c) => c.end().catch(() => {})));
}

export { withClient };
