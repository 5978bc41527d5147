/**
 * How a failed Qiscus call should be treated by whoever decides about retries (the SQL side):
 * - `transient`: try again later (429, 5xx, timeouts, connection failures, unreadable 2xx answers).
 *   The call may have gone through on Qiscus's side; assign_agent is idempotent for the same room+agent,
 *   so a retry is safe.
 * - `rejected`: Qiscus understood and refused; repeating the same room+agent will not help.
 * - `config`: our credentials are wrong (401/403); every call will fail until someone fixes the settings.
 */
export type QiscusErrorKind = 'transient' | 'rejected' | 'config';

export interface QiscusErrorInit {
  kind: QiscusErrorKind;
  message: string;
  status?: number;
  retryAfterSeconds?: number;
  /** Node/got error code for failures without an HTTP answer, e.g. ECONNREFUSED, ETIMEDOUT. */
  code?: string;
  cause?: unknown;
}

export class QiscusError extends Error {
  override readonly name = 'QiscusError';
  readonly kind: QiscusErrorKind;
  readonly status?: number;
  readonly retryAfterSeconds?: number;
  readonly code?: string;

  constructor(init: QiscusErrorInit) {
    super(init.message, init.cause === undefined ? undefined : { cause: init.cause });
    this.kind = init.kind;
    if (init.status !== undefined) this.status = init.status;
    if (init.retryAfterSeconds !== undefined) this.retryAfterSeconds = init.retryAfterSeconds;
    if (init.code !== undefined) this.code = init.code;
  }
}

export function isQiscusError(e: unknown): e is QiscusError {
  return e instanceof QiscusError;
}

/** Which kind a non-2xx HTTP status is. 408 is a timeout in HTTP clothing, so it is retried like one. */
export function kindForStatus(status: number): QiscusErrorKind {
  if (status === 401 || status === 403) return 'config';
  if (status === 429 || status === 408 || status >= 500) return 'transient';
  return 'rejected';
}

/**
 * `Retry-After` is either delta-seconds or an HTTP date (RFC 9110 §10.2.3). Returns whole seconds (>= 0),
 * or undefined when absent or unreadable.
 */
export function parseRetryAfter(value: string | string[] | undefined, now = Date.now()): number | undefined {
  const raw = (Array.isArray(value) ? value[0] : value)?.trim();
  if (!raw) return undefined;
  if (/^\d+(\.\d+)?$/.test(raw)) return Math.ceil(Number(raw));
  const at = Date.parse(raw);
  if (Number.isNaN(at)) return undefined;
  return Math.max(0, Math.ceil((at - now) / 1000));
}

/**
 * The human message in a Qiscus error body. Two shapes are seen in the wild: `{"errors": "..."}` and
 * `{"errors": {"message": "..."}}`; anything else falls back to a short raw snippet or the status text.
 */
export function messageFromBody(body: string, status: number, statusText?: string): string {
  let parsed: unknown;
  try {
    parsed = JSON.parse(body);
  } catch {
    parsed = undefined;
  }
  if (parsed !== null && typeof parsed === 'object') {
    const o = parsed as Record<string, unknown>;
    const errors = o.errors;
    if (typeof errors === 'string' && errors.trim()) return errors;
    if (Array.isArray(errors) && errors.length > 0) return errors.map((e) => (typeof e === 'string' ? e : JSON.stringify(e))).join('; ');
    if (errors !== null && typeof errors === 'object') {
      const m = (errors as Record<string, unknown>).message;
      if (typeof m === 'string' && m.trim()) return m;
      return JSON.stringify(errors).slice(0, 200);
    }
    if (typeof o.message === 'string' && o.message.trim()) return o.message;
  }
  const snippet = body.trim().slice(0, 200);
  if (snippet) return `HTTP ${status}: ${snippet}`;
  return `HTTP ${status}${statusText ? ` ${statusText}` : ''}`;
}
