/**
 * GET /dashboard and the routes it uses, on the real app over a real database: 404 without DASHBOARD_TOKEN; 401 (or
 * the login form) without the token or a session, and no data; the Bearer header; the login cookie (HttpOnly,
 * SameSite=Strict, not the token); 429 after five wrong tokens from one address; the pause with its CSRF and Origin
 * checks; one shared snapshot a second however many pages listen, none while none does; and no customer data in
 * anything it serves.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NO_SECRET_WARNING } from '../../src/http/app.ts';
import { readSnapshot } from '../../src/http/dashboard/feed.ts';
import { startHttpServer } from '../../src/http/server.ts';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { newRequest } from '../support/fixtures.ts';
import { eventually, sleep } from '../support/processes.ts';
import { addAgents, assignAll, queue } from '../support/sql.ts';
import { get, post, startApp, testLogger, type RunningApp } from './harness.ts';

const TOKEN = 'dashboard-token-for-tests-0123456789';
let db: TestDatabase;
let app: RunningApp;
let snapshots = 0;

const bearer = { authorization: `Bearer ${TOKEN}` };
const form = (fields: Record<string, string>) => new URLSearchParams(fields).toString();
const formHeaders = (extra: Record<string, string> = {}) => ({ 'content-type': 'application/x-www-form-urlencoded', ...extra });

/** Logs in through the form; returns the Cookie header to send and the Set-Cookie line as the server wrote it. */
async function login(base: string, token = TOKEN): Promise<{ cookie: string; setCookie: string; status: number }> {
  const res = await fetch(`${base}/dashboard/login`, {
    method: 'POST',
    headers: formHeaders(),
    body: form({ token }),
    redirect: 'manual',
  });
  const setCookie = res.headers.get('set-cookie') ?? '';
  return { cookie: setCookie.split(';')[0]!, setCookie, status: res.status };
}

/** The page's CSRF token (from its <meta>), as the script reads it. */
async function csrfOf(cookie: string): Promise<string> {
  const page = await get(`${app.url}/dashboard`, { headers: { cookie } });
  return /<meta name="csrf-token" content="([^"]*)">/.exec(page.text)![1]!;
}

/** An SSE client: collects the `data` of each event. */
function listen(url: string, headers: Record<string, string>) {
  const frames: string[] = [];
  const controller = new AbortController();
  const done = (async () => {
    const res = await fetch(url, { headers, signal: controller.signal });
    if (res.status !== 200) throw new Error(`events: ${res.status}`);
    const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value;
      let end: number;
      while ((end = buf.indexOf('\n\n')) >= 0) {
        const event = buf.slice(0, end);
        buf = buf.slice(end + 2);
        const data = event.split('\n').filter((l) => l.startsWith('data: ')).map((l) => l.slice(6));
        if (data.length) frames.push(data.join('\n'));
      }
    }
  })().catch((e: unknown) => {
    if ((e as Error).name !== 'AbortError') throw e;
  });
  return { frames, close: () => controller.abort(), done };
}

beforeAll(async () => {
  db = await createTestDatabase();
  app = await startApp(db.url, { dashboard: { token: TOKEN, onSnapshot: () => snapshots++ } });
  await addAgents(db.pool, [1001, 1002]);
  await db.pool.query(`update allocator.agents set name = 'Ayu', email = 'ayu.agent@example.com' where id = 1001`);
  await db.pool.query(`update allocator.agents set name = 'Budi', is_available = false where id = 1002`);
});
afterAll(async () => {
  await app?.close();
  await db?.drop();
});

describe('without DASHBOARD_TOKEN', () => {
  it('every dashboard path is a 404, whatever is sent', async () => {
    const plain = await startApp(db.url);
    try {
      for (const path of ['/dashboard', '/dashboard/login', '/dashboard/events', '/dashboard/snapshot.json']) {
        expect((await get(plain.url + path)).status, path).toBe(404);
        expect((await get(plain.url + path, { headers: bearer })).status, path).toBe(404);
      }
      expect((await post(plain.url + '/dashboard/login', form({ token: TOKEN }), formHeaders())).status).toBe(404);
      expect((await post(plain.url + '/dashboard/agents/1001/pause', { paused: true }, { ...bearer, 'content-type': 'application/json' })).status).toBe(404);
    } finally {
      await plain.close();
    }
  });
});

