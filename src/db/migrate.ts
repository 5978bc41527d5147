import path from 'node:path';
import { readdir, readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { Logger, migrate } from 'graphile-migrate';
// Not re-exported by the package's index; no `exports` map, so the deep import is stable within 1.x.
import { clearAllPools } from 'graphile-migrate/dist/pgReal.js';
import pg from 'pg';

/** The folder with the committed migrations (graphile-migrate's `migrationsFolder`, as in .gmrc). */
export const migrationsFolder = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../db');

/**
 * Brings the database to the current schema with graphile-migrate (committed migrations only). Safe to run from
 * several processes at once: graphile-migrate serialises them with an advisory lock.
 */
export async function runMigrations(connectionString: string, log: (msg: string) => void = () => {}): Promise<void> {
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
  // graphile-migrate keeps its pool 200 ms after use, and exits the process if an idle client of that pool errors
  // (a PostgreSQL restart in that window would kill a long-running `npm start`): end it now.
  clearAllPools();
}

/** The hash of the newest committed migration (its `--! Hash:` header), which graphile-migrate records when applied. */
export async function latestMigrationHash(): Promise<string> {
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

/** graphile-migrate's default logger prints to the console; route its lines to ours instead. */
function quietLogger(log: (msg: string) => void): Logger {
  return new Logger(() => (level, message) => log(level === 'info' ? message : `${level}: ${message}`));
}
