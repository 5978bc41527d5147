/**
 * Who may see the dashboard: whoever holds DASHBOARD_TOKEN. Tools send it as `Authorization: Bearer <token>`;
 * people type it once into the login form and get a session cookie.
 *
 * The cookie is not the token: it is `<expiry>.<nonce>.<HMAC(token, expiry.nonce)>`, so it can be checked without
 * any state kept here, says nothing about the token, expires, and stops working when the token changes. The CSRF
 * token of the page is another HMAC of the same nonce: per session, and unknown to another site.
 *
 * Wrong tokens are counted per client address (the socket's, not X-Forwarded-For, which a guesser would simply
 * change): after `max` in a window every further try from there is answered 429, right or wrong, until it passes.
 * Every comparison is in constant time (secretEquals hashes both sides first).
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { secretEquals } from '../secret.ts';

export const SESSION_COOKIE = 'allocator_dashboard';
/** A login lasts a working day; then the form again. */
export const SESSION_SECONDS = 12 * 60 * 60;

const mac = (token: string, what: string) => createHmac('sha256', token).update(what).digest('base64url');

function macEquals(a: string, b: string): boolean {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}

export class DashboardAuth {
  constructor(private readonly token: string) {}

  tokenMatches(given: string | undefined): boolean {
    return secretEquals(this.token, given);
  }

  /** A new session's cookie value. */
  newSession(now = Date.now()): string {
    const expires = Math.floor(now / 1000) + SESSION_SECONDS;
    const nonce = randomBytes(16).toString('base64url');
    return `${expires}.${nonce}.${mac(this.token, `session.${expires}.${nonce}`)}`;
  }

  /** The session's nonce when the cookie is one we issued, unexpired, under the current token; else undefined. */
  session(cookie: string | undefined, now = Date.now()): string | undefined {
    const m = /^(\d{1,12})\.([A-Za-z0-9_-]{16,64})\.([A-Za-z0-9_-]{43})$/.exec(cookie ?? '');
    if (!m) return undefined;
    const [, expires, nonce, sig] = m;
    if (!macEquals(sig!, mac(this.token, `session.${expires}.${nonce}`))) return undefined;
    return Number(expires) * 1000 > now ? nonce : undefined;
  }

  /** The CSRF token the page of this session carries in its forms. */
  csrfToken(session: string): string {
    return mac(this.token, `csrf.${session}`);
  }

  csrfMatches(session: string, given: string | undefined): boolean {
    return typeof given === 'string' && macEquals(given, this.csrfToken(session));
  }
}

/** Failed tries per client address in a sliding window. */
export class FailureLimiter {
  private readonly failures = new Map<string, number[]>();

  constructor(
    private readonly max = 5,
    private readonly windowMs = 60_000,
    /** Addresses remembered at most (the oldest are forgotten first), so a flood of addresses cannot fill memory. */
    private readonly maxClients = 10_000,
  ) {}

  /** Seconds until `client` may try again; 0 when it may now. */
  retryAfter(client: string, now = Date.now()): number {
    const recent = this.recent(client, now);
    if (recent.length < this.max) return 0;
    return Math.max(1, Math.ceil((recent[0]! + this.windowMs - now) / 1000));
  }

  fail(client: string, now = Date.now()): void {
    const recent = this.recent(client, now);
    recent.push(now);
    this.failures.delete(client); // re-insert: the Map's order is then least recently failed first
    this.failures.set(client, recent.slice(-this.max));
    if (this.failures.size > this.maxClients) this.failures.delete(this.failures.keys().next().value!);
  }

  private recent(client: string, now: number): number[] {
    const list = (this.failures.get(client) ?? []).filter((t) => t > now - this.windowMs);
    if (list.length === 0) this.failures.delete(client);
    return list;
  }
}
