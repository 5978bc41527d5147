/**
 * `npm run migrate` on an empty database and on a database left at every earlier version.
 */
import { execFile } from 'node:child_process';
import { cp, mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { gunzipSync } from 'node:zlib';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { migrate } from 'graphile-migrate';
import pg from 'pg';
import { afterAll, describe, expect, inject, it } from 'vitest';
import { migrationsApplied, migrationsFolder } from '../../src/db/migrate.ts';
import { quietPoolOnTermination } from '../support/db.ts';

const run = promisify(execFile);
const releasedFolder = path.resolve(import.meta.dirname, '../fixtures/released-migrations');
const adminUrl = inject('pgAdminUrl');
const created: string[] = [];

async function emptyDatabase(): Promise<string> {
  const name = `allocator_mig_${Math.random().toString(36).slice(2, 10)}`;
  const c = new pg.Client(adminUrl);
  await c.connect();
  await c.query(`create database ${name}`);
  await c.end();
  created.push(name);
  const u = new URL(adminUrl);
  u.pathname = `/${name}`;
  return u.toString();
}

async function npmMigrate(url: string) {
  return run(process.execPath, ['--import', 'tsx', 'src/cli/migrate.ts'], { env: { ...process.env, DATABASE_URL: url } });
}

afterAll(async () => {
  const c = new pg.Client(adminUrl);
  await c.connect();
  for (const db of created) await c.query(`drop database if exists ${db} with (force)`);
  await c.end();
});

/**
 * What db/code defines in a database: its functions (with their signatures), views (with their definitions) and
 * triggers (with their table, definition and function).
 */
async function codeObjects(db: pg.Pool | pg.Client): Promise<Record<'functions' | 'views' | 'triggers', string[]>> {
  const list = async (sql: string) => (await db.query<{ x: string }>(sql)).rows.map((r) => r.x);
  return {
    functions: await list(`select p.oid::regprocedure::text as x from pg_proc p
                           where p.pronamespace = 'allocator'::regnamespace order by 1`),
    views: await list(`select format('%s: %s', viewname, definition) as x from pg_views where schemaname = 'allocator'
                       union all
                       select format('%s (materialized): %s', matviewname, definition) from pg_matviews
                       where schemaname = 'allocator' order by 1`),
    triggers: await list(`select format('%s on %s calls %s: %s', t.tgname, t.tgrelid::regclass, t.tgfoid::regprocedure,
                                        pg_get_triggerdef(t.oid)) as x
                          from pg_trigger t join pg_class c on c.oid = t.tgrelid
                          where c.relnamespace = 'allocator'::regnamespace and not t.tgisinternal order by 1`),
  };
}

/** The code objects of a database migrated from empty (a copy of the test template). */
async function currentCodeObjects(): Promise<Record<'functions' | 'views' | 'triggers', string[]>> {
  const c = new pg.Client(adminUrl);
  await c.connect();
  const name = `allocator_fresh_${Math.random().toString(36).slice(2, 10)}`;
  await c.query(`create database ${name} template ${inject('pgTemplate')}`);
  await c.end();
  created.push(name);
  const u = new URL(adminUrl);
  u.pathname = `/${name}`;
  const f = new pg.Client(u.toString());
  await f.connect();
  try {
    return await codeObjects(f);
  } finally {
    await f.end();
  }
}

describe('migrations', () => {
  it('bring an empty database to the current schema, and a second run changes nothing', async () => {
    const url = await emptyDatabase();
    const first = await npmMigrate(url);
    expect(first.stdout).toContain('migrations: up to date');
    await npmMigrate(url);
    const pool = new pg.Pool({ connectionString: url });
    quietPoolOnTermination(pool);
    expect(await migrationsApplied(pool)).toBe(true);
    const s = await pool.query(`select value from allocator.settings where key = 'default_max_load'`);
    expect(s.rows[0].value).toBe('2');
    await pool.end();
  });

  it('bring a database at every earlier version to the current one', { timeout: 120_000 }, async () => {
    const files = (await readdir(path.join(migrationsFolder, 'committed'))).filter((f) => f.endsWith('.sql')).sort();
    const current = await currentCodeObjects();
    expect(current.views.length * current.triggers.length, 'views and triggers to compare').toBeGreaterThan(0);
    for (let upTo = 1; upTo < files.length; upTo++) {
      // a migrations folder holding only the first `upTo` migrations stands for an older release
      const old = path.join(os.tmpdir(), `allocator-old-${upTo}-${process.pid}`);
      await mkdir(path.join(old, 'committed'), { recursive: true });
      for (const f of files.slice(0, upTo)) {
        // migrations later edited to hold the schema alone are kept as released (functions and all) in fixtures
        const released = path.join(releasedFolder, `${f}.gz`);
        const text = await readFile(released).then((z) => gunzipSync(z), () => null);
        if (text) await writeFile(path.join(old, 'committed', f), text);
        else await cp(path.join(migrationsFolder, 'committed', f), path.join(old, 'committed', f));
      }
      const url = await emptyDatabase();
      await migrate({ connectionString: url, migrationsFolder: old } as Parameters<typeof migrate>[0]);
      await rm(old, { recursive: true, force: true });
      await npmMigrate(url);
      const pool = new pg.Pool({ connectionString: url });
      quietPoolOnTermination(pool);
      expect(await migrationsApplied(pool)).toBe(true);
      // the same functions, views and triggers as a new database: one current definition each, none left from
      // the old release
      expect(await codeObjects(pool), `upgraded from migration ${upTo}`).toEqual(current);
      await pool.end();
    }
    expect(files.length).toBeGreaterThanOrEqual(1);
  });

  it('stops with one line naming DATABASE_URL when it is missing', async () => {
    const env = { ...process.env };
    delete env.DATABASE_URL;
    const err = await run(process.execPath, ['--import', 'tsx', 'src/cli/migrate.ts'], { env }).catch((e) => e);
    expect(err.code).toBe(2);
    expect(err.stderr.trim()).toMatch(/^configuration error: DATABASE_URL is required/);
    expect(err.stderr.trim().split('\n')).toHaveLength(1);
  });
});
