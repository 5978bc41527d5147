/**
 * Commands of the model-based test: plain records (so a shrunk counterexample can be pasted into
 * regressions.test.ts as is), their fast-check arbitraries, and a harness that applies each command to
 * PostgreSQL and to the reference model (model.ts) and then checks that both agree and that the service's
 * invariants hold (allocator.check_invariants() and the checks in compare()).
 */
import { isDeepStrictEqual } from 'node:util';
import fc from 'fast-check';
import type pg from 'pg';
import { newRequest, resolvedRequest, type Json } from '../support/fixtures.ts';
import { Model, SQL_RULES, type Reservation, type RosterEntry, type Rules, type WebhookResult } from './model.ts';

// ---------------------------------------------------------------------------------------------------------------
// The universe: small, so that rooms, agents and service ids collide.

const AGENTS = [1, 2, 3, 4] as const;
const ROOMS = 6;
const SERVICES = [7, 8, 9] as const;
const DIVISIONS = [10, 20, 30] as const;
/**
 * Where each room's customer writes from (the webhook's `source` and `channel.id`; a channel belongs to one
 * source, and some webhooks have no channel): room r<n> is ROOM_CHANNELS[n - 1].
 */
const ROOM_CHANNELS: ReadonlyArray<{ source: string; channel: number | null }> = [
  { source: 'wa', channel: 1 },
  { source: 'wa', channel: 2 },
  { source: 'wa', channel: null },
  { source: 'qiscus', channel: 3 },
  { source: 'qiscus', channel: null },
  { source: 'line', channel: null },
];

export type RosterStatus = 'online' | 'away' | 'forced' | 'supervisor' | 'vanish';

export type Command =
  /** Allocation webhook for room r<room>; latest_service.id = prior (null: a new customer). */
  | { kind: 'newRequest'; room: number; prior: number | null }
  /** Mark-as-Resolved webhook for room r<room> with service.id = service. */
  | { kind: 'resolve'; room: number; service: number | null }
  /** Mark-as-Resolved webhook for the pick-th room with an agent (reserved or assigned), else the pick-th open room. */
  | { kind: 'resolveOpen'; pick: number; service: number | null; byAgent?: boolean }
  /** The pick-th most recent earlier webhook (of either kind), delivered again. */
  | { kind: 'duplicate'; pick: number }
  | { kind: 'reserve' }
  /**
   * Outcome of a reservation: the pick-th most recent of those still current (0: the last one), or with
   * `stale`, of all reservations made so far (most of them stale: rescued, resolved or reported already).
   */
  | { kind: 'confirm'; pick: number; stale?: boolean; service: number | null }
  /** `unanswered`: a timeout (no answer), else an HTTP 503 */
  | { kind: 'failTransient'; pick: number; stale?: boolean; maybeAssigned: boolean; unanswered?: boolean }
  | { kind: 'failForAgent'; pick: number; stale?: boolean }
  /** release(attempt, reason, delayed ? 3600 : 0, maybeAssigned) */
  | { kind: 'release'; pick: number; stale?: boolean; delayed: boolean; maybeAssigned: boolean }
  /** Every lease runs out, then rescue_expired(). */
  | { kind: 'leaseExpires' }
  /** Every pending backoff ends. */
  | { kind: 'timePasses' }
  /**
   * sync_agents(roster, now(), complete) with agent i+1 as agents[i] says ('vanish': left out of the list);
   * current_customer_count = our assigned rooms + byHand (byHand -1: Qiscus shows fewer than ours).
   */
  | { kind: 'roster'; agents: Array<{ status: RosterStatus; byHand: number }>; complete: boolean }
  | { kind: 'defaultMaxLoad'; value: number }
  | { kind: 'agentMaxLoad'; agent: number; value: number | null }
  | { kind: 'pause'; agent: number; paused: boolean }
  | { kind: 'maxAttempts'; value: number }
  /** insert into allocator.routes: source and channel_id (null: any), division_ids, overflow_seconds = 3600 × hours. */
  | ({ kind: 'addRoute' } & RouteFields)
  /** update the pick-th route (by id) to these values. */
  | ({ kind: 'changeRoute'; pick: number } & RouteFields)
  | { kind: 'deleteRoute'; pick: number }
  /**
   * A complete pull of divisions: sync_divisions with division DIVISIONS[i] listed with agents members[i], or not
   * listed at all (null: the division was deleted in Qiscus).
   */
  | { kind: 'divisions'; members: Array<number[] | null> }
  /** An hour passes for the overflow of routes: every room's queued_at (and overflow_at) an hour earlier. */
  | { kind: 'hourPasses' };

