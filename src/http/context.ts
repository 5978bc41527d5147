/**
 * What every request carries through the app (Hono's typed context variables), and the one helper that writes
 * error replies, so that every 4xx/5xx has the same JSON shape: `{"ok":false,"error":"...","field":"..."}`.
 */
import type { Context } from 'hono';
import type { ContentfulStatusCode } from 'hono/utils/http-status';
import type { Logger } from '../log.ts';

export interface AppEnv {
  Variables: {
    /** Per request: from `X-Request-Id` when it is sane, else generated. Echoed, logged, stored with the webhook. */
    requestId: string;
    log: Logger;
    /** The parsed JSON body (set by jsonBody). */
    body: unknown;
    /** For the access log line: what the webhook did, or why it was refused. */
    outcome?: string;
    roomId?: string;
    problem?: string;
  };
}

export type AppContext = Context<AppEnv>;

export function problem(
  c: AppContext,
  status: ContentfulStatusCode,
  error: string,
  field?: string,
  headers?: Record<string, string>,
): Response {
  c.set('problem', error);
  const body: { ok: false; error: string; field?: string } = { ok: false, error };
  if (field !== undefined) body.field = field;
  return c.json(body, status, headers);
}