describe('authentication', () => {
  it('no token, no session: 401 with no data from the page and every data route', async () => {
    await queue(db.pool, 'room-auth-1');
    for (const path of ['/dashboard', '/dashboard/events', '/dashboard/snapshot.json']) {
      const r = await get(app.url + path);
      expect(r.status, path).toBe(401);
      expect(r.headers.get('www-authenticate')).toMatch(/Bearer/);
      expect(r.text).not.toMatch(/room-auth-1|Ayu|Budi/);
    }
    const pause = await post(app.url + '/dashboard/agents/1001/pause', form({ paused: 'true' }), formHeaders());
    expect(pause.status).toBe(401);
    expect((await db.pool.query(`select paused from allocator.agents where id = 1001`)).rows[0].paused).toBe(false);
  });

  it('a browser without a session is sent to the login form', async () => {
    const res = await fetch(`${app.url}/dashboard`, { headers: { accept: 'text/html,*/*' }, redirect: 'manual' });
    expect(res.status).toBe(303);
    expect(res.headers.get('location')).toBe('/dashboard/login');
    const loginPage = await get(`${app.url}/dashboard/login`);
    expect(loginPage.status).toBe(200);
    expect(loginPage.text).toMatch(/<form method="post" action="\/dashboard\/login">/);
  });

  it('Authorization: Bearer <token> opens the page and its data', async () => {
    await queue(db.pool, 'room-auth-2');
    const page = await get(`${app.url}/dashboard`, { headers: bearer });
    expect(page.status).toBe(200);
    expect(page.headers.get('content-type')).toMatch(/text\/html/);
    expect(page.text).toContain('data-room="room-auth-2"');
    expect(page.headers.get('content-security-policy')).toMatch(/script-src 'self'/);
    expect(page.headers.get('cache-control')).toBe('no-store');
    const snap = await get(`${app.url}/dashboard/snapshot.json`, { headers: bearer });
    expect(snap.status).toBe(200);
    expect(snap.json.queue.map((r: { room_id: string }) => r.room_id)).toContain('room-auth-2');
  });

  it('a wrong or malformed Authorization header: 401', async () => {
    for (const authorization of [`Bearer ${TOKEN}x`, `Basic ${TOKEN}`, 'Bearer']) {
      expect((await get(`${app.url}/dashboard/snapshot.json`, { headers: { authorization } })).status).toBe(401);
    }
  });

  it('the login form sets an HttpOnly, SameSite=Strict session cookie that is not the token', async () => {
    const wrong = await login(app.url, 'not-the-token');
    expect(wrong.status).toBe(401);
    expect(wrong.setCookie).toBe('');

    const { cookie, setCookie, status } = await login(app.url);
    expect(status).toBe(303);
    expect(setCookie).toMatch(/HttpOnly/i);
    expect(setCookie).toMatch(/SameSite=Strict/i);
    expect(setCookie).toMatch(/Path=\/dashboard/);
    expect(setCookie).not.toContain(TOKEN);
    expect(decodeURIComponent(cookie)).not.toContain(TOKEN);

    expect((await get(`${app.url}/dashboard/snapshot.json`, { headers: { cookie } })).status).toBe(200);
    expect((await get(`${app.url}/dashboard`, { headers: { cookie } })).status).toBe(200);

    // Tampered, or issued under another token: worth nothing.
    const tampered = cookie.slice(0, -2) + (cookie.endsWith('AA') ? 'BB' : 'AA');
    expect((await get(`${app.url}/dashboard/snapshot.json`, { headers: { cookie: tampered } })).status).toBe(401);
    const other = await startApp(db.url, { dashboard: { token: `${TOKEN}-other` } });
    try {
      expect((await get(`${other.url}/dashboard/snapshot.json`, { headers: { cookie } })).status).toBe(401);
    } finally {
      await other.close();
    }
  });

  it('wrong tokens: 5 a minute per address, then 429 even for the right one', async () => {
    const limited = await startApp(db.url, { dashboard: { token: TOKEN } });
    try {
      for (let i = 0; i < 3; i++) expect((await login(limited.url, `guess-${i}`)).status).toBe(401);
      for (let i = 0; i < 2; i++) {
        const r = await get(`${limited.url}/dashboard/snapshot.json`, { headers: { authorization: `Bearer guess-b${i}` } });
        expect(r.status).toBe(401);
      }
      const blocked = await get(`${limited.url}/dashboard/snapshot.json`, { headers: bearer });
      expect(blocked.status).toBe(429);
      expect(Number(blocked.headers.get('retry-after'))).toBeGreaterThan(0);
      expect(blocked.text).not.toMatch(/Ayu|room-/);
      expect((await login(limited.url)).status).toBe(429);
      // A session already open is not a guess: it keeps working.
      const { cookie } = await login(app.url);
      expect((await get(`${app.url}/dashboard/snapshot.json`, { headers: { cookie } })).status).toBe(200);
    } finally {
      await limited.close();
    }
  });
});