export interface RouteFields {
  source: string | null;
  channel: number | null;
  divisions: number[];
  overflowHours: number | null;
  position: number;
}

// ---------------------------------------------------------------------------------------------------------------
// Arbitraries

/** fc.record, always with a plain prototype (so a printed counterexample pastes as is). */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
const rec = ((model: any) => fc.record(model, { noNullPrototype: true })) as typeof fc.record;

const room = fc.integer({ min: 1, max: ROOMS });
const service = fc.constantFrom(...SERVICES);
const agent = fc.constantFrom(...AGENTS);
const pick = fc.nat({ max: 4 });
const stale = fc.oneof({ arbitrary: fc.constant(false), weight: 4 }, { arbitrary: fc.constant(true), weight: 1 });

const rosterEntry = (online: number) =>
  rec({
    status: fc.oneof(
      { arbitrary: fc.constant<RosterStatus>('online'), weight: online },
      { arbitrary: fc.constantFrom<RosterStatus>('away', 'forced', 'supervisor', 'vanish'), weight: 1 },
    ),
    byHand: fc.oneof({ arbitrary: fc.constant(0), weight: 4 }, { arbitrary: fc.integer({ min: -1, max: 2 }), weight: 1 }),
  });

const rosterArb = (online = 3): fc.Arbitrary<Extract<Command, { kind: 'roster' }>> =>
  rec({
    kind: fc.constant('roster' as const),
    agents: fc.tuple(...AGENTS.map(() => rosterEntry(online))),
    complete: fc.oneof({ arbitrary: fc.constant(true), weight: 4 }, { arbitrary: fc.constant(false), weight: 1 }),
  });

const commandArb: fc.Arbitrary<Command> = fc.oneof(
  { weight: 10, arbitrary: rec({ kind: fc.constant('newRequest' as const), room, prior: fc.option(service, { freq: 2 }) }) },
  { weight: 1, arbitrary: rec({ kind: fc.constant('resolve' as const), room, service: fc.option(service, { freq: 6 }) }) },
  {
    weight: 3,
    arbitrary: rec({ kind: fc.constant('resolveOpen' as const), pick, service: fc.option(service, { freq: 6 }), byAgent: fc.boolean() }),
  },
  { weight: 2, arbitrary: rec({ kind: fc.constant('duplicate' as const), pick }) },
  { weight: 8, arbitrary: fc.constant({ kind: 'reserve' as const }) },
  { weight: 4, arbitrary: rec({ kind: fc.constant('confirm' as const), pick, stale, service: fc.option(service, { freq: 2 }) }) },
  { weight: 2, arbitrary: rec({ kind: fc.constant('failTransient' as const), pick, stale, maybeAssigned: fc.boolean(), unanswered: fc.boolean() }) },
  { weight: 2, arbitrary: rec({ kind: fc.constant('failForAgent' as const), pick, stale }) },
  {
    weight: 1,
    arbitrary: rec({ kind: fc.constant('release' as const), pick, stale, delayed: fc.boolean(), maybeAssigned: fc.boolean() }),
  },
  { weight: 1, arbitrary: fc.constant({ kind: 'leaseExpires' as const }) },
  { weight: 3, arbitrary: fc.constant({ kind: 'timePasses' as const }) },
  { weight: 3, arbitrary: rosterArb() },
  { weight: 1, arbitrary: rec({ kind: fc.constant('defaultMaxLoad' as const), value: fc.integer({ min: 0, max: 3 }) }) },
  {
    weight: 1,
    arbitrary: rec({
      kind: fc.constant('agentMaxLoad' as const),
      agent,
      value: fc.option(fc.integer({ min: 0, max: 3 }), { freq: 3 }),
    }),
  },
  { weight: 2, arbitrary: rec({ kind: fc.constant('pause' as const), agent, paused: fc.boolean() }) },
  { weight: 1, arbitrary: rec({ kind: fc.constant('maxAttempts' as const), value: fc.integer({ min: 1, max: 4 }) }) },
);

const routeFields = {
  source: fc.constantFrom(null, null, 'wa', 'qiscus'),
  channel: fc.constantFrom(null, null, null, 1, 2, 3),
  divisions: fc.subarray([...DIVISIONS], { minLength: 1, maxLength: 2 }),
  // 0: overflowed at once; 1, 2: after one or two hourPasses; null: never
  overflowHours: fc.constantFrom(null, null, 0, 1, 2),
  position: fc.integer({ min: -1, max: 1 }),
};

