/** `npm run listener`: assigns waiting rooms through Qiscus. Any number may run against one database. */
import { loadConfigOrExit } from '../config/index.ts';
import { createPool } from '../db/pool.ts';
import { createLogger } from '../log.ts';
import { onShutdown } from '../shutdown.ts';
import { startListenerFromConfig } from './listener.ts';

const config = loadConfigOrExit('listener');
const logger = createLogger(config.LOG_LEVEL, 'listener');
const pool = createPool(config.DATABASE_URL!, logger, {
  max: config.LISTENER_CONCURRENCY + 4,
  applicationName: 'allocator-listener',
});
const listener = await startListenerFromConfig(config, { pool, databaseUrl: config.DATABASE_URL!, logger });
logger.info({ qiscus: config.QISCUS_BASE_URL, concurrency: config.LISTENER_CONCURRENCY }, 'listener started');

onShutdown(logger, {
  graceful: async () => {
    await listener.stop();
    await pool.end();
  },
  hurry: () => listener.abandon(),
});
