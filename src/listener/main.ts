/**
 * `npm run listener`: assigns waiting rooms through Qiscus. Any number may run against one database.
 * Metrics (and a /healthz) on METRICS_PORT; 0 picks a free port, logged at start.
 */
import { loadConfigOrExit } from '../config/index.ts';
import { createPool } from '../db/pool.ts';
import { createLogger } from '../log.ts';
import { createMetricsRegistry, registerQueueMetrics, startMetricsServer, type MetricsServer } from '../metrics/index.ts';
import { onShutdown } from '../shutdown.ts';
import { startListenerFromConfig } from './listener.ts';
import { createListenerMetrics } from './metrics.ts';

const config = loadConfigOrExit('listener');
const logger = createLogger(config.LOG_LEVEL, 'listener');
const pool = createPool(config.DATABASE_URL!, logger, {
  max: config.LISTENER_CONCURRENCY + 4,
  applicationName: 'allocator-listener',
});

const registry = createMetricsRegistry();
registerQueueMetrics(registry, pool, { logger });
const metrics = createListenerMetrics(registry);
// Up before the listener, which may wait for the database: /healthz answers meanwhile. A port already taken (two
// listeners on one host with the default port) costs the metrics, not the assignments: log it and carry on.
let metricsServer: MetricsServer | undefined;
try {
  metricsServer = await startMetricsServer({ registry, port: config.METRICS_PORT, logger });
  logger.info({ port: metricsServer.port }, `metrics on ${metricsServer.url}/metrics`);
} catch (err) {
  logger.error(
    { err: String(err), port: config.METRICS_PORT },
    `cannot serve metrics on port ${config.METRICS_PORT} (METRICS_PORT=0 picks a free one); running without`,
  );
}

const listener = await startListenerFromConfig(config, { pool, databaseUrl: config.DATABASE_URL!, logger, metrics });
logger.info({ qiscus: config.QISCUS_BASE_URL, concurrency: config.LISTENER_CONCURRENCY }, 'listener started');

onShutdown(logger, {
  graceful: async () => {
    await listener.stop();
    await metricsServer?.stop();
    await pool.end();
  },
  hurry: () => listener.abandon(),
});