const divisionsArb: fc.Arbitrary<Extract<Command, { kind: 'divisions' }>> = rec({
  kind: fc.constant('divisions' as const),
  members: fc.tuple(...DIVISIONS.map(() => fc.option(fc.subarray([...AGENTS]), { freq: 8 }))),
});

/** With routes and divisions: the commands above, and routes, membership and overflow times changing. */
const routedCommandArb: fc.Arbitrary<Command> = fc.oneof(
  { weight: 12, arbitrary: commandArb },
  { weight: 1, arbitrary: rec({ kind: fc.constant('addRoute' as const), ...routeFields }) },
  { weight: 1, arbitrary: rec({ kind: fc.constant('changeRoute' as const), pick, ...routeFields }) },
  { weight: 1, arbitrary: rec({ kind: fc.constant('deleteRoute' as const), pick }) },
  { weight: 1, arbitrary: divisionsArb },
  { weight: 1, arbitrary: fc.constant({ kind: 'hourPasses' as const }) },
);

/**
 * A run: an initial roster (mostly online), then the commands; two runs in three with routes: then the roster is
 * followed by a pull of divisions and a route.
 */
export const scenarioArb = (maxCommands: number): fc.Arbitrary<Command[]> =>
  fc.oneof(
    fc.tuple(rosterArb(8), fc.array(commandArb, { minLength: 1, maxLength: maxCommands, size: 'max' })).map(([r, cs]) => [r, ...cs]),
    fc
      .tuple(
        rosterArb(8),
        divisionsArb,
        rec({ kind: fc.constant('addRoute' as const), ...routeFields }),
        fc.array(routedCommandArb, { minLength: 1, maxLength: maxCommands - 2, size: 'max' }),
      )
      .map(([r, d, route, cs]) => [r, d, route, ...cs]),
    fc
      .tuple(rosterArb(8), divisionsArb, fc.array(routedCommandArb, { minLength: 1, maxLength: maxCommands - 1, size: 'max' }))
      .map(([r, d, cs]) => [r, d, ...cs]),
  );

// ---------------------------------------------------------------------------------------------------------------
// The harness

type Db = pg.ClientBase | pg.Pool;

/** Settings of every run: no backoff ends by itself (see timePasses), and leases do not run out by themselves.
 * Lengthened on purpose, not shortened: the model has no wall clock, time passes only by its commands (timePasses,
 * leaseExpires); at the shipped lease (30 s) and backoff (from 2 s) one could end on its own mid-run, unseen by it. */
const RUN_SETTINGS: Record<string, string> = {
  default_max_load: '1', // 4 agents, 6 rooms: rooms wait for a free agent
  lease_seconds: '3600',
  retry_base_seconds: '3600',
  retry_max_seconds: '100000',
  max_attempts: '3', // shipped 8: a run of a few dozen commands then reaches "failed" too
  // Outages of Qiscus pace calls by wall-clock time (one probe a second): tested in test/sql/liveness.test.ts.
  outage_failures: '1000000',
};

export async function resetDatabase(db: Db): Promise<void> {
  await db.query(
    `truncate allocator.agents, allocator.sessions, allocator.attempts, allocator.webhooks, allocator.routes,
              allocator.divisions restart identity cascade`,
  );
  await db.query(
    `update allocator.settings s set value = d.value from jsonb_each_text($1::jsonb) d where s.key = d.key`,
    [JSON.stringify(RUN_SETTINGS)],
  );
}

class Mismatch extends Error {
  override name = 'Mismatch';
}

/** `by`: who resolved the room (resolved_by.id): its agent, or null for an admin. */
type Webhook =
  | { kind: 'new'; room: string; prior: number | null }
  | { kind: 'close'; room: string; service: number | null; by?: number | null };

const num = (v: unknown): number | null => (v === null || v === undefined ? null : Number(v));
const nums = (v: unknown): number[] | null => (v === null || v === undefined ? null : (v as unknown[]).map(Number));
const roomName = (n: number) => `r${n}`;

/** Room r<n>'s source and channel (ROOM_CHANNELS). */
const channelOf = (room: string) => ROOM_CHANNELS[Number(room.slice(1)) - 1]!;

function newRequestPayload(room: string, prior: number | null): Json {
  const { source, channel } = channelOf(room);
  return newRequest(room, {
    latest_service: prior === null ? null : { id: prior, room_id: room, is_resolved: true },
    source,
    ...(channel === null ? {} : { channel: { id: channel, name: `channel ${channel}`, source } }),
  });
}

