import pg from 'pg';
import type { Logger } from '../log.ts';

/**
 * A pg pool that survives PostgreSQL going away: an idle client that dies (restart, failover) emits 'error' on
 * the pool, which would crash the process if nobody listened. Acquiring a client fails fast instead of queueing
 * forever, so callers can answer 503 or retry.
 */
export function createPool(connectionString: string, logger: Logger, max = 10): pg.Pool {
  const pool = new pg.Pool({ connectionString, max, connectionTimeoutMillis: 2000, idleTimeoutMillis: 30_000 });
  pool.on('error', (e) => logger.warn({ err: e.message }, 'idle database connection lost'));
  return pool;
}
