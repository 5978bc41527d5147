/**
 * `npm run web`: the webhook app alone, against DATABASE_URL, on PORT. Any number may run against one database.
 *
 * SIGINT/SIGTERM (src/shutdown.ts, like every entry point): stop accepting, finish in-flight webhooks (see
 * server.ts), close the pool, exit 0. A second signal exits at once: a webhook cut off is resent by Qiscus.
 */
import { loadConfigOrExit } from '../config/index.ts';
import { createLogger } from '../log.ts';
import { createPool } from '../db/pool.ts';
import { createMetricsRegistry } from '../metrics/index.ts';
import { onShutdown } from '../shutdown.ts';
import { startWebFromConfig } from './server.ts';

const config = loadConfigOrExit('web');
const logger = createLogger(config.LOG_LEVEL, 'web');

// Never die of an error nobody awaited: log it and keep serving (every request path catches its own errors).
process.on('unhandledRejection', (err) => logger.error({ err }, 'unhandled promise rejection'));

const pool = createPool(config.DATABASE_URL!, logger, { applicationName: 'allocator-web' });
// GET /metrics on the same port: webhook metrics, the queue read from the database, process metrics.
const web = await startWebFromConfig(config, { pool, logger, metrics: createMetricsRegistry() }).catch((err: unknown) => {
  logger.fatal({ err }, `cannot listen on port ${config.PORT}`);
  process.exit(1);
});
logger.info({ port: web.port, secret: config.WEBHOOK_SECRET ? 'required' : 'not set' }, `web listening on ${web.url}`);

onShutdown(logger, {
  graceful: async () => {
    await web.stop();
    await pool.end().catch((err: unknown) => logger.warn({ err }, 'closing the pool failed'));
    logger.info('stopped');
  },
});
