/**
 * GET /dashboard, the supervisor's live page, and the routes it uses; mounted by the app only when DASHBOARD_TOKEN
 * is set (otherwise every /dashboard path is the app's 404).
 *
 *   GET  /dashboard                    the page (HTML); a browser without a session is sent to the login form
 *   GET  /dashboard/events             server-sent events: the rendered live part, about once a second
 *   GET  /dashboard/snapshot.json      the same snapshot as JSON, for tools
 *   POST /dashboard/agents/:id/pause   paused=true|false: the one write (the SQL a DBA would type)
 *   GET  /dashboard/login, POST /dashboard/login, POST /dashboard/logout
 *   GET  /dashboard/assets/*           the stylesheet and the script (no data: served to anyone)
 *
 * Every data route needs the token (Bearer header) or the session cookie, else 401 with no data. The pause needs,
 * with the cookie, the page's CSRF token and a same-origin request (Origin, or Sec-Fetch-Site); with the Bearer
 * header neither, since a browser never adds that header to a forged cross-site request by itself.
 */
import { readFileSync } from 'node:fs';
import { getConnInfo } from '@hono/node-server/conninfo';
import { Hono, type Context, type MiddlewareHandler } from 'hono';
import { bodyLimit } from 'hono/body-limit';
import { deleteCookie, getCookie, setCookie } from 'hono/cookie';
import { streamSSE } from 'hono/streaming';
import type pg from 'pg';
import { classifyDbError, describeDbError } from '../../db/errors.ts';
import type { Logger } from '../../log.ts';
import type { AppEnv } from '../context.ts';
import { DashboardAuth, FailureLimiter, SESSION_COOKIE, SESSION_SECONDS } from './auth.ts';
import { Feed, readSnapshot, type Frame } from './feed.ts';
import { BASE, renderLive, renderLogin, renderPage } from './view.ts';

export interface DashboardOptions {
  /** DASHBOARD_TOKEN. */
  token: string;
  /** How often the snapshot is taken while a page listens. Default 1000 ms. */
  intervalMs?: number;
  /** Wrong tokens allowed per client address per minute before 429. Default 5. */
  maxFailures?: number;
  /** When aborted (the server stops), open event streams end and the snapshots stop. */
  signal?: AbortSignal;
  /** Told of every snapshot read from the database (tests count them). */
  onSnapshot?: () => void;
}

/** Who is asking: a tool with the token, or a person with a session (whose CSRF token the page carries). */
type Who = { via: 'bearer' } | { via: 'cookie'; session: string };
type DashboardEnv = { Variables: AppEnv['Variables'] & { who: Who } };
type DashboardContext = Context<DashboardEnv>;

const asset = (name: string) => readFileSync(new URL(`./assets/${name}`, import.meta.url), 'utf8');
const ASSETS: Record<string, { body: string; type: string }> = {
  'dashboard.js': { body: asset('dashboard.js'), type: 'text/javascript; charset=utf-8' },
  'dashboard.css': { body: asset('dashboard.css'), type: 'text/css; charset=utf-8' },
  'favicon.svg': { body: asset('favicon.svg'), type: 'image/svg+xml' },
};

/** Nothing but our own script and stylesheet runs or loads; the page cannot be framed. */
const SECURITY_HEADERS = {
  'Content-Security-Policy':
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; " +
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
  'X-Content-Type-Options': 'nosniff',
  'X-Frame-Options': 'DENY',
  // Not no-referrer: with it Chromium sends `Origin: null` on our own form posts, and the pause checks Origin.
  'Referrer-Policy': 'same-origin',
  'Cache-Control': 'no-store',
};

/** Forms are a few bytes; anything bigger is not one of ours. */
const smallForm = bodyLimit({ maxSize: 4096, onError: (c) => c.text('request body too large', 413) });

