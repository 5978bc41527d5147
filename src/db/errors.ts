/**
 * The one vocabulary for what a failed database call means, shared by the web app (which answers 503, 422 or 500),
 * the listener (which retries a report while the database is away) and anything else that talks to PostgreSQL.
 * The rule: a call that failed because the database is away, overloaded, restarting or in a retryable conflict
 * changed nothing (or changed it idempotently), so the same call again is safe. Anything else is our bug, except
 * data PostgreSQL refused, which is a gap in our validation.
 */

export type DbErrorKind =
  /** Connection refused/reset/timed out, server shutting down, too many connections, deadlock, ...: try again. */
  | 'unavailable'
  /** PostgreSQL refused the data itself (SQLSTATE class 22): a gap in our validation. */
  | 'rejected'
  /** Anything else: a bug. */
  | 'bug';

/** Node socket error codes that mean "could not talk to the server". */
const NETWORK_CODES = new Set([
  'ECONNREFUSED', 'ECONNRESET', 'ECONNABORTED', 'ETIMEDOUT', 'EPIPE', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH',
  'ENETUNREACH', 'ENETDOWN', 'EHOSTDOWN', 'ENOENT', 'ECANCELED',
]);

/**
 * SQLSTATEs of a conflict with other transactions: serialization failure, deadlock (the victim), lock not available
 * (a lock_timeout). The transaction was rolled back and the connection is fine: the same transaction again, on the
 * same connection, succeeds once the others are done.
 */
const CONFLICT_CODES = new Set(['40001', '40P01', '55P03']);

export function classifyDbError(err: unknown): DbErrorKind {
  const state = sqlstate(err);
  if (state) {
    if (state.startsWith('08')) return 'unavailable'; // connection exception
    if (state.startsWith('53')) return 'unavailable'; // insufficient resources (too many connections, disk full)
    if (state.startsWith('40')) return 'unavailable'; // transaction rollback (see CONFLICT_CODES): a retry succeeds
    if (['57P01', '57P02', '57P03', '57014'].includes(state)) return 'unavailable'; // shutdown, crash, starting, timeout
    if (CONFLICT_CODES.has(state) || state === '55006') return 'unavailable'; // a conflict; object in use
    if (state.startsWith('22')) return 'rejected';
    return 'bug';
  }
  const code = codeOf(err);
  if (code && NETWORK_CODES.has(code)) return 'unavailable';
  // node-postgres reports a pool timeout, a dropped connection or a client killed mid-query as a plain Error
  // without SQLSTATE; the pool is the only thing we call, so anything not from the server is the connection.
  if (err instanceof Error && !isServerError(err)) return 'unavailable';
  return 'bug';
}

/** The database is not there right now (or asked us to try again), rather than "this statement is wrong". */
export function isConnectionError(err: unknown): boolean {
  return classifyDbError(err) === 'unavailable';
}

/**
 * The call lost a conflict with other transactions (deadlock, lock_timeout, serialization failure): retry the same
 * transaction on the same connection. A part of 'unavailable' that, unlike a lost connection, the same client
 * survives (what `npm run migrate`'s code step retries on).
 */
export function isLockConflict(err: unknown): boolean {
  const code = sqlstate(err);
  return code !== undefined && CONFLICT_CODES.has(code);
}

/** The SQLSTATE of an error the server sent; undefined for a client-side error. */
function sqlstate(err: unknown): string | undefined {
  const code = codeOf(err);
  return code && /^[0-9A-Z]{5}$/.test(code) && isServerError(err) ? code : undefined;
}

/** pg's DatabaseError (a message from the server) carries `severity`; client-side errors do not. */
function isServerError(err: unknown): boolean {
  return typeof err === 'object' && err !== null && typeof (err as { severity?: unknown }).severity === 'string';
}

function codeOf(err: unknown): string | undefined {
  if (typeof err !== 'object' || err === null) return undefined;
  const code = (err as { code?: unknown }).code;
  if (typeof code === 'string') return code;
  // Node 20 connects to every address of a host name and reports an AggregateError.
  const inner = (err as { errors?: unknown }).errors;
  if (Array.isArray(inner)) return inner.map(codeOf).find((c) => c !== undefined);
  return undefined;
}

/** A short, safe description of a database error for a reply or log (no connection string, no stack). */
export function describeDbError(err: unknown): string {
  const code = codeOf(err);
  const message = err instanceof Error ? err.message : String(err);
  return code && !message.includes(code) ? `${code}: ${message}` : message;
}
