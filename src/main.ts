/**
 * `npm start`: the whole service in one process. Without DATABASE_URL it runs an embedded PostgreSQL with its data
 * in DATA_DIR (.data/postgres; kept across restarts), in a process group of its own (src/db/detached-postgres.ts),
 * then migrations, the webhook app and the listener.
 * Ctrl-C: stop taking webhooks, let assignments in flight finish and report back (a second Ctrl-C hands them back to
 * the queue), then stop PostgreSQL cleanly. Ctrl-C does not reach PostgreSQL itself: it keeps running until then.
 *
 * Without WEBHOOK_SECRET it uses one it generated on the first run and keeps beside DATA_DIR (src/config/
 * webhook-secret.ts), and prints the webhook URLs with it.
 */
import pg from 'pg';
import { loadConfigOrExit } from './config/index.ts';
import { loadOrCreateWebhookSecret, webhookSecretFile } from './config/webhook-secret.ts';
import { startDetachedPostgres, type DetachedPostgres } from './db/detached-postgres.ts';
import { runMigrations } from './db/migrate.ts';
import { createPool } from './db/pool.ts';
import { startWebFromConfig } from './http/server.ts';
import { startListenerFromConfig } from './listener/listener.ts';
import { createListenerMetrics } from './listener/metrics.ts';
import { createLogger } from './log.ts';
import { createMetricsRegistry } from './metrics/index.ts';
import { onShutdown } from './shutdown.ts';

const env = loadConfigOrExit('start');
const logger = createLogger(env.LOG_LEVEL, 'allocator');
process.on('unhandledRejection', (err) => logger.error({ err: String(err) }, 'unhandled promise rejection'));

// Secure by default: with no WEBHOOK_SECRET, the one generated on the first run (the same on every later run).
const secretFile = webhookSecretFile(env.DATA_DIR);
const generated = env.WEBHOOK_SECRET ? undefined : await loadOrCreateWebhookSecret(secretFile);
if (generated?.created) logger.info({ file: secretFile }, 'generated a webhook secret (WEBHOOK_SECRET was not set)');
const config = { ...env, WEBHOOK_SECRET: env.WEBHOOK_SECRET ?? generated?.secret };

let embedded: DetachedPostgres | undefined;
let databaseUrl = config.DATABASE_URL;
if (!databaseUrl) {
  embedded = await startDetachedPostgres({
    dataDir: config.DATA_DIR,
    port: config.EMBEDDED_PG_PORT,
    onLog: (line) => logger.debug({ postgres: line.trim() }),
  }).catch((e: unknown) => {
    logger.fatal({ err: String(e) }, `cannot start the embedded PostgreSQL in ${config.DATA_DIR}`);
    process.exit(1);
  });
  const admin = new pg.Client(embedded.url);
  await admin.connect();
  const exists = await admin.query(`select 1 from pg_database where datname = 'allocator'`);
  if (exists.rowCount === 0) await admin.query(`create database allocator`);
  await admin.end();
  databaseUrl = embedded.urlFor('allocator');
  logger.info({ dataDir: config.DATA_DIR }, `embedded PostgreSQL: psql ${databaseUrl}`);
}

await runMigrations(databaseUrl, (line) => logger.debug(line));
const pool = createPool(databaseUrl, logger, { max: config.LISTENER_CONCURRENCY + 10 });
// One registry for the web and listener metrics (and the queue gauges once), served at the app's GET /metrics:
// one process, one scrape target, no METRICS_PORT.
const metrics = createMetricsRegistry();
const web = await startWebFromConfig(config, { pool, logger, metrics });
const listener = await startListenerFromConfig(config, {
  pool,
  databaseUrl,
  logger,
  metrics: createListenerMetrics(metrics),
});

const base = (config.PUBLIC_URL ?? web.url).replace(/\/+$/, '');
const secret = config.WEBHOOK_SECRET ? `?secret=${encodeURIComponent(config.WEBHOOK_SECRET)}` : '';
process.stdout.write(
  [
    '',
    'Qiscus agent allocator is running. In Qiscus Omnichannel (Settings), paste:',
    `  Custom Agent Allocation webhook:  ${base}/api/v1/new_request${secret}`,
    `  Mark as Resolved webhook:         ${base}/api/v1/close_request${secret}`,
    ...(config.PUBLIC_URL ? [] : ['  (replace the host with the address Qiscus can reach, or set PUBLIC_URL)']),
    ...(generated
      ? [`  (the secret was generated on the first run and is kept in ${secretFile}; WEBHOOK_SECRET overrides it)`]
      : []),
    '',
    config.DASHBOARD_TOKEN
      ? `Dashboard: ${base}/dashboard (log in with DASHBOARD_TOKEN)`
      : 'Dashboard: off (set DASHBOARD_TOKEN to have one at /dashboard)',
    `Health: ${web.url}/healthz   Readiness: ${web.url}/readyz   Metrics: ${web.url}/metrics`,
    `Queue:  psql ${databaseUrl} -c 'table allocator.queue'`,
    '',
  ].join('\n') + '\n',
);

onShutdown(logger, {
  graceful: async () => {
    await web.stop();
    await listener.stop();
    await pool.end();
    await embedded?.stop();
  },
  hurry: async () => {
    await listener.abandon();
    await pool.end().catch(() => {});
    await embedded?.stop();
  },
});