export function dashboardRoutes(pool: pg.Pool, logger: Logger, opts: DashboardOptions): Hono<DashboardEnv> {
  const auth = new DashboardAuth(opts.token);
  const limiter = new FailureLimiter(opts.maxFailures ?? 5);
  const feed = new Feed(
    () => {
      opts.onSnapshot?.();
      return readSnapshot(pool);
    },
    renderLive,
    opts.intervalMs ?? 1000,
    (err) => logger.warn({ err: describeDbError(err) }, 'dashboard: cannot read the snapshot'),
  );
  opts.signal?.addEventListener('abort', () => feed.stop(), { once: true });

  const routes = new Hono<DashboardEnv>();

  routes.use('*', async (c, next) => {
    await next();
    for (const [k, v] of Object.entries(SECURITY_HEADERS)) c.res.headers.set(k, v);
  });

  routes.get('/assets/:name', (c) => {
    const a = ASSETS[c.req.param('name')];
    return a ? c.body(a.body, 200, { 'Content-Type': a.type }) : c.json({ ok: false, error: 'no such asset' }, 404);
  });

  routes.get('/login', (c) => c.html(renderLogin()));

  routes.post('/login', smallForm, async (c) => {
    const client = clientAddress(c);
    const wait = limiter.retryAfter(client);
    if (wait) return c.html(renderLogin(`Too many wrong tokens; try again in ${wait} s.`), 429, { 'Retry-After': String(wait) });
    const { token } = await readForm(c);
    if (!auth.tokenMatches(typeof token === 'string' ? token : undefined)) {
      limiter.fail(client);
      logger.warn({ client }, 'dashboard: wrong token at the login form');
      return c.html(renderLogin('That is not the dashboard token.'), 401);
    }
    setCookie(c, SESSION_COOKIE, auth.newSession(), {
      httpOnly: true,
      sameSite: 'Strict',
      path: BASE,
      maxAge: SESSION_SECONDS,
      secure: isHttps(c),
    });
    logger.info({ client }, 'dashboard: logged in');
    return c.redirect(BASE, 303);
  });

  // Everything below needs the token or a session.
  routes.use('*', authenticate(auth, limiter, logger));

  routes.get('/', async (c) => {
    const who = c.get('who');
    const csrf = who.via === 'cookie' ? auth.csrfToken(who.session) : undefined;
    return c.html(renderPage(await feed.current(), csrf));
  });

  routes.get('/snapshot.json', async (c) => {
    const frame = await feed.current();
    return frame.snapshot ? c.json(frame.snapshot) : c.json({ ok: false, error: frame.error }, 503);
  });

  routes.get('/events', (c) =>
    streamSSE(c, async (stream) => {
      // A reader too slow for one frame skips to a later one: each frame is the whole live part.
      let writing = false;
      const send = (f: Frame, retry?: number) => {
        if (writing || stream.closed || stream.aborted) return;
        writing = true;
        void stream.writeSSE({ data: f.html, retry }).finally(() => (writing = false));
      };
      const unsubscribe = feed.subscribe((f) => send(f));
      try {
        send(await feed.current(), 1000); // at once, and: reconnect after 1 s when the stream breaks
        await ended(stream, opts.signal);
      } finally {
        unsubscribe();
      }
    }),
  );

  routes.post('/agents/:id/pause', smallForm, async (c) => {
    const who = c.get('who');
    const form = await readForm(c);
    const refusal = forgery(c, who, auth, form.csrf);
    if (refusal) return c.json({ ok: false, error: refusal }, 403);
    const id = c.req.param('id');
    if (!/^\d{1,18}$/.test(id)) return c.json({ ok: false, error: `no agent ${id.slice(0, 40)}` }, 404);
    const paused = ({ true: true, false: false } as Record<string, boolean | undefined>)[String(form.paused)];
    if (paused === undefined) return c.json({ ok: false, error: 'paused must be true or false', field: 'paused' }, 422);
    let found: boolean;
    try {
      // The same statement a DBA would type in psql; the allocator reads `paused` at the next reservation.
      found = (await pool.query('update allocator.agents set paused = $2 where id = $1', [id, paused])).rowCount === 1;
    } catch (err) {
      if (classifyDbError(err) !== 'unavailable') throw err;
      return c.json({ ok: false, error: 'database unavailable; retry later' }, 503, { 'Retry-After': '5' });
    }
    if (!found) return c.json({ ok: false, error: `no agent ${id}` }, 404);
    feed.invalidate(); // the page the browser goes back to shows it
    logger.info({ agent: Number(id), paused, via: who.via }, `dashboard: agent ${paused ? 'paused' : 'unpaused'}`);
    return who.via === 'cookie' ? c.redirect(BASE, 303) : c.json({ ok: true, id: Number(id), paused });
  });

  routes.post('/logout', smallForm, async (c) => {
    const who = c.get('who');
    const refusal = forgery(c, who, auth, (await readForm(c)).csrf);
    if (refusal) return c.json({ ok: false, error: refusal }, 403);
    deleteCookie(c, SESSION_COOKIE, { path: BASE });
    return c.redirect(`${BASE}/login`, 303);
  });

  return routes;
}