function resolvedPayload(room: string, service: number | null, by: number | null): Json {
  const p = resolvedRequest(room) as { resolved_by: Record<string, unknown>; service: Record<string, unknown> };
  return { ...p, service: { ...p.service, id: service }, ...(by === null ? {} : { resolved_by: { ...p.resolved_by, id: by, type: 'agent' } }) };
}

const routeRow = (r: RouteFields) => [r.source, r.channel, r.divisions, r.overflowHours === null ? null : r.overflowHours * 3600, r.position];

function format(cmd: Command): string {
  return JSON.stringify(cmd);
}

/**
 * Applies commands to the database and to the model and compares them after each one. Create one per run, on a
 * database just reset with resetDatabase().
 */
export class Harness {
  readonly model: Model;
  readonly webhooks: Webhook[] = [];
  readonly reservations: Reservation[] = [];
  readonly log: string[] = [];
  /** What happened, by kind: to see that a run exercises what it should (model.test.ts prints the totals). */
  readonly stats: Record<string, number> = {};
  private step = 0;
  private delivered = 0;
  private loads = new Map<number, number>();

  constructor(
    private readonly db: Db,
    rules: Rules = SQL_RULES,
  ) {
    this.model = new Model(rules);
    this.model.defaultMaxLoad = Number(RUN_SETTINGS.default_max_load);
    this.model.maxAttempts = Number(RUN_SETTINGS.max_attempts);
  }

  async run(commands: readonly Command[]): Promise<void> {
    for (const c of commands) await this.apply(c);
  }

  private fail(what: string, db: unknown, model: unknown): never {
    throw new Mismatch(
      `step ${this.step} ${this.log[this.log.length - 1]}: ${what}\n  db:    ${JSON.stringify(db)}\n  model: ${JSON.stringify(model)}` +
        `\n  steps so far:\n    ${this.log.join('\n    ')}`,
    );
  }

  private count(what: string): void {
    this.stats[what] = (this.stats[what] ?? 0) + 1;
  }

  private same(what: string, db: unknown, model: unknown): void {
    if (!isDeepStrictEqual(db, model)) this.fail(what, db, model);
  }

  /** The reservation a command names (see Command); undefined when there is none yet. */
  private reservation(cmd: { pick: number; stale?: boolean }): Reservation | undefined {
    const current = this.reservations.filter((r) => this.model.sessions[r.sessionId - 1]!.attemptId === r.attemptId);
    const from = cmd.stale || current.length === 0 ? this.reservations : current;
    const n = from.length;
    return n === 0 ? undefined : from[n - 1 - (cmd.pick % n)];
  }

  async apply(cmd: Command): Promise<void> {
    this.step += 1;
    this.log.push(format(cmd));
    this.model.tick();
    await this.execute(cmd);
    await this.compare();
    await this.checkLiveness();
    if (process.env.MODEL_TRACE) console.log(`${this.step} ${format(cmd)}\n    ${this.describe()}`);
  }

  /** The model's state in one line (MODEL_TRACE=1 prints it after every step). */
  describe(): string {
    const m = this.model;
    const r = this.reservations[this.reservations.length - 1];
    return [
      `last reservation: ${r ? `#${r.attemptId} r${r.room.slice(1)}->${r.agentId}` : '-'}`,
      `sessions: ${m.sessions.map((s) => `${s.id}:${s.room}:${s.state}${s.agentId === null ? '' : `@${s.agentId}`}${s.holdsSlot ? '(held)' : ''}`).join(' ')}`,
      `loads: ${[...m.agents.values()].map((a) => `${a.id}=${a.load}+${a.externalLoad}/${m.capacity(a)}`).join(' ')}`,
    ].join(' | ');
  }

  private async webhook(w: Webhook): Promise<void> {
    let db: { outcome: string; session_id: string | null };
    let model: WebhookResult;
    if (w.kind === 'new') {
      db = (await this.db.query(`select * from allocator.accept_new_request($1::jsonb, 'model')`, [newRequestPayload(w.room, w.prior)])).rows[0];
      model = this.model.acceptNewRequest(w.room, w.prior, channelOf(w.room).source, channelOf(w.room).channel);
    } else {
      db = (await this.db.query(`select * from allocator.accept_close_request($1::jsonb, 'model')`, [resolvedPayload(w.room, w.service, w.by ?? null)])).rows[0];
      model = this.model.acceptCloseRequest(w.room, w.service, w.by ?? null);
    }
    const got = { outcome: db.outcome, sessionId: num(db.session_id) };
    this.count(`${w.kind}:${db.outcome}`);
    const what = `${w.kind === 'new' ? 'accept_new_request' : 'accept_close_request'} result`;
    if (model.sessionId === undefined) this.same(what, { outcome: got.outcome }, { outcome: model.outcome });
    else this.same(what, got, model);
    // Invariant 3: every webhook is stored, with what it did.
    this.delivered += 1;
    const logged = (await this.db.query(`select count(*)::int as n, (array_agg(kind || ' ' || room_id || ' ' || outcome order by id desc))[1] as last
                                          from allocator.webhooks`)).rows[0];
    this.same('allocator.webhooks: one row per delivery, the last one saying what it did', logged,
      { n: this.delivered, last: `${w.kind === 'new' ? 'new_request' : 'close_request'} ${w.room} ${got.outcome}` });
  }

