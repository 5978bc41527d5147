/**
 * The outermost middleware: gives each request its id, times it, writes one access-log line, and reports it to
 * `observe` — the seam for metrics (webhook latency by route and status) without touching the routes.
 */
import { randomUUID } from 'node:crypto';
import type { MiddlewareHandler } from 'hono';
import type { Logger } from '../log.ts';
import type { AppEnv } from './context.ts';

/** Fixed route labels: a metric label must never take its value from the URL a client chose. */
export const ROUTES = {
  newRequest: '/api/v1/new_request',
  closeRequest: '/api/v1/close_request',
  healthz: '/healthz',
  readyz: '/readyz',
  metrics: '/metrics',
} as const;
export type RouteLabel = (typeof ROUTES)[keyof typeof ROUTES] | 'other';

export interface RequestObservation {
  route: RouteLabel;
  method: string;
  status: number;
  /** Wall time from the first middleware to the response being ready (not yet flushed), in seconds. */
  seconds: number;
  requestId: string;
  /** The webhook's outcome (queued, resolved, ...), when it got that far. */
  outcome?: string;
}

export type Observer = (o: RequestObservation) => void;

/** A request id we may echo and store: short, printable, no spaces. Anything else is replaced. */
const SANE_ID = /^[A-Za-z0-9._:@\/+=-]{1,128}$/;

const known = new Set<string>(Object.values(ROUTES));

export function requestContext(logger: Logger, observe?: Observer): MiddlewareHandler<AppEnv> {
  return async (c, next) => {
    const started = performance.now();
    const given = c.req.header('x-request-id');
    const requestId = given && SANE_ID.test(given) ? given : randomUUID();
    const log = logger.child({ reqId: requestId });
    c.set('requestId', requestId);
    c.set('log', log);

    await next(); // Hono turns thrown errors into onError's reply, so this does not throw

    c.res.headers.set('X-Request-Id', requestId);
    const route: RouteLabel = known.has(c.req.path) ? (c.req.path as RouteLabel) : 'other';
    const status = c.res.status;
    const seconds = (performance.now() - started) / 1000;
    const outcome = c.get('outcome');
    try {
      observe?.({ route, method: c.req.method, status, seconds, requestId, outcome });
    } catch (err) {
      log.error({ err }, 'request observer failed'); // a metrics bug must not fail the webhook
    }

    // The path only: the query string may hold the webhook secret.
    const line = {
      method: c.req.method,
      path: route === 'other' ? c.req.path.slice(0, 200) : route,
      status,
      ms: Math.round(seconds * 1000 * 10) / 10,
      outcome,
      room_id: c.get('roomId'),
      problem: c.get('problem'),
    };
    // Probes and scrapes arrive every few seconds: only worth a line when debugging.
    const health = route === ROUTES.healthz || route === ROUTES.readyz || route === ROUTES.metrics;
    // 503 is the database being away (already logged once per request as such): a warning, not a bug.
    if (status >= 500 && status !== 503) log.error(line, 'request failed');
    else if (status === 503) log.warn(line, 'request failed: unavailable');
    else if (health && status < 400) log.debug(line, 'request');
    else if (status >= 400) log.warn(line, 'request refused');
    else log.info(line, 'request');
  };
}
