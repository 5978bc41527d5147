/** The two webhooks end to end: real HTTP on loopback, the real SQL functions, rows checked in the database. */
import { describe, expect, it } from 'vitest';
import { fixture, newRequest, resolvedRequest, returningRequest } from '../support/fixtures.ts';
import type { RequestObservation } from '../../src/http/request-context.ts';
import { addAgents, assignAll } from '../support/sql.ts';
import { appWithDatabase, get, post, startApp } from './harness.ts';
import { eventually } from '../support/processes.ts';

const web = appWithDatabase();
const NEW = '/api/v1/new_request';
const CLOSE = '/api/v1/close_request';

async function webhookRow(id: string) {
  return (await web.db.pool.query(`select * from allocator.webhooks where id = $1`, [id])).rows[0];
}

describe('every fixture is accepted and stored', () => {
  for (const name of ['caa-new-customer.json', 'caa-returning-customer.json', 'caa-current-shape.json']) {
    it(`${name} → queued, payload stored as received`, async () => {
      const payload = fixture(name);
      const r = await post(web.app.url + NEW, payload);
      expect(r.status).toBe(200);
      expect(r.json).toMatchObject({ ok: true, outcome: 'queued', room_id: payload.room_id });
      expect(r.json.session_id).toMatch(/^\d+$/);
      const w = await webhookRow(r.json.webhook_id);
      expect(w).toMatchObject({ kind: 'new_request', room_id: payload.room_id, outcome: 'queued' });
      expect(w.payload).toEqual(payload); // unknown fields, extras as a string, nulls: all kept
      expect(w.request_id).toBe(r.headers.get('x-request-id'));
      const s = (await web.db.pool.query(`select * from allocator.sessions where id = $1`, [r.json.session_id])).rows[0];
      expect(s).toMatchObject({ room_id: payload.room_id, state: 'waiting', source: 'qiscus' });
    });
  }

  it('mar-resolved.json → resolved, after its room was queued', async () => {
    const payload = fixture('mar-resolved.json');
    const q = await post(web.app.url + NEW, newRequest(payload.service.room_id));
    expect(q.json.outcome).toBe('queued');
    const r = await post(web.app.url + CLOSE, payload);
    expect(r.status).toBe(200);
    expect(r.json).toMatchObject({ ok: true, outcome: 'resolved', room_id: payload.service.room_id,
      session_id: q.json.session_id });
    const w = await webhookRow(r.json.webhook_id);
    expect(w).toMatchObject({ kind: 'close_request', outcome: 'resolved' });
    expect(w.payload).toEqual(payload);
    const s = (await web.db.pool.query(`select * from allocator.sessions where id = $1`, [q.json.session_id])).rows[0];
    expect(s).toMatchObject({ state: 'resolved', service_id: String(payload.service.id) });
  });
});

describe('the reply says what happened', () => {
  it('queued, already_queued, resolved, already_resolved, returning customer queued again, duplicate', async () => {
    const room = '5550001';
    expect((await post(web.app.url + NEW, newRequest(room))).json.outcome).toBe('queued');
    expect((await post(web.app.url + NEW, newRequest(room))).json.outcome).toBe('already_queued');
    expect((await post(web.app.url + CLOSE, resolvedRequest(room, 900))).json.outcome).toBe('resolved');
    expect((await post(web.app.url + CLOSE, resolvedRequest(room, 900))).json.outcome).toBe('already_resolved');
    // a late copy of the opening webhook (same latest_service: none) is a duplicate, not a new customer
    expect((await post(web.app.url + NEW, newRequest(room))).json.outcome).toBe('duplicate');
    // the customer returns: latest_service names the resolved service
    const back = await post(web.app.url + NEW, returningRequest(room, 900));
    expect(back.json).toMatchObject({ ok: true, outcome: 'queued', room_id: room });
    const sessions = await web.db.pool.query(`select state from allocator.sessions where room_id = $1 order by id`, [room]);
    expect(sessions.rows.map((r) => r.state)).toEqual(['resolved', 'waiting']);
  });

  it('already_assigned when the room is held by an agent', async () => {
    const room = '5550002';
    await addAgents(web.db.pool, [77], { max_load: 1000 });
    await post(web.app.url + NEW, newRequest(room));
    const assigned = await assignAll(web.db.pool); // rooms of earlier tests are waiting too
    expect(assigned.map((a) => a.room_id)).toContain(room);
    expect((await post(web.app.url + NEW, newRequest(room))).json.outcome).toBe('already_assigned');
  });

  it('unknown_room for a resolution of a room we never had (stored, 200)', async () => {
    const r = await post(web.app.url + CLOSE, resolvedRequest('5550404'));
    expect(r.status).toBe(200);
    expect(r.json).toMatchObject({ ok: true, outcome: 'unknown_room', room_id: '5550404', session_id: null });
    expect((await webhookRow(r.json.webhook_id)).outcome).toBe('unknown_room');
  });

  it('room_id sent as a number is stored as its digits; a padded string is trimmed', async () => {
    const r = await post(web.app.url + NEW, { ...newRequest('x'), room_id: 5550003 });
    expect(r.json).toMatchObject({ outcome: 'queued', room_id: '5550003' });
    expect((await webhookRow(r.json.webhook_id)).payload.room_id).toBe('5550003');
    const t = await post(web.app.url + NEW, newRequest('  5550003 '));
    expect(t.json).toMatchObject({ outcome: 'already_queued', room_id: '5550003' });
    const c = await post(web.app.url + CLOSE, { service: { room_id: 5550003, id: 1 } });
    expect(c.json).toMatchObject({ outcome: 'resolved', room_id: '5550003' });
  });

  it('the content type may carry a charset, any case, or a +json suffix', async () => {
    for (const type of ['application/json; charset=utf-8', 'Application/JSON;Charset=UTF-8', 'application/vnd.qiscus+json']) {
      const r = await post(web.app.url + NEW, newRequest('5550005'), { 'content-type': type });
      expect(r.status, type).toBe(200);
    }
  });

  it('a UTF-8 BOM and non-ASCII text are fine', async () => {
    const body = Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(JSON.stringify(newRequest('5550006', { name: 'Dewi 🌸 Ñandú' })))]);
    const r = await post(web.app.url + NEW, new Uint8Array(body));
    expect(r.status).toBe(200);
    expect((await webhookRow(r.json.webhook_id)).payload.name).toBe('Dewi 🌸 Ñandú');
  });
});

