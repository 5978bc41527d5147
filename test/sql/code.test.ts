/**
 * The db/code step of `npm run migrate`: functions, views and triggers applied from files after the migrations.
 * Proven here: a second run changes nothing; concurrent runs; a new release whose function changed signature and
 * whose view changed columns leaves no stale object behind; tables, indexes, constraints and data are untouched;
 * a DBA's own agent_preference() survives; and a web app and a listener keep assigning rooms while it runs.
 */
import { execFile } from 'node:child_process';
import { cp, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';
import { afterAll, afterEach, describe, expect, inject, it } from 'vitest';
import { applyCode, codeFolder, readCode } from '../../src/db/migrate.ts';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { eventually, startStack, type Stack } from '../support/processes.ts';
import { invariants } from '../support/sql.ts';

const run = promisify(execFile);
const adminUrl = inject('pgAdminUrl');
const created: string[] = [];
let db: TestDatabase | undefined;
let stack: Stack | undefined;

afterEach(async () => {
  await stack?.stop();
  await db?.drop();
  stack = undefined;
  db = undefined;
});
afterAll(async () => {
  const c = new pg.Client(adminUrl);
  await c.connect();
  for (const name of created) await c.query(`drop database if exists ${name} with (force)`);
  await c.end();
});

async function emptyDatabase(): Promise<string> {
  const name = `allocator_code_${Math.random().toString(36).slice(2, 10)}`;
  const c = new pg.Client(adminUrl);
  await c.connect();
  await c.query(`create database ${name}`);
  await c.end();
  created.push(name);
  const u = new URL(adminUrl);
  u.pathname = `/${name}`;
  return u.toString();
}

const npmMigrate = (url: string) =>
  run(process.execPath, ['--import', 'tsx', 'src/cli/migrate.ts'], { env: { ...process.env, DATABASE_URL: url } });

/** Everything of schema allocator that is not code: tables, indexes, constraints, sequences, types, columns. */
async function schemaObjects(c: pg.ClientBase): Promise<string[]> {
  const r = await c.query<{ o: string }>(`
    select format('%s %s', c.relkind, c.relname) as o from pg_class c
     where c.relnamespace = 'allocator'::regnamespace and c.relkind not in ('v', 'm')
    union all
    select format('constraint %s', conname) from pg_constraint where connamespace = 'allocator'::regnamespace
    union all
    select format('column %s.%s', c.relname, a.attname) from pg_attribute a join pg_class c on c.oid = a.attrelid
     where c.relnamespace = 'allocator'::regnamespace and c.relkind = 'r' and a.attnum > 0 and not a.attisdropped
    order by 1`);
  return r.rows.map((x) => x.o);
}

async function routines(c: pg.ClientBase, name: string): Promise<string[]> {
  const r = await c.query<{ f: string }>(
    `select p.oid::regprocedure::text as f from pg_proc p where p.pronamespace = 'allocator'::regnamespace and p.proname = $1`,
    [name],
  );
  return r.rows.map((x) => x.f);
}

/** A copy of db/code with `edit` applied to one file: a new release. */
async function release(file: string, edit: (sql: string) => string): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'allocator-code-'));
  await cp(codeFolder, dir, { recursive: true });
  const f = path.join(dir, file);
  const before = await readFile(f, 'utf8');
  const after = edit(before); // (replace with a function: in a replacement string `$$` means `$`)
  expect(after).not.toBe(before);
  await writeFile(f, after);
  return dir;
}

/** priority_of() gains a parameter, the queue view loses a column and gains another. */
const nextRelease = () =>
  Promise.all([
    release('08-rules.sql', (s) =>
      s
        .replace('allocator.priority_of(room_source text)', () => 'allocator.priority_of(room_source text, fallback integer default 0)')
        .replace('where p.source = room_source), 0) $$;', () => 'where p.source = room_source), fallback) $$;'),
    ),
  ]).then(async ([dir]) => {
    const views = path.join(dir!, '10-views.sql');
    const sql = await readFile(views, 'utf8');
    await writeFile(views, sql.replace('         s.priority,\n         s.source,', () => "         s.source,\n         'v2'::text as release,"));
    return dir!;
  });