describe('pausing an agent', () => {
  const paused = async (id: number) =>
    (await db.pool.query(`select paused from allocator.agents where id = $1`, [id])).rows[0].paused as boolean;

  it('from the page: needs the session, its CSRF token and the same origin', async () => {
    const { cookie } = await login(app.url);
    const csrf = await csrfOf(cookie);
    expect(csrf).toMatch(/^[\w-]{20,}$/);
    const url = `${app.url}/dashboard/agents/1001/pause`;
    const origin = app.url;
    const attempt = (fields: Record<string, string>, headers: Record<string, string>) =>
      fetch(url, { method: 'POST', headers: formHeaders({ cookie, ...headers }), body: form(fields), redirect: 'manual' });

    expect((await attempt({ paused: 'true' }, { origin })).status).toBe(403); // no CSRF token
    expect((await attempt({ paused: 'true', csrf: 'x'.repeat(43) }, { origin })).status).toBe(403);
    expect((await attempt({ paused: 'true', csrf }, { origin: 'https://evil.example' })).status).toBe(403);
    expect((await attempt({ paused: 'true', csrf }, {})).status).toBe(403); // neither Origin nor Sec-Fetch-Site
    const other = await login(app.url); // another session's token does not fit this one
    expect((await attempt({ paused: 'true', csrf: await csrfOf(other.cookie) }, { origin })).status).toBe(403);
    expect(await paused(1001)).toBe(false);

    const ok = await attempt({ paused: 'true', csrf }, { origin });
    expect(ok.status).toBe(303);
    expect(ok.headers.get('location')).toBe('/dashboard');
    expect(await paused(1001)).toBe(true);
    // The page it goes back to shows it at once.
    expect((await get(`${app.url}/dashboard/snapshot.json`, { headers: { cookie } })).json.agents[0]).toMatchObject({
      id: 1001,
      paused: true,
      status: 'paused',
    });
    expect((await attempt({ paused: 'false', csrf }, { 'sec-fetch-site': 'same-origin' })).status).toBe(303);
    expect(await paused(1001)).toBe(false);
  });

  it('with the Bearer token (a tool): JSON in and out; refused cross-origin', async () => {
    const url = `${app.url}/dashboard/agents/1002/pause`;
    const json = { ...bearer, 'content-type': 'application/json' };
    const r = await post(url, { paused: true }, json);
    expect(r.status).toBe(200);
    expect(r.json).toEqual({ ok: true, id: 1002, paused: true });
    expect(await paused(1002)).toBe(true);
    expect((await post(url, { paused: false }, { ...json, origin: 'https://evil.example' })).status).toBe(403);
    expect(await paused(1002)).toBe(true);
    expect((await post(url, { paused: 'maybe' }, json)).status).toBe(422);
    expect((await post(`${app.url}/dashboard/agents/999/pause`, { paused: true }, json)).status).toBe(404);
    expect((await post(`${app.url}/dashboard/agents/x1/pause`, { paused: true }, json)).status).toBe(404);
    expect((await post(url, form({ paused: 'false' }), formHeaders(bearer))).status).toBe(200);
    expect(await paused(1002)).toBe(false);
  });

  it('is the only write: nothing else on the dashboard accepts a POST that changes data', async () => {
    for (const path of ['/dashboard', '/dashboard/events', '/dashboard/snapshot.json']) {
      expect((await post(app.url + path, {}, { ...bearer, 'content-type': 'application/json' })).status).toBe(404);
    }
  });
});