describe('request id', () => {
  it('is generated when absent, returned, and stored with the webhook', async () => {
    const r = await post(web.app.url + NEW, newRequest('5550010'));
    const id = r.headers.get('x-request-id');
    expect(id).toMatch(/^[0-9a-f-]{36}$/);
    expect(r.json.request_id).toBe(id);
    expect((await webhookRow(r.json.webhook_id)).request_id).toBe(id);
  });

  it('is taken from X-Request-Id when sane, replaced when not', async () => {
    const mine = await post(web.app.url + NEW, newRequest('5550011'), { 'content-type': 'application/json', 'x-request-id': 'qiscus-abc.123' });
    expect(mine.headers.get('x-request-id')).toBe('qiscus-abc.123');
    expect((await webhookRow(mine.json.webhook_id)).request_id).toBe('qiscus-abc.123');
    const odd = await post(web.app.url + NEW, newRequest('5550011'), { 'content-type': 'application/json', 'x-request-id': 'a b'.repeat(100) });
    expect(odd.headers.get('x-request-id')).toMatch(/^[0-9a-f-]{36}$/);
  });

  it('is on error replies too', async () => {
    const r = await get(web.app.url + '/nope');
    expect(r.status).toBe(404);
    expect(r.headers.get('x-request-id')).toBeTruthy();
  });
});

describe('observe (the metrics seam)', () => {
  it('is called once per request with a fixed route label, status, latency and outcome', async () => {
    const seen: RequestObservation[] = [];
    const watched = await startApp(web.db.url, { observe: (o) => seen.push(o) });
    try {
      await post(watched.url + NEW, newRequest('5550020'));
      await post(watched.url + CLOSE, { service: {} });
      await get(watched.url + '/random/path/123');
      await get(watched.url + '/healthz');
    } finally {
      await watched.close();
    }
    expect(seen.map((o) => [o.route, o.method, o.status, o.outcome])).toEqual([
      ['/api/v1/new_request', 'POST', 200, 'queued'],
      ['/api/v1/close_request', 'POST', 422, undefined],
      ['other', 'GET', 404, undefined],
      ['/healthz', 'GET', 200, undefined],
    ]);
    for (const o of seen) {
      expect(o.seconds).toBeGreaterThan(0);
      expect(o.requestId).toBeTruthy();
    }
  });

  it('a throwing observer does not fail the request', async () => {
    const watched = await startApp(web.db.url, { observe: () => { throw new Error('metrics bug'); } });
    try {
      expect((await post(watched.url + NEW, newRequest('5550021'))).status).toBe(200);
    } finally {
      await watched.close();
    }
  });
});

describe('health', () => {
  it('/healthz is 200', async () => {
    const r = await get(web.app.url + '/healthz');
    expect(r.status).toBe(200);
    expect(r.json).toEqual({ ok: true });
  });
  it('/readyz is 200 on a migrated database', async () => {
    const r = await get(web.app.url + '/readyz');
    expect(r.status, r.text).toBe(200);
    expect(r.json).toMatchObject({ ok: true });
  });
});

