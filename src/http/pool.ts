/**
 * The web process's connection pool. Shared by main.ts and the tests, so that what the tests prove (503 on an
 * outage, recovery after it) holds for the pool that runs in production.
 */
import pg from 'pg';
import type { Logger } from '../log.ts';

export interface WebPoolOptions {
  /** Connections per web process. Each webhook is one short statement, so a few serve hundreds of requests/s. */
  max?: number;
  /**
   * How long a request may wait for a connection (a new one, or a free one from the pool) before it gets 503.
   * Short: with the database away, Qiscus should hear so at once rather than time out.
   */
  connectionTimeoutMillis?: number;
  /** Server-side cap on one statement (57014 → 503): a stuck lock must not hold a request forever. */
  statementTimeoutMillis?: number;
}

export function createWebPool(connectionString: string, logger: Logger, opts: WebPoolOptions = {}): pg.Pool {
  const pool = new pg.Pool({
    connectionString,
    max: opts.max ?? 10,
    connectionTimeoutMillis: opts.connectionTimeoutMillis ?? 2000,
    statement_timeout: opts.statementTimeoutMillis ?? 10_000,
    idleTimeoutMillis: 30_000,
    // Notice a vanished server (host down, network cut) on idle and busy connections alike.
    keepAlive: true,
    application_name: 'allocator-web',
  });
  // An idle client whose server restarts emits 'error' on the pool; unhandled, that would kill the process. The
  // pool drops the client by itself and the next request opens a new one.
  pool.on('error', (err) => logger.warn({ err: { message: err.message, code: (err as { code?: string }).code } },
    'idle database connection lost'));
  return pool;
}