  private async execute(cmd: Command): Promise<void> {
    const m = this.model;
    const db = this.db;
    switch (cmd.kind) {
      case 'newRequest': {
        const w: Webhook = { kind: 'new', room: roomName(cmd.room), prior: cmd.prior };
        this.webhooks.push(w);
        return this.webhook(w);
      }
      case 'resolve': {
        const w: Webhook = { kind: 'close', room: roomName(cmd.room), service: cmd.service };
        this.webhooks.push(w);
        return this.webhook(w);
      }
      case 'resolveOpen': {
        const served = m.sessions.filter((s) => s.state === 'reserved' || s.state === 'assigned');
        const open = served.length > 0 ? served : m.sessions.filter((s) => s.state === 'waiting');
        if (open.length === 0) return;
        const target = open[cmd.pick % open.length]!;
        const w: Webhook = { kind: 'close', room: target.room, service: cmd.service, by: cmd.byAgent ? target.agentId : null };
        this.webhooks.push(w);
        return this.webhook(w);
      }
      case 'duplicate': {
        const n = this.webhooks.length;
        if (n > 0) await this.webhook(this.webhooks[n - 1 - (cmd.pick % n)]!);
        return;
      }
      case 'reserve': {
        const tied = m.heldCandidates();
        const row = (await db.query(`select * from allocator.reserve()`)).rows[0];
        const expected = m.reserve();
        const got = row
          ? { attemptId: Number(row.attempt_id), sessionId: Number(row.session_id), room: row.room_id as string,
              agentId: Number(row.agent_id), attempt: row.attempt as number }
          : null;
        this.same('reserve() result', got, expected);
        // A routed room goes only to an agent of its divisions, until it overflows (not checked for the retry of a
        // held room: that goes back to its agent, who may hold it already).
        if (got && m.routes.length > 0 && !m.sessions[got.sessionId - 1]!.uncertain) {
          const r = (await db.query(`select s.division_ids, allocator.may_serve(s.division_ids, s.overflow_at, a.division_ids) as ok
                                       from allocator.sessions s join allocator.agents a on a.id = s.agent_id where s.id = $1`, [got.sessionId])).rows[0];
          if (!r.ok) this.fail(`room ${got.room} went to agent ${got.agentId}, who may not serve it`, r, null);
          this.count(r.division_ids === null ? 'reserve:unrouted' : 'reserve:routed');
        }
        if (tied.length === 0) {
          const due = m.queue().filter((s) => m.due(s)).length;
          this.count(expected ? 'reserve:row' : due === 0 ? 'reserve:none(nothing due)' : 'reserve:none(no agent)');
        }
        else if (expected && tied.some((s) => s.id === expected.sessionId)) this.count(`reserve:held(${tied.length})`);
        else this.count(`reserve:held(${tied.length})-let-go:${expected ? 'row' : 'none'}`);
        if (expected) this.reservations.push(expected);
        return;
      }
      case 'confirm': {
        const r = this.reservation(cmd);
        if (!r) return;
        const ok = (await db.query(`select allocator.confirm($1, $2) as ok`, [r.attemptId, cmd.service])).rows[0].ok;
        this.count(`confirm:${ok}`);
        return this.same(`confirm(${r.attemptId}) result`, ok, m.confirm(r.attemptId, cmd.service));
      }
      case 'failTransient': {
        const r = this.reservation(cmd);
        if (!r) return;
        const unanswered = cmd.unanswered ?? false;
        const s = (await db.query(`select allocator.fail_transient($1, $2, null, $3, $4) as s`,
          [r.attemptId, unanswered ? 'timeout' : 'HTTP 503', cmd.maybeAssigned, unanswered])).rows[0].s;
        this.count(`fail_transient:${s}`);
        return this.same(`fail_transient(${r.attemptId}) result`, s, m.failTransient(r.attemptId, cmd.maybeAssigned, unanswered));
      }
      case 'failForAgent': {
        const r = this.reservation(cmd);
        if (!r) return;
        const s = (await db.query(`select allocator.fail_for_agent($1, 'HTTP 400 agent refused') as s`, [r.attemptId])).rows[0].s;
        this.count(`fail_for_agent:${s}`);
        return this.same(`fail_for_agent(${r.attemptId}) result`, s, m.failForAgent(r.attemptId));
      }
      case 'release': {
        const r = this.reservation(cmd);
        if (!r) return;
        const s = (
          await db.query(`select allocator.release_reservation($1, 'shutting down', $2, $3) as s`, [r.attemptId, cmd.delayed ? 3600 : 0, cmd.maybeAssigned])
        ).rows[0].s;
        this.count(`release:${s}`);
        return this.same(`release(${r.attemptId}) result`, s, m.release(r.attemptId, cmd.delayed, cmd.maybeAssigned));
      }
      case 'leaseExpires': {
        await db.query(`update allocator.sessions set lease_expires_at = now() - interval '1 second' where lease_expires_at is not null`);
        const n = (await db.query(`select allocator.rescue_expired() as n`)).rows[0].n;
        this.count(`rescued:${n}`);
        return this.same('rescue_expired() result', n, m.expireLeases());
      }
      case 'timePasses': {
        await db.query(`update allocator.sessions set next_attempt_at = now() where state = 'waiting' and next_attempt_at > now()`);
        m.timePasses();
        return;
      }
      case 'roster': {
        const entries: RosterEntry[] = [];
        cmd.agents.forEach((a, i) => {
          const id = AGENTS[i];
          if (id === undefined || a.status === 'vanish') return;
          entries.push({
            id,
            type: a.status === 'supervisor' ? 'supervisor' : 'agent',
            isAvailable: a.status !== 'away',
            forceOffline: a.status === 'forced',
            count: Math.max(m.ours(id) + a.byHand, 0),
          });
        });
        const roster = entries.map((e) => ({
          id: e.id, name: `agent ${e.id}`, email: `agent${e.id}@example.com`, is_available: e.isAvailable,
          force_offline: e.forceOffline, current_customer_count: e.count, type_as_string: e.type,
        }));
        const n = (await db.query(`select allocator.sync_agents($1::jsonb, now(), $2) as n`, [JSON.stringify(roster), cmd.complete])).rows[0].n;
        return this.same('sync_agents() result', n, m.syncAgents(entries, cmd.complete));
      }
      case 'defaultMaxLoad':
        await db.query(`update allocator.settings set value = $1 where key = 'default_max_load'`, [String(cmd.value)]);
        m.defaultMaxLoad = cmd.value;
        return;
      case 'agentMaxLoad':
        await db.query(`update allocator.agents set max_load = $2 where id = $1`, [cmd.agent, cmd.value]);
        m.setAgentMaxLoad(cmd.agent, cmd.value);
        return;
      case 'pause':
        await db.query(`update allocator.agents set paused = $2 where id = $1`, [cmd.agent, cmd.paused]);
        m.setPaused(cmd.agent, cmd.paused);
        return;
      case 'maxAttempts':
        await db.query(`update allocator.settings set value = $1 where key = 'max_attempts'`, [String(cmd.value)]);
        m.maxAttempts = cmd.value;
        return;
      case 'addRoute': {
        const { kind: _, ...r } = cmd;
        const id = (await db.query(`insert into allocator.routes (source, channel_id, division_ids, overflow_seconds, position)
                                    values ($1, $2, $3, $4, $5) returning id`, routeRow(r))).rows[0].id;
        return this.same('the new route\'s id', Number(id), m.addRoute(r).id);
      }
      case 'changeRoute': {
        const { kind: _, pick: p, ...r } = cmd;
        const route = m.routes[p % Math.max(m.routes.length, 1)];
        if (!route) return;
        await db.query(`update allocator.routes set source = $1, channel_id = $2, division_ids = $3, overflow_seconds = $4,
                          position = $5 where id = $6`, [...routeRow(r), route.id]);
        return m.changeRoute(route.id, r);
      }
      case 'deleteRoute': {
        const route = m.routes[cmd.pick % Math.max(m.routes.length, 1)];
        if (!route) return;
        await db.query(`delete from allocator.routes where id = $1`, [route.id]);
        return m.deleteRoute(route.id);
      }
      case 'divisions': {
        const listed = DIVISIONS.flatMap((d, i) => (cmd.members[i] ? [{ d, agents: cmd.members[i]! }] : []));
        const n = (await db.query(`select allocator.sync_divisions($1::jsonb, $2::jsonb) as n`, [
          JSON.stringify(listed.map(({ d }) => ({ id: d, name: `division ${d}` }))),
          JSON.stringify(listed.map(({ d, agents }) => ({ division_id: d, agent_ids: agents }))),
        ])).rows[0].n;
        return this.same('sync_divisions() result', n, m.syncDivisions(new Map(listed.map(({ d, agents }) => [d, agents]))));
      }
      case 'hourPasses':
        await db.query(`update allocator.sessions set queued_at = queued_at - interval '1 hour',
                          overflow_at = overflow_at - interval '1 hour'`);
        return m.hourPasses();
    }
  }