describe('concurrency', () => {
  it('a resolution whose batch loses a deadlock is sent again and answered 200, not 503', async () => {
    // A DBA's transaction holds room dl-1's session row, the web app's batch holds the room's lock and waits for
    // that row; then the DBA's transaction asks for the room's lock. PostgreSQL breaks the cycle by aborting the
    // transaction that waited first (the web app's): the batch is sent again once the row is free.
    const room = 'dl-1';
    await addAgents(web.db.pool, [8800]);
    expect((await post(web.app.url + NEW, newRequest(room))).status).toBe(200);
    await assignAll(web.db.pool);
    const dba = await web.db.pool.connect();
    try {
      await dba.query('begin');
      await dba.query(`select from allocator.sessions where room_id = $1 for update`, [room]);
      const reply = post(web.app.url + CLOSE, resolvedRequest(room));
      await eventually('the web app waits for the row', async () => {
        const w = await web.db.pool.query(
          `select count(*)::int as n from pg_stat_activity
           where application_name = 'allocator' and wait_event_type = 'Lock' and query like '%accept_requests%'`);
        return w.rows[0].n > 0;
      }, 5_000);
      await dba.query(`select pg_advisory_xact_lock(1364, hashtext($1))`, [room]); // the web app's batch is the victim
      await dba.query('commit');
      const r = await reply;
      expect([r.status, r.json.outcome]).toEqual([200, 'resolved']);
    } finally {
      dba.release();
    }
    const s = await web.db.pool.query(`select state::text from allocator.sessions where room_id = $1`, [room]);
    expect(s.rows).toEqual([{ state: 'resolved' }]);
  });

  it('200 concurrent copies of one allocation webhook leave exactly one open session', async () => {
    const room = '5559999';
    const replies = await Promise.all(Array.from({ length: 200 }, () => post(web.app.url + NEW, newRequest(room))));
    expect(replies.map((r) => r.status)).toEqual(Array(200).fill(200));
    const outcomes = replies.map((r) => r.json.outcome);
    expect(outcomes.filter((o) => o === 'queued')).toHaveLength(1);
    expect(outcomes.filter((o) => o === 'already_queued')).toHaveLength(199);
    expect(new Set(replies.map((r) => r.json.session_id)).size).toBe(1);
    const open = await web.db.pool.query(
      `select count(*)::int as n from allocator.sessions where room_id = $1 and state in ('waiting','reserved','assigned')`, [room]);
    expect(open.rows[0].n).toBe(1);
    const hooks = await web.db.pool.query(`select count(*)::int as n from allocator.webhooks where room_id = $1`, [room]);
    expect(hooks.rows[0].n).toBe(200);
    expect((await web.db.pool.query(`select * from allocator.check_invariants()`)).rows).toEqual([]);
  });
});

describe('a burst of resolutions', () => {
  // A database of its own: the rooms and agents of the tests above would be counted here.
  const own = appWithDatabase();

  it('300 at once, each room resolved twice (a redelivery): every one 200, every slot freed, in a few calls', async () => {
    // Agents who resolve rooms the moment they get them send one resolution per assignment: these go to the
    // database in groups (ingest.ts), whose rows are locked in one order, so no resolution loses a deadlock.
    await own.db.pool.query(`update allocator.settings set value = '4' where key = 'default_max_load'`);
    await addAgents(own.db.pool, Array.from({ length: 40 }, (_, i) => 7000 + i));
    const rooms = Array.from({ length: 150 }, (_, i) => `burst-${i}`);
    for (const room of rooms) expect((await post(own.app.url + NEW, newRequest(room))).status).toBe(200);
    expect(await assignAll(own.db.pool)).toHaveLength(150);
    const replies = await Promise.all([...rooms, ...rooms].map((room) => post(own.app.url + CLOSE, resolvedRequest(room))));
    expect(replies.map((r) => r.status)).toEqual(Array(300).fill(200));
    const outcomes = replies.map((r) => r.json.outcome);
    expect(outcomes.filter((o) => o === 'resolved')).toHaveLength(150);
    expect(outcomes.filter((o) => o === 'already_resolved')).toHaveLength(150);
    const open = await own.db.pool.query(`select count(*)::int as n from allocator.sessions where state <> 'resolved'`);
    expect(open.rows[0].n).toBe(0);
    expect((await own.db.pool.query(`select coalesce(sum(our_load), 0)::int as n from allocator.agents`)).rows[0].n).toBe(0);
    expect((await own.db.pool.query(`select * from allocator.check_invariants()`)).rows).toEqual([]);
    // Grouped: the webhooks stored in one transaction share its start (received_at is now()); far fewer
    // transactions than webhooks.
    const transactions = await own.db.pool.query(
      `select count(distinct received_at)::int as n from allocator.webhooks where kind = 'close_request'`);
    expect(transactions.rows[0].n).toBeLessThan(150);
  });
});
