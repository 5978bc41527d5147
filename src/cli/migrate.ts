/** `npm run migrate`: brings DATABASE_URL to the current schema and code (db/committed, then db/code: src/db/migrate.ts). */
import { loadConfigOrExit } from '../config/index.ts';
import { runMigrations } from '../db/migrate.ts';

const config = loadConfigOrExit('migrate');
try {
  await runMigrations(config.DATABASE_URL!, (line) => console.log(line));
  console.log('migrations: up to date');
} catch (e) {
  console.error(`migrate failed: ${(e as Error).message}`);
  process.exit(1);
}