  /**
   * Liveness (README, How it works: "Nothing waits for a clock when there is evidence"), after every step:
   * whenever a room is waiting and due, and an agent that may serve it has a free slot by Qiscus's count (ours +
   * by hand, as of the last roster pull), a reservation must come out now, not after some lease, hold or poll.
   * "May serve": not refused by it, allowed by the room's route (may_serve: no route, overflowed, or a division
   * in common), and, when the room's last try was with another agent that could take it now (eligible and may
   * serve it), that agent only.
   * reserve() is called in a transaction that is rolled back, so the check changes nothing.
   */
  private async checkLiveness(): Promise<void> {
    const m = this.model;
    const agents = [...m.agents.values()];
    const waiting = m.queue().filter((s) => m.due(s));
    const pair = waiting
      .flatMap((s) => {
        if (s.holdsSlot) return m.online(m.agents.get(s.agentId!)) ? [{ s, a: s.agentId! }] : [];
        return agents
          .filter((a) => m.eligible(a) && m.mayServe(s, a) && !s.excluded.includes(a.id) && m.notWaitingForLast(s, a))
          .map((a) => ({ s, a: a.id }));
      })
      .at(0);
    if (!pair) return;
    const c = this.db as pg.ClientBase;
    // One round trip. A rolled-back insert still uses up an id: the attempts' sequence is put back to the last id
    // (ids have no gaps: compare() checks them against the model), so later ids match the model.
    const restore = `select setval(pg_get_serial_sequence('allocator.attempts', 'id'), coalesce(max(id), 1), max(id) is not null)
                       from allocator.attempts`;
    let results: pg.QueryResult[];
    try {
      results = (await c.query(`begin; select room_id from allocator.reserve(); rollback; ${restore}`)) as unknown as pg.QueryResult[];
    } catch (e) {
      await c.query('rollback');
      await c.query(restore);
      throw e;
    }
    if (!results[1]!.rows[0]) {
      this.fail(`liveness: room ${pair.s.room} waits while agent ${pair.a} may serve it, but reserve() gave nothing`,
        null, { room: pair.s.room, agent: pair.a, loads: this.describe() });
    }
    this.count('liveness:checked');
  }

