/**
 * Developer tool: `npm run db:commit -- --message "what changed"` commits db/current.sql as the next migration
 * with graphile-migrate, against a throwaway embedded PostgreSQL (graphile-migrate needs a shadow database to
 * prove the migration applies cleanly). A first argument that is not an option names another graphile-migrate
 * command instead of `commit`; but each run starts from empty databases, so commands that read the dev database's
 * history (status, uncommit) fail or say nothing useful here.
 */
import { execFileSync } from 'node:child_process';
import { rm } from 'node:fs/promises';
import path from 'node:path';
import pg from 'pg';
import { startEmbeddedPostgres, tempDataDir } from '../db/embedded.ts';

const args = process.argv.slice(2);
const gmArgs = args[0] && !args[0].startsWith('-') ? args : ['commit', ...args];
const dataDir = await tempDataDir('allocator-gm-');
const srv = await startEmbeddedPostgres({ dataDir, persistent: false });
try {
  const c = new pg.Client(srv.url);
  await c.connect();
  for (const db of ['allocator_dev', 'allocator_shadow']) await c.query(`create database ${db}`);
  await c.end();
  execFileSync('npx', ['graphile-migrate', ...gmArgs], {
    stdio: 'inherit',
    env: {
      ...process.env,
      DATABASE_URL: srv.urlFor('allocator_dev'),
      SHADOW_DATABASE_URL: srv.urlFor('allocator_shadow'),
      ROOT_DATABASE_URL: srv.urlFor('postgres'),
    },
  });
} finally {
  await srv.stop();
  await rm(path.dirname(dataDir), { recursive: true, force: true });
}