describe('the live feed', () => {
  it('fifty pages listening cost one snapshot a second; nobody listening costs none', async () => {
    const before = snapshots;
    const t0 = Date.now();
    const clients = Array.from({ length: 50 }, () => listen(`${app.url}/dashboard/events`, bearer));
    await eventually('every client has its first frame', () => clients.every((c) => c.frames.length >= 1), 10_000);
    await sleep(3000);
    const taken = snapshots - before;
    const seconds = (Date.now() - t0) / 1000;
    for (const c of clients) c.close();
    await Promise.all(clients.map((c) => c.done));
    // At most one a second (plus the first, on the first connection), not one per page; a loaded machine may delay
    // a tick, never add one.
    expect(taken).toBeGreaterThanOrEqual(2);
    expect(taken).toBeLessThanOrEqual(Math.ceil(seconds) + 1);
    // Every frame a page got is one of those snapshots, rendered once: 50 pages, no more distinct frames than reads.
    for (const c of clients) expect(c.frames.length).toBeGreaterThanOrEqual(2);
    expect(new Set(clients.flatMap((c) => c.frames)).size).toBeLessThanOrEqual(taken);

    // Once the server has seen the pages go, no more snapshots.
    await eventually('the ticks stopped', async () => {
      const n = snapshots;
      await sleep(1500);
      return snapshots === n;
    }, 15_000, 0);
    const idle = snapshots;
    await sleep(2500);
    expect(snapshots).toBe(idle);
  });

  it('a change reaches a listening page within a second', async () => {
    const client = listen(`${app.url}/dashboard/events`, bearer);
    try {
      await eventually('the first frame', () => client.frames.length >= 1);
      await sleep(Math.random() * 1000); // anywhere between two ticks
      const queued = await post(`${app.url}/api/v1/new_request`, newRequest('room-live-1'));
      expect(queued.json.outcome).toBe('queued');
      const t0 = Date.now();
      await eventually('the room on the page', () => client.frames.some((f) => f.includes('data-room="room-live-1"')), 3000, 5);
      // A tick a second (fixed rate) plus the one query: never more than a second and a bit.
      expect(Date.now() - t0).toBeLessThan(1250);
    } finally {
      client.close();
      await client.done;
    }
  });

  it('open pages do not hold up a stopping server: their streams end at once', async () => {
    const server = await startHttpServer({
      pool: db.pool,
      logger: testLogger,
      port: 0,
      hostname: '127.0.0.1',
      dashboard: { token: TOKEN },
    });
    const clients = [1, 2, 3].map(() => listen(`http://127.0.0.1:${server.port}/dashboard/events`, bearer));
    await eventually('every stream open', () => clients.every((c) => c.frames.length >= 1));
    const t0 = Date.now();
    await server.stop(); // graceMs is 10 s: a stream left open would hold it that long
    expect(Date.now() - t0).toBeLessThan(2000);
    await Promise.all(clients.map((c) => c.done)); // each stream ended (not aborted by us)
  });
});