  /** The database agrees with the model, and the service's invariants hold. */
  async compare(): Promise<void> {
    const m = this.model;
    const results = (await this.db.query(`
      select id, room_id, state::text, agent_id, attempt_id, attempts, excluded_agents, holds_slot, last_agent_id,
             prior_service_id, service_id, late_service_id, next_attempt_at <= now() as due, last_error,
             source, channel_id, division_ids, extract(epoch from overflow_at - queued_at) / 3600 as overflow_hours,
             overflow_at <= now() as overflowed,
             (state = 'reserved' or (state = 'resolved' and attempt_id is not null)) = (lease_expires_at is not null)
               as lease_ok
        from allocator.sessions order by id;
      select room_id, retry_agent_id, session_id, division_ids from allocator.queue order by position;
      select a.id, a.type, a.is_available, a.force_offline, a.present, a.paused, a.max_load, a.our_load as load, a.external_load,
             a.qiscus_load, a.division_ids, l.available, l.load as total_load, l.capacity
        from allocator.agents a join allocator.agent_load l using (id) order by a.id;
      select id from allocator.agent_preference();
      select id, session_id, agent_id, number, outcome, unanswered from allocator.attempts order by id;
      select problem, detail from allocator.check_invariants();
    `)) as unknown as pg.QueryResult[];
    const [sessions, queue, agents, preference, attempts, problems] = results.map((r) => r.rows) as [
      Json[], Json[], Json[], Json[], Json[], Json[],
    ];

    this.same('check_invariants()', problems, []);
    for (const s of sessions) if (!s.lease_ok) this.fail('a reserved session (or one resolved while its call is in flight) has a lease, others none', s, null);

    this.same(
      'allocator.queue (room, retry agent, session, divisions) in order',
      queue.map((q) => [q.room_id, num(q.retry_agent_id), num(q.session_id), nums(q.division_ids)]),
      m.queue().map((s) => [s.room, s.holdsSlot ? s.agentId : null, s.id, m.overflowed(s) ? null : s.divisionIds]),
    );
    this.same(
      'sessions',
      sessions.map((s) => ({
        id: Number(s.id), room: s.room_id, state: s.state, agentId: num(s.agent_id), attemptId: num(s.attempt_id),
        attempts: s.attempts, excluded: (s.excluded_agents as string[]).map(Number), holdsSlot: s.holds_slot,
        lastAgentId: num(s.last_agent_id), prior: num(s.prior_service_id), serviceId: num(s.service_id),
        lateServiceId: num(s.late_service_id), due: s.state === 'waiting' ? s.due : null,
        source: s.source, channel: num(s.channel_id), divisionIds: nums(s.division_ids), overflowHours: num(s.overflow_hours),
        overflowed: s.overflowed ?? false,
        gaveUp: s.state !== 'failed' ? null
          : /^gave up after \d+ attempts/.test(s.last_error) ? 'attempts'
          : /^refused by every agent/.test(s.last_error) ? 'refused' : s.last_error,
      })),
      m.sessions.map((s) => ({
        id: s.id, room: s.room, state: s.state, agentId: s.agentId, attemptId: s.attemptId, attempts: s.attempts,
        excluded: s.excluded, holdsSlot: s.holdsSlot, lastAgentId: s.lastAgentId, prior: s.priorServiceId,
        serviceId: s.serviceId, lateServiceId: s.lateServiceId, due: s.state === 'waiting' ? m.due(s) : null,
        source: s.source, channel: s.channel, divisionIds: s.divisionIds,
        overflowHours: s.overflowAt === null ? null : s.overflowAt - s.queuedHour, overflowed: m.overflowed(s),
        gaveUp: s.state === 'failed' ? s.gaveUp : null,
      })),
    );
    this.same(
      'agents',
      agents.map((a) => ({
        id: Number(a.id), type: a.type, isAvailable: a.is_available, forceOffline: a.force_offline, present: a.present,
        paused: a.paused, maxLoad: a.max_load, load: a.load, externalLoad: a.external_load, qiscusLoad: a.qiscus_load,
        divisions: nums(a.division_ids), available: a.available, totalLoad: a.total_load, capacity: a.capacity,
      })),
      [...m.agents.values()]
        .sort((x, y) => x.id - y.id)
        .map((a) => ({
          id: a.id, type: a.type, isAvailable: a.isAvailable, forceOffline: a.forceOffline, present: a.present,
          paused: a.paused, maxLoad: a.maxLoad, load: a.load, externalLoad: a.externalLoad, qiscusLoad: a.qiscusLoad,
          divisions: a.divisions, available: a.type === 'agent' && a.present && a.isAvailable && !a.forceOffline && !a.paused,
          totalLoad: a.load + a.externalLoad, capacity: m.capacity(a),
        })),
    );
    this.same('agent_preference() order', preference.map((p) => Number(p.id)), m.preference().map((a) => a.id));
    this.same(
      'attempts',
      attempts.map((a) => ({ id: Number(a.id), sessionId: Number(a.session_id), agentId: Number(a.agent_id), number: a.number, outcome: a.outcome, unanswered: a.unanswered })),
      m.attempts.map((a) => ({ ...a, unanswered: a.unanswered ?? false })),
    );

    // Invariant 1: our load only ever grows into a free slot. (It may exceed capacity afterwards, when a DBA
    // lowers the capacity or a sync reports rooms assigned by hand: then it must not grow until it is below.)
    for (const a of agents) {
      const id = Number(a.id);
      const before = this.loads.get(id) ?? 0;
      if (a.load > before && a.total_load > a.capacity) this.fail(`agent ${id} was given a room beyond its capacity`, a, { before });
      this.loads.set(id, a.load);
    }
    // Every open room has at most one agent, and no agent serves a room it refused.
    for (const s of m.sessions) {
      if ((s.state === 'reserved' || s.state === 'assigned') && s.excluded.includes(s.agentId!)) {
        this.fail(`room ${s.room} is with agent ${s.agentId}, who refused it`, null, s);
      }
    }
  }
}
