/**
 * A database of its own for one test file: a clone of the migrated template (fast: a file copy, no migrations).
 */
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { inject } from 'vitest';

export interface TestDatabase {
  url: string;
  name: string;
  pool: pg.Pool;
  /** A new client of its own (for a test that needs one connection per simulated process). */
  client(): Promise<pg.Client>;
  drop(): Promise<void>;
}

/**
 * A connection that PostgreSQL terminates while it is being closed reports 57P01 ("terminating connection due to
 * administrator command") as an 'error' event that nobody listens to any more, and vitest fails the whole run for
 * it. It happens at teardown: pool.end() does not wait for the sockets to close, and the database is then dropped
 * WITH (FORCE). Swallow that one; any other error still surfaces.
 */
export function quietOnTermination(c: pg.ClientBase): void {
  c.on('error', rethrowUnlessTerminated);
}

/** The same for a pool: its clients, and the pool itself (pg-pool re-emits an idle client's error on the pool). */
export function quietPoolOnTermination(pool: pg.Pool): void {
  pool.on('connect', quietOnTermination);
  pool.on('error', rethrowUnlessTerminated);
}

function rethrowUnlessTerminated(e: Error & { code?: string }): void {
  if (e.code !== '57P01') throw e;
}

function urlWithDb(base: string, db: string): string {
  const u = new URL(base);
  u.pathname = `/${db}`;
  return u.toString();
}

export async function createTestDatabase(): Promise<TestDatabase> {
  const adminUrl = inject('pgAdminUrl');
  const name = `allocator_test_${randomBytes(6).toString('hex')}`;
  const admin = new pg.Client(adminUrl);
  await admin.connect();
  try {
    await admin.query(`create database ${name} template ${inject('pgTemplate')}`);
  } finally {
    await admin.end();
  }
  const url = urlWithDb(adminUrl, name);
  const pool = new pg.Pool({ connectionString: url, max: 20 });
  quietPoolOnTermination(pool);
  const clients: pg.Client[] = [];
  return {
    url,
    name,
    pool,
    async client() {
      const c = new pg.Client(url);
      quietOnTermination(c);
      await c.connect();
      clients.push(c);
      return c;
    },
    async drop() {
      await Promise.all(clients.map((c) => c.end().catch(() => {})));
      await pool.end();
      const a = new pg.Client(adminUrl);
      await a.connect();
      await a.query(`drop database if exists ${name} with (force)`);
      await a.end();
    },
  };
}
