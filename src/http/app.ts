/**
 * The HTTP app: Qiscus's two webhooks, health, readiness and metrics. Thin by design: it validates, hands the
 * payload to one SQL function, and says what that did. No allocation logic lives here (it is all in SQL).
 *
 * Webhooks are applied by one SQL function in autocommit, in groups of one kind (see ingest.ts): when
 * the query returns, the webhook row and its effect are committed, and only then is the 2xx sent. The SQL is
 * idempotent per room, so a retried or concurrent copy changes nothing.
 *
 * Order of checks on a webhook: secret (401) → content type (415) → size (413) → JSON (400) → schema (422) →
 * database (200, or 503 + Retry-After when it is away). Nothing is written before the last step.
 */
import { Hono } from 'hono';
import { HTTPException } from 'hono/http-exception';
import type { ContentfulStatusCode } from 'hono/utils/http-status';
import type pg from 'pg';
import type { Registry } from 'prom-client';
import { classifyDbError, describeDbError } from '../db/errors.ts';
import { migrationsApplied } from '../db/migrate.ts';
import type { Logger } from '../log.ts';
import { problem, type AppContext, type AppEnv } from './context.ts';
import { jsonBody, MAX_BODY_BYTES } from './json-body.ts';
import { WebhookBatcher, type AcceptRow } from './ingest.ts';
import { requestContext, ROUTES, type Observer } from './request-context.ts';
import { parseCloseRequest, parseNewRequest, type Parsed, type Webhook } from './schemas.ts';
import { requireSecret } from './secret.ts';
import { dashboardRoutes, type DashboardOptions } from './dashboard/routes.ts';
import { BASE as DASHBOARD_BASE } from './dashboard/view.ts';

export interface AppOptions {
  pool: pg.Pool;
  logger: Logger;
  /** When set, both webhooks need it (query `secret` or header `X-Webhook-Secret`). */
  webhookSecret?: string;
  /** During a rotation: the old secret, accepted too (WEBHOOK_SECRET_PREVIOUS). */
  webhookSecretPrevious?: string;
  /** The supervisor's page at /dashboard (DASHBOARD_TOKEN); without it, every /dashboard path is a 404. */
  dashboard?: DashboardOptions;
  /** Called once per request with route, status and latency: where a metrics collector plugs in. */
  observe?: Observer;
  /** Body size limit in bytes (default 256 KiB). */
  maxBodyBytes?: number;
  /** Served at `GET /metrics` (no secret needed: it holds counts, never payloads). Without it, /metrics is a 404. */
  metrics?: Registry;
}

/**
 * A webhook the database could not take (away, overloaded, restarting) changed nothing, or changed it idempotently:
 * Qiscus may resend it, after this many seconds.
 */
const RETRY_AFTER_SECONDS = 5;
const unavailableHeaders = { 'Retry-After': String(RETRY_AFTER_SECONDS) };

export const NO_SECRET_WARNING =
  'WEBHOOK_SECRET is not set: anyone who can reach this app can post webhooks, and a forged resolution frees a ' +
  'slot that is really taken';

