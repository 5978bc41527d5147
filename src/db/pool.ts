import pg from 'pg';
import type { Logger } from '../log.ts';

export interface PoolOptions {
  /** Connections in this process. Each call is one short statement, so a few serve hundreds per second. */
  max?: number;
  /**
   * How long a caller may wait for a connection before failing: short, so that with the database away the web app
   * answers 503 at once and the listener retries, instead of queueing forever.
   */
  connectionTimeoutMillis?: number;
  /** Server-side cap on one statement: a stuck lock must not hold a request or a listener forever. */
  statementTimeoutMillis?: number;
  /** Shown in pg_stat_activity, so a DBA sees who is connected. */
  applicationName?: string;
}

/**
 * The one pg pool factory. It survives PostgreSQL going away: an idle client that dies (restart, failover) emits
 * 'error' on the pool, which would crash the process if nobody listened; the pool drops it and opens a new one.
 */
export function createPool(connectionString: string, logger: Logger, opts: PoolOptions = {}): pg.Pool {
  const pool = new pg.Pool({
    connectionString,
    max: opts.max ?? 10,
    connectionTimeoutMillis: opts.connectionTimeoutMillis ?? 2000,
    statement_timeout: opts.statementTimeoutMillis ?? 10_000,
    idleTimeoutMillis: 30_000,
    // Notice a vanished server (host down, network cut) on idle and busy connections alike.
    keepAlive: true,
    application_name: opts.applicationName ?? 'allocator',
  });
  pool.on('error', (err) =>
    logger.warn({ err: { message: err.message, code: (err as { code?: string }).code } }, 'idle database connection lost'),
  );
  return pool;
}