describe('db/code', () => {
  it('is applied once: a second migrate with the same files changes nothing', async () => {
    const url = await emptyDatabase();
    expect((await npmMigrate(url)).stdout).toContain('db/code applied');
    expect((await npmMigrate(url)).stdout).not.toContain('db/code applied');
    const c = new pg.Client(url);
    await c.connect();
    const applied = await c.query(`select hash from allocator.code_version`);
    expect(applied.rows[0].hash).toBe((await readCode()).hash);
    await c.end();
  });

  it('concurrent migrates on an empty database all succeed and leave one definition of each function', async () => {
    const url = await emptyDatabase();
    const results = await Promise.allSettled([1, 2, 3, 4].map(() => npmMigrate(url)));
    expect(results.map((r) => r.status)).toEqual(['fulfilled', 'fulfilled', 'fulfilled', 'fulfilled']);
    const c = new pg.Client(url);
    await c.connect();
    const dup = await c.query(`select proname, count(*)::int as n from pg_proc where pronamespace = 'allocator'::regnamespace
                               group by proname having count(*) > 1`);
    expect(dup.rows).toEqual([]);
    expect(await routines(c, 'reserve')).toEqual(['allocator.reserve(integer,integer)']);
    await c.end();
  });

  it('a release whose function changed signature and whose view changed columns leaves nothing stale; schema and data untouched', async () => {
    db = await createTestDatabase();
    const c = await db.client();
    await c.query(`insert into allocator.agents (id) values (1)`);
    await c.query(`select allocator.accept_new_request('{"room_id": "r1", "source": "wa"}')`);
    const before = await schemaObjects(c);
    const dir = await nextRelease();
    try {
      expect(await applyCode(c, dir)).toBe(true);
      expect(await routines(c, 'priority_of')).toEqual(['allocator.priority_of(text,integer)']);
      const q = await c.query(`select * from allocator.queue`);
      expect(q.fields.map((f) => f.name)).toContain('release');
      expect(q.fields.map((f) => f.name)).not.toContain('priority');
      expect(q.rows).toMatchObject([{ room_id: 'r1', release: 'v2' }]);
      // triggers came back with their functions: a new room still gets its priority and wakes listeners
      await c.query(`insert into allocator.source_priority values ('wa', 5)`);
      expect((await c.query(`select priority from allocator.sessions`)).rows[0].priority).toBe(5);
      expect(await schemaObjects(c)).toEqual(before);
      // and back to this release
      expect(await applyCode(c)).toBe(true);
      expect(await routines(c, 'priority_of')).toEqual(['allocator.priority_of(text)']);
      expect(await schemaObjects(c)).toEqual(before);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("keeps a DBA's own agent_preference() across a release", async () => {
    db = await createTestDatabase();
    const c = await db.client();
    // a DBA's rule: highest id first
    await c.query(`create or replace function allocator.agent_preference() returns setof allocator.agents
                   language sql stable as $$ select a.* from allocator.agents a where a.accepting order by a.id desc $$`);
    const dir = await nextRelease();
    try {
      expect(await applyCode(c, dir)).toBe(true);
      const src = await c.query(`select prosrc from pg_proc where proname = 'agent_preference'`);
      expect(src.rows[0].prosrc).toContain('order by a.id desc');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('runs while a web app and a listener assign rooms: every webhook answered, every room assigned', { timeout: 120_000 }, async () => {
    db = await createTestDatabase();
    stack = await startStack({
      databaseUrl: db.url,
      listeners: 1,
      sim: { agents: Array.from({ length: 10 }, (_, i) => ({ id: i + 1 })) },
    });
    const { sim } = stack;
    const dir = await nextRelease();
    const c = await db.client();
    const statuses: number[] = [];
    let n = 0;
    // Rooms arrive and are resolved throughout; meanwhile two releases are applied, back and forth.
    const traffic = (async () => {
      for (; n < 120; n++) {
        const room = `m${n}`;
        statuses.push((await sim.sendNewRequest(room)).status);
        if (n >= 10) void sim.resolve(`m${n - 10}`).then((r) => statuses.push(r.status));
        await new Promise((r) => setTimeout(r, 10));
      }
    })();
    try {
      for (let i = 0; i < 3; i++) {
        expect(await applyCode(c, dir)).toBe(true);
        expect(await applyCode(c)).toBe(true);
      }
      await traffic;
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
    expect(statuses.filter((s) => s !== 200)).toEqual([]);
    // the last 10 rooms are still open: all assigned within 5 s, none twice, nobody over capacity
    await eventually('every room assigned', async () => {
      const r = await db!.pool.query(`select count(*)::int as n from allocator.sessions where state in ('waiting', 'reserved')`);
      return r.rows[0].n === 0;
    }, 5_000);
    const capacity = (await db.pool.query(`select allocator.default_max_load() as c`)).rows[0].c;
    expect(sim.maxLoadSeenAll()).toBeLessThanOrEqual(capacity);
    for (let i = 0; i < 120; i++) expect(sim.assignCount(`m${i}`)).toBeLessThanOrEqual(1);
    expect(await invariants(db.pool)).toEqual([]);
  });
});