export function createApp(opts: AppOptions): Hono<AppEnv> {
  const { pool, logger } = opts;
  const app = new Hono<AppEnv>();

  app.use('*', requestContext(logger, opts.observe));

  const guard = requireSecret(opts.webhookSecret, opts.webhookSecretPrevious);
  // Said on /readyz (still 200: the app works) and by `npm run web` at start.
  const warnings = opts.webhookSecret ? [] : [NO_SECRET_WARNING];
  const body = jsonBody(opts.maxBodyBytes ?? MAX_BODY_BYTES);

  /** Validates, stores through SQL, and answers with what happened. */
  const accept = { new_request: new WebhookBatcher(pool, 'new_request'), close_request: new WebhookBatcher(pool, 'close_request') };

  const webhook = (kind: keyof typeof accept, parse: (b: unknown) => Parsed<Webhook>) => async (c: AppContext) => {
    const parsed = parse(c.get('body'));
    if (!parsed.ok) return problem(c, 422, parsed.error, parsed.field);
    const { roomId, payload } = parsed.value;
    c.set('roomId', roomId);
    const requestId = c.get('requestId');
    let row: AcceptRow | undefined;
    try {
      row = await accept[kind].accept(roomId, payload, requestId);
    } catch (err) {
      return databaseFailure(c, err);
    }
    if (!row) throw new Error(`allocator.accept_${kind} returned no row`);
    c.set('outcome', row.outcome);
    return c.json({
      ok: true,
      outcome: row.outcome,
      room_id: roomId,
      session_id: row.session_id,
      webhook_id: row.webhook_id,
      request_id: requestId,
    });
  };

  app.post(ROUTES.newRequest, guard, body, webhook('new_request', parseNewRequest));
  app.post(ROUTES.closeRequest, guard, body, webhook('close_request', parseCloseRequest));

  app.get(ROUTES.healthz, (c) => c.json({ ok: true }));

  app.get(ROUTES.readyz, async (c) => {
    try {
      await pool.query('select 1');
    } catch (err) {
      c.get('log').warn({ err: describeDbError(err) }, 'readiness: database unreachable');
      return problem(c, 503, `database unreachable: ${describeDbError(err)}`, undefined, unavailableHeaders);
    }
    let applied: boolean;
    try {
      applied = await migrationsApplied(pool);
    } catch (err) {
      // No graphile_migrate schema (42P01/3F000): a database nobody migrated.
      if (classifyDbError(err) === 'unavailable') {
        return problem(c, 503, `database unreachable: ${describeDbError(err)}`, undefined, unavailableHeaders);
      }
      return problem(c, 503, `migrations not applied: ${describeDbError(err)}`, undefined, unavailableHeaders);
    }
    if (!applied) return problem(c, 503, 'migrations not applied: run `npm run migrate`', undefined, unavailableHeaders);
    return c.json({ ok: true, database: 'reachable', migrations: 'applied', warnings });
  });

  const registry = opts.metrics;
  if (registry) {
    app.get(ROUTES.metrics, async (c) =>
      c.body(await registry.metrics(), 200, { 'Content-Type': registry.contentType }),
    );
  }

  if (opts.dashboard) app.route(DASHBOARD_BASE, dashboardRoutes(pool, logger, opts.dashboard));

  // Known paths with the wrong method: say so rather than 404.
  for (const [path, allow] of [
    [ROUTES.newRequest, 'POST'],
    [ROUTES.closeRequest, 'POST'],
    [ROUTES.healthz, 'GET, HEAD'],
    [ROUTES.readyz, 'GET, HEAD'],
    ...(registry ? ([[ROUTES.metrics, 'GET, HEAD']] as const) : []),
  ] as const) {
    app.all(path, (c) => problem(c, 405, `method ${c.req.method} not allowed on ${path}; use ${allow}`, undefined, {
      Allow: allow,
    }));
  }

  app.notFound((c) => problem(c, 404, `no route ${c.req.method} ${c.req.path.slice(0, 200)}`));

  // Last line of defence: a bug answers 500 with JSON and is logged; the process carries on.
  app.onError((err, c) => {
    // Hono's own refusals (none of our routes throw them, but a later middleware might) keep their 4xx.
    if (err instanceof HTTPException && err.status < 500) {
      return problem(c, err.status as ContentfulStatusCode, err.message || 'bad request');
    }
    c.get('log')?.error({ err }, 'unhandled error');
    return problem(c, 500, 'internal error; it has been logged');
  });

  return app;
}

/** A database call failed: 503 when it may pass, 422 when PostgreSQL refused the data, else rethrow (a bug). */
function databaseFailure(c: AppContext, err: unknown): Response {
  const kind = classifyDbError(err);
  if (kind === 'unavailable') {
    c.get('log').warn({ err: describeDbError(err) }, 'database unavailable');
    return problem(c, 503, 'database unavailable; retry later', undefined, unavailableHeaders);
  }
  if (kind === 'rejected') {
    // Our schema should have caught this: worth an error line, but it is still the input's fault, not a 5xx.
    c.get('log').error({ err: describeDbError(err) }, 'database refused a payload that passed validation');
    return problem(c, 422, `the database refused the payload: ${describeDbError(err)}`);
  }
  throw err;
}
