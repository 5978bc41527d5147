/**
 * The web app's metrics, fed by the app's `observe` seam (one call per request, after the reply is ready):
 * webhook latency by route and status, and webhooks by what they did.
 */
import { Counter, Histogram, type Registry } from 'prom-client';
import { LATENCY_BUCKETS, PREFIX } from '../metrics/registry.ts';
import { ROUTES, type Observer, type RequestObservation } from './request-context.ts';

const WEBHOOK_ROUTES: ReadonlySet<string> = new Set([ROUTES.newRequest, ROUTES.closeRequest]);

/** The outcome label of a webhook the database never saw: why it was turned away. */
function refusal(status: number): string {
  if (status === 401) return 'unauthorized'; // usually a wrong secret in the webhook URL configured in Qiscus
  if (status === 503) return 'unavailable'; // database away; Qiscus will retry
  if (status >= 400 && status < 500) return 'invalid';
  return 'error';
}

/** Registers the web metrics on `registry`; returns the observer to hand to createApp. */
export function createWebMetrics(registry: Registry): Observer {
  const duration = new Histogram({
    name: `${PREFIX}webhook_duration_seconds`,
    help: 'Webhook latency, from the request reaching the app to its reply being ready (the SQL call included), by route and HTTP status',
    labelNames: ['route', 'status'] as const,
    buckets: LATENCY_BUCKETS,
    registers: [registry],
  });
  const total = new Counter({
    name: `${PREFIX}webhooks_total`,
    help: 'Webhooks by route and outcome: what the SQL function did (queued, already_queued, resolved, ...) or why it was refused (invalid, unauthorized, unavailable, error)',
    labelNames: ['route', 'outcome'] as const,
    registers: [registry],
  });

  return (o: RequestObservation) => {
    // Health checks and scrapes come every few seconds and say nothing about Qiscus's traffic: not counted here.
    if (!WEBHOOK_ROUTES.has(o.route)) return;
    duration.observe({ route: o.route, status: String(o.status) }, o.seconds);
    total.inc({ route: o.route, outcome: o.outcome ?? refusal(o.status) });
  };
}