/** Sets `who`, or answers 401 (a browser: the login form), or 429 for an address that guessed too often. */
function authenticate(auth: DashboardAuth, limiter: FailureLimiter, logger: Logger): MiddlewareHandler<DashboardEnv> {
  return async (c, next) => {
    const header = c.req.header('authorization');
    if (header !== undefined) {
      const client = clientAddress(c);
      const wait = limiter.retryAfter(client);
      if (wait) {
        return c.json({ ok: false, error: `too many wrong tokens; retry in ${wait} s` }, 429, { 'Retry-After': String(wait) });
      }
      const bearer = /^Bearer\s+(\S+)\s*$/i.exec(header)?.[1];
      if (auth.tokenMatches(bearer)) {
        c.set('who', { via: 'bearer' });
        return next();
      }
      limiter.fail(client);
      logger.warn({ client }, 'dashboard: wrong bearer token');
      return c.json({ ok: false, error: 'wrong dashboard token' }, 401, { 'WWW-Authenticate': 'Bearer realm="dashboard"' });
    }
    const session = auth.session(getCookie(c, SESSION_COOKIE));
    if (session) {
      c.set('who', { via: 'cookie', session });
      return next();
    }
    if (c.req.method === 'GET' && /\btext\/html\b/.test(c.req.header('accept') ?? '')) {
      return c.redirect(`${BASE}/login`, 303);
    }
    return c.json(
      { ok: false, error: 'log in at /dashboard/login, or send Authorization: Bearer <DASHBOARD_TOKEN>' },
      401,
      { 'WWW-Authenticate': 'Bearer realm="dashboard"' },
    );
  };
}

/** Why a write must be refused as a possible cross-site forgery, or undefined when it may go ahead. */
function forgery(c: DashboardContext, who: Who, auth: DashboardAuth, csrf: unknown): string | undefined {
  const origin = c.req.header('origin');
  if (origin !== undefined && !sameHost(origin, c.req.header('host'))) return 'cross-origin request refused';
  if (who.via === 'bearer') return undefined;
  // A session rides on a cookie the browser adds by itself, so prove the request came from our page.
  if (origin === undefined && c.req.header('sec-fetch-site') !== 'same-origin') return 'no Origin header: refused';
  if (!auth.csrfMatches(who.session, typeof csrf === 'string' ? csrf : undefined)) return 'missing or wrong CSRF token';
  return undefined;
}

function sameHost(origin: string, host: string | undefined): boolean {
  try {
    return host !== undefined && new URL(origin).host === host;
  } catch {
    return false; // "null" (a sandboxed frame, a file) or garbage
  }
}

/** A form or a JSON object; anything unreadable is an empty one (the checks after it then refuse). */
async function readForm(c: DashboardContext): Promise<Record<string, unknown>> {
  try {
    if (/json/i.test(c.req.header('content-type') ?? '')) {
      const body: unknown = await c.req.json();
      return body && typeof body === 'object' ? (body as Record<string, unknown>) : {};
    }
    return await c.req.parseBody();
  } catch {
    return {};
  }
}

/** Resolves when the client goes away or the server stops. */
function ended(stream: { onAbort(f: () => void): void }, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      signal?.removeEventListener('abort', done); // a server up for months sees many streams come and go
      resolve();
    };
    stream.onAbort(done);
    if (signal?.aborted) done();
    else signal?.addEventListener('abort', done);
  });
}

/** The peer's address as the socket has it (X-Forwarded-For is the client's to choose, so not trusted here). */
function clientAddress(c: Context): string {
  try {
    return getConnInfo(c).remote.address ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

function isHttps(c: Context): boolean {
  return c.req.url.startsWith('https:') || c.req.header('x-forwarded-proto') === 'https';
}