describe('what it shows', () => {
  it('queue, agents (online or why not, load, by hand, paused), longest wait, rates; no customer data', async () => {
    const customer = {
      name: 'Zebulon Quartermaine',
      email: 'zebulon.q@customer.example',
      extras: JSON.stringify({ notes: 'secret-message-content', user_properties: [{ key: 'phone', value: '+62811' }] }),
    };
    await queue(db.pool, 'room-pii-1', newRequest('room-pii-1', { ...customer, source: 'wa' }));
    await db.pool.query(`update allocator.agents set external_load = 1 where id = 1002`);
    // Between two snapshots a request gets the last one (at most a second old): wait for the next.
    const snapshot = async () => (await get(`${app.url}/dashboard/snapshot.json`, { headers: bearer })).json;
    const snap = await eventually('the room in the snapshot', async () => {
      const s = await snapshot();
      return s.queue.some((r: { room_id: string }) => r.room_id === 'room-pii-1') && s;
    });
    const row = snap.queue.find((r: { room_id: string }) => r.room_id === 'room-pii-1');
    expect(row).toMatchObject({ source: 'wa', divisions: null, attempts: 0, last_error: null });
    expect(row.position).toBeGreaterThan(0);
    expect(row.waited_seconds).toBeGreaterThanOrEqual(0);
    expect(snap.waiting).toBe(snap.queue.length);
    expect(snap.longest_wait_seconds).toBeGreaterThanOrEqual(row.waited_seconds);
    expect(snap.qiscus).toEqual({ status: 'up', down_since: null });
    expect(snap.agents).toEqual([
      { id: 1001, name: 'Ayu', status: 'online', load: 0, capacity: 2, by_hand: 0, paused: false, divisions: [] },
      { id: 1002, name: 'Budi', status: 'unavailable in Qiscus', load: 1, capacity: 2, by_hand: 1, paused: false, divisions: [] },
    ]);

    // Assign what Ayu can take: the rate and the queue follow.
    const assigned = await assignAll(db.pool);
    expect(assigned.length).toBe(2);
    const after = await eventually('the assignments in the snapshot', async () => {
      const s = await snapshot();
      return s.assigned_last_minute === 2 && s;
    });
    expect(after.waiting).toBe(snap.waiting - 2);
    expect(after.agents[0]).toMatchObject({ id: 1001, load: 2 });
    expect(after.failures_last_hour).toBe(0);

    const { cookie } = await login(app.url);
    const page = (await get(`${app.url}/dashboard`, { headers: { cookie } })).text;
    const events = listen(`${app.url}/dashboard/events`, { cookie });
    await eventually('a frame', () => events.frames.length >= 1);
    events.close();
    await events.done;
    for (const text of [page, events.frames[0]!, JSON.stringify(after)]) {
      expect(text).toContain('room-pii-1');
      for (const secret of [customer.name, 'Zebulon', customer.email, 'secret-message-content', '+62811', 'ayu.agent@example.com']) {
        expect(text).not.toContain(secret);
      }
    }
    expect(page).toMatch(/<meter min="0" max="2" value="2"/);
    expect(page).toContain('unavailable in Qiscus');
  });

  it('lists the queue exactly as allocator.queue does: order, positions, divisions (priorities and routes too)', async () => {
    const other = await createTestDatabase();
    try {
      const q = other.pool;
      await q.query(`insert into allocator.divisions (id, name) values (439, 'Support'), (440, '')`);
      await q.query(`insert into allocator.routes (source, division_ids) values ('wa', '{439,440}')`);
      await q.query(`insert into allocator.routes (source, division_ids, overflow_seconds) values ('fb', '{439}', 0)`);
      await q.query(`insert into allocator.source_priority values ('line', 10)`);
      const sources = ['qiscus', 'wa', 'line', 'fb'];
      for (let i = 0; i < 130; i++) await queue(q, `q-${i}`, newRequest(`q-${i}`, { source: sources[i % 4] }));
      await q.query(`update allocator.sessions set attempts = 2, last_error = 'Qiscus 503' where room_id = 'q-5'`);
      const view = (await q.query(`select position, room_id, source, attempts, last_error, division_ids from allocator.queue limit 100`)).rows;
      const snap = await readSnapshot(q);
      expect(snap.waiting).toBe(130);
      const names: Record<string, string> = { 439: 'Support', 440: '#440' };
      expect(snap.queue.map(({ waited_seconds: _w, ...r }) => r)).toEqual(
        view.map((r) => ({
          position: Number(r.position),
          room_id: r.room_id,
          source: r.source,
          attempts: r.attempts,
          last_error: r.last_error,
          divisions: r.division_ids ? r.division_ids.map((d: string) => names[d]) : null,
        })),
      );
      expect(snap.queue[0]!.source).toBe('line'); // priority first
      expect(snap.queue.find((r) => r.source === 'wa')!.divisions).toEqual(['Support', '#440']);
      expect(snap.queue.find((r) => r.source === 'fb')!.divisions).toBeNull(); // overflowed: anyone
    } finally {
      await other.drop();
    }
  });

  it('serves its own script and stylesheet (nothing from elsewhere), without a login', async () => {
    const js = await get(`${app.url}/dashboard/assets/dashboard.js`);
    expect(js.status).toBe(200);
    expect(js.headers.get('content-type')).toMatch(/javascript/);
    expect(js.text).toContain("new EventSource('/dashboard/events')");
    expect((await get(`${app.url}/dashboard/assets/dashboard.css`)).headers.get('content-type')).toMatch(/text\/css/);
    expect((await get(`${app.url}/dashboard/assets/nope.js`)).status).toBe(404);
    const page = (await get(`${app.url}/dashboard`, { headers: bearer })).text;
    expect(page).not.toMatch(/(src|href)="(https?:)?\/\//);
  });
});

describe('with the database away', () => {
  it('the page says so and the JSON is a 503; no 500', async () => {
    const away = await startApp('postgres://nobody:nothing@127.0.0.1:1/none', { dashboard: { token: TOKEN } });
    try {
      const page = await get(`${away.url}/dashboard`, { headers: bearer });
      expect(page.status).toBe(200);
      expect(page.text).toContain('the database does not answer');
      const snap = await get(`${away.url}/dashboard/snapshot.json`, { headers: bearer });
      expect(snap.status).toBe(503);
      expect(snap.json.ok).toBe(false);
    } finally {
      await away.close();
    }
  });
});

describe('/readyz', () => {
  it('warns (still 200) when no webhook secret is set, and not when one is', async () => {
    const open = await get(`${app.url}/readyz`);
    expect(open.status).toBe(200);
    expect(open.json.warnings).toEqual([NO_SECRET_WARNING]);
    const secured = await startApp(db.url, { webhookSecret: 's' });
    try {
      const r = await get(`${secured.url}/readyz`);
      expect(r.status).toBe(200);
      expect(r.json.warnings).toEqual([]);
    } finally {
      await secured.close();
    }
  });
});
