import { createHash } from 'node:crypto';
import path from 'node:path';
import { readdir, readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { Logger, migrate } from 'graphile-migrate';
// Not re-exported by the package's index; no `exports` map, so the deep import is stable within 1.x.
import { clearAllPools } from 'graphile-migrate/dist/pgReal.js';
import pg from 'pg';
import { isLockConflict } from './errors.ts';

/** The folder with the committed migrations (graphile-migrate's `migrationsFolder`, as in .gmrc). */
export const migrationsFolder = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../db');
/** The functions, views and triggers: idempotent SQL, one file per concern, applied in file-name order. */
export const codeFolder = path.join(migrationsFolder, 'code');

/** Advisory lock (two-key form) that serialises whole `npm run migrate` runs: migrations and code together. */
const MIGRATE_LOCK = [1366, 1] as const;

/**
 * Brings the database to the current schema and code:
 *   1. graphile-migrate applies the committed migrations (tables, columns, indexes, data);
 *   2. the db/code files are applied, when they differ from the ones applied last (see applyCode).
 * Safe to run from several processes at once (an advisory lock serialises whole runs) and while web and listener
 * processes use the database (see applyCode).
 */
export async function runMigrations(connectionString: string, log: (msg: string) => void = () => {}): Promise<void> {
  const client = new pg.Client({ connectionString, application_name: 'allocator-migrate' });
  await client.connect();
  try {
    await client.query(`select pg_advisory_lock($1, $2)`, [...MIGRATE_LOCK]);
    await migrate(
      {
        connectionString,
        migrationsFolder,
        manageGraphileMigrateSchema: true,
        logger: quietLogger(log),
      } as Parameters<typeof migrate>[0],
      false,
      false,
    );
    if (await applyCode(client)) log('db/code applied');
  } finally {
    // graphile-migrate keeps its pool 200 ms after use, and exits the process if an idle client of that pool
    // errors (a PostgreSQL restart in that window would kill a long-running `npm start`): end it now.
    clearAllPools();
    await client.end().catch(() => {}); // ending the session releases the advisory lock
  }
}

export interface CodeFile {
  name: string;
  sql: string;
}

/** The db/code files in the order they are applied, and their hash. */
export async function readCode(folder = codeFolder): Promise<{ files: CodeFile[]; hash: string }> {
  const names = (await readdir(folder)).filter((f) => f.endsWith('.sql')).sort();
  const files = await Promise.all(names.map(async (name) => ({ name, sql: await readFile(path.join(folder, name), 'utf8') })));
  const hash = createHash('sha256');
  for (const f of files) hash.update(`-- ${f.name}\n${f.sql}\n`);
  return { files, hash: hash.digest('hex') };
}

/**
 * Drops every function and view of schema `allocator` (triggers go with their functions), so that a function
 * whose signature changed or a view whose columns changed leaves nothing behind. Tables, indexes, constraints and
 * data are untouched: no table-level object may depend on a db/code function (test/sql/code.test.ts checks it).
 */
const DROP_CODE = `
do $$
declare
  views    text[] := array(select format('%I.%I', 'allocator', c.relname) from pg_class c
                           where c.relnamespace = 'allocator'::regnamespace and c.relkind in ('v', 'm'));
  routines text[] := array(select p.oid::regprocedure::text from pg_proc p
                           where p.pronamespace = 'allocator'::regnamespace);
  name     text;
begin
  -- names first, as text: a cascade may drop objects further down the list
  foreach name in array views loop
    execute format('drop view if exists %s cascade', name);
  end loop;
  foreach name in array routines loop
    execute format('drop routine if exists %s cascade', name);
  end loop;
end;
$$`;

/** md5 of agent_preference()'s body as migration 1 shipped it, to tell it from a DBA's own rule. */
const PREFERENCE_V1_MD5 = '875eaa14c8d0343282502caf7bedd033';

/**
 * Applies the db/code files in one transaction, unless the hash recorded in allocator.code_version says they
 * are applied already. Web and listener processes may be running: their calls wait for the commit (a fraction
 * of a second) and use the new definitions after it. The transaction takes the locks of the tables with
 * triggers first, all at once with a short lock_timeout, and starts over on a timeout, so it never stalls the
 * allocator for long and always gives way to it. A DBA's own agent_preference() (one that differs from the definition we applied last)
 * is put back after the files. Returns whether anything was applied.
 */
export async function applyCode(client: pg.ClientBase, folder = codeFolder): Promise<boolean> {
  const { files, hash } = await readCode(folder);
  for (let attempt = 1; ; attempt++) {
    try {
      await client.query('begin');
      await client.query(`set local lock_timeout = '500ms'`);
      const applied = (await client.query(`select hash, preference_md5 from allocator.code_version`)).rows[0];
      if (applied?.hash === hash) {
        await client.query('rollback');
        return false;
      }
      const before = await preference(client);
      const custom = before && before.md5 !== (applied?.preference_md5 ?? PREFERENCE_V1_MD5) ? before : null;

      // Dropping a trigger takes an ACCESS EXCLUSIVE lock on its table: take them all at once, first, so that
      // the transaction never holds one lock while upgrading another (a deadlock with a webhook in flight).
      await client.query(
        `lock table allocator.sessions, allocator.agents, allocator.settings, allocator.source_priority
         in access exclusive mode`,
      );
      await client.query(DROP_CODE);
      for (const f of files) {
        try {
          await client.query(f.sql);
        } catch (e) {
          throw new Error(`db/code/${f.name}: ${(e as Error).message}`, { cause: e });
        }
      }
      const shipped = await preference(client);
      if (custom) {
        await client.query('savepoint custom_preference');
        try {
          await client.query(custom.def);
        } catch {
          // The DBA's rule no longer fits (its return type changed): ours stands; the DBA re-applies theirs.
          await client.query('rollback to savepoint custom_preference');
        }
      }
      await client.query(
        `insert into allocator.code_version (hash, preference_md5) values ($1, $2)
         on conflict (singleton) do update set hash = excluded.hash, preference_md5 = excluded.preference_md5,
                                               applied_at = now()`,
        [hash, shipped?.md5 ?? null],
      );
      await client.query('commit');
      return true;
    } catch (e) {
      await client.query('rollback').catch(() => {});
      // Our lock_timeout, or a deadlock: the allocator was busy; try again shortly.
      if (isLockConflict(e) && attempt < 100) {
        await new Promise((r) => setTimeout(r, Math.min(50 * attempt, 1000) * (0.5 + Math.random())));
        continue;
      }
      throw e;
    }
  }
}

async function preference(client: pg.ClientBase): Promise<{ def: string; md5: string } | null> {
  const r = await client.query<{ def: string; md5: string }>(
    `select pg_get_functiondef(p.oid) as def, md5(p.prosrc) as md5 from pg_proc p
     where p.pronamespace = 'allocator'::regnamespace and p.proname = 'agent_preference'`,
  );
  return r.rows.length === 1 ? r.rows[0]! : null;
}

/** The hash of the newest committed migration (its `--! Hash:` header), which graphile-migrate records when applied. */
async function latestMigrationHash(): Promise<string> {
  const dir = path.join(migrationsFolder, 'committed');
  const files = (await readdir(dir)).filter((f) => /^\d+.*\.sql$/.test(f)).sort();
  const last = files.at(-1);
  if (!last) throw new Error(`no committed migrations in ${dir}`);
  const hash = /^--! Hash: (\S+)$/m.exec(await readFile(path.join(dir, last), 'utf8'))?.[1];
  if (!hash) throw new Error(`${last} has no "--! Hash:" header`);
  return hash;
}

/**
 * True when the database has every committed migration applied (what /readyz asks): the newest migration on disk
 * is among those applied. A database migrated further by a newer release still counts as ready for this one.
 */
export async function migrationsApplied(client: pg.ClientBase | pg.Pool): Promise<boolean> {
  const expected = await latestMigrationHash();
  const res = await client.query(`select 1 from graphile_migrate.migrations where hash = $1`, [expected]);
  return (res.rowCount ?? 0) > 0;
}

/**
 * graphile-migrate's default logger prints to the console; route its lines to ours instead. Migrations 1 and 2
 * were edited to hold the schema alone (their functions moved to db/code), which graphile-migrate flags on a new
 * database with an alarming note; say what it means instead.
 */
function quietLogger(log: (msg: string) => void): Logger {
  return new Logger(() => (level, message) => {
    const line = message.replace(/ \(🚨 INVALID HASH, allowed via AllowInvalidHash 🚨\)/u, ' (schema only; its code is in db/code)');
    log(level === 'info' ? line : `${level}: ${line}`);
  });
}
