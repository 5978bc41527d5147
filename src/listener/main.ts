/** `npm run listener`: assigns waiting rooms through Qiscus. Any number may run against one database. */
import { loadConfigOrExit } from '../config/index.ts';
import { createPool } from '../db/pool.ts';
import { createLogger } from '../log.ts';
import { createQiscusClient } from '../qiscus/client.ts';
import { onShutdown } from '../shutdown.ts';
import { startListener } from './listener.ts';

const config = loadConfigOrExit('listener');
const logger = createLogger(config.LOG_LEVEL, 'listener');
const pool = createPool(config.DATABASE_URL!, logger, config.LISTENER_CONCURRENCY + 4);
const qiscus = createQiscusClient({
  baseUrl: config.QISCUS_BASE_URL,
  appId: config.QISCUS_APP_ID!,
  secretKey: config.QISCUS_SECRET_KEY!,
  responseTimeoutMs: config.QISCUS_TIMEOUT_MS,
});

const listener = await startListener({
  pool,
  databaseUrl: config.DATABASE_URL!,
  qiscus,
  logger,
  concurrency: config.LISTENER_CONCURRENCY,
  sweepSeconds: config.SWEEP_SECONDS,
  syncSeconds: config.AGENT_SYNC_SECONDS,
  onOutcome: (r, outcome, ms, error) =>
    logger.info(
      { room: r.room_id, agent: Number(r.agent_id), attempt: r.attempt, outcome, ms: Math.round(ms), error },
      'assignment',
    ),
});
logger.info({ qiscus: config.QISCUS_BASE_URL, concurrency: config.LISTENER_CONCURRENCY }, 'listener started');

onShutdown(logger, {
  graceful: async () => {
    await listener.stop();
    await pool.end();
  },
  hurry: () => listener.abandon(),
});
