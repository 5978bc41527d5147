/**
 * Routing by division in the chaos run (issue 13): the divisions and routes it plays with, a route matcher written
 * here from the README's rule (not the allocator's route_for), the audit the run installs in its own database, and
 * the checks that read it.
 *
 * The rule checked: a room is reserved (so called, so assigned) only for an agent of its route's divisions, unless
 * its overflow time has passed or no route matches it. "Its route" is the routes table as the driver wrote it,
 * version by version (each change logged with the database's clock just before its commit and just after), and the
 * room's source, channel.id and queued_at (sessions keeps them). "An agent of the divisions" is the membership the
 * allocator could know: the agent's division_ids as the reserving transaction read them (a roster pull brings
 * Qiscus's changes; that they do, and soon, is checked apart from the database's membership history). The audit is
 * taken inside the reserving transaction itself, by a trigger on allocator.attempts in a schema of the run's own
 * (`chaos`), so nothing is sampled: every reservation is judged. A retry that takes the slot the room already held
 * for the same agent (reserve_held: the earlier call may have landed) is judged by that earlier reservation. So is
 * a returning customer's session that took over the slot of a call made for the room's previous session, resolved
 * while that call was out and settled as "may have landed" (late_landing_at; follow_late_call,
 * settle_resolved_in_flight): that agent may be in the room, whatever the new session's route says.
 */
import type pg from 'pg';

export const SALES = 438;
export const SUPPORT = 439;
export const SECOND_LINE = 440;
export const DIVISIONS: Record<number, string> = { [SALES]: 'Sales', [SUPPORT]: 'Customer support', [SECOND_LINE]: 'Second line' };

/** Qiscus's divisions of agents 1-20 at the start: two in two divisions, five in none. */
export function initialDivisions(agent: number): number[] {
  if (agent <= 6) return [SUPPORT];
  if (agent <= 8) return [SALES, SUPPORT];
  if (agent <= 12) return [SALES];
  if (agent <= 14) return [SECOND_LINE];
  if (agent === 15) return [SUPPORT, SECOND_LINE];
  return [];
}

/** The rooms' channels: source, channel.id (null: no `channel` in the webhook), share of new rooms. */
export const CHANNELS: ReadonlyArray<{ source: string; channel: number | null; share: number }> = [
  { source: 'wa', channel: 5000, share: 0.35 }, // WhatsApp, the general number: to Customer support, overflow 5 s
  { source: 'wa', channel: 5001, share: 0.1 }, // WhatsApp, the VIP number: its channel route, before the source's
  { source: 'qiscus', channel: 4321, share: 0.25 }, // web widget: no route (anyone), until a catch-all comes
  { source: 'line', channel: null, share: 0.1 }, // LINE, no channel in the webhook: to Second line, overflow 8 s
  { source: 'telegram', channel: 6000, share: 0.2 }, // no route, until one to Sales and Second line comes
];

export interface RouteRow {
  id: number;
  source: string | null;
  channel_id: number | null;
  division_ids: number[];
  overflow_seconds: number | null;
  position: number;
}

/** The first route (lowest position, then id) matching a room; undefined: none (any agent). */
export function routeFor(routes: readonly RouteRow[], source: string | null, channel: number | null): RouteRow | undefined {
  let best: RouteRow | undefined;
  for (const r of routes) {
    if (r.source !== null && r.source !== source) continue;
    if (r.channel_id !== null && r.channel_id !== channel) continue;
    if (!best || r.position < best.position || (r.position === best.position && r.id < best.id)) best = r;
  }
  return best;
}

export const intersects = (a: readonly number[], b: readonly number[]) => a.some((x) => b.includes(x));

/** The routes at the start, before any process runs. */
export const INITIAL_ROUTES_SQL = `
  insert into allocator.routes (source, channel_id, division_ids, overflow_seconds, position) values
    ('wa', null, '{${SUPPORT}}', 5, 0),
    (null, 5001, '{${SALES}}', null, -1),
    ('line', null, '{${SECOND_LINE}}', 8, 0)`;

/**
 * What the run does to the routes while rooms wait, one step every 8-14 s, in a cycle that ends where it began
 * (five steps: a one-minute run makes them all). Every state it leaves can be drained: each route to Second line
 * (which is empty for a while) overflows, and Sales, whose channel route never overflows, never empties.
 */
export const ROUTE_STEPS: ReadonlyArray<{ what: string; sql: string }> = [
  {
    what: 'route telegram to Sales and Second line, overflow 6 s',
    sql: `insert into allocator.routes (source, division_ids, overflow_seconds) values ('telegram', '{${SALES},${SECOND_LINE}}', 6)`,
  },
  {
    what: 'WhatsApp overflows after 2 s; the VIP channel to Sales and Customer support',
    sql: `update allocator.routes set overflow_seconds = 2 where source = 'wa';
          update allocator.routes set division_ids = '{${SALES},${SUPPORT}}' where channel_id = 5001`,
  },
  { what: 'every route deleted', sql: `delete from allocator.routes` },
  {
    what: 'the routes of the start again, and a catch-all to Customer support and Sales (overflow 3 s) after them',
    sql: `${INITIAL_ROUTES_SQL};
          insert into allocator.routes (division_ids, overflow_seconds, position) values ('{${SUPPORT},${SALES}}', 3, 10)`,
  },
  { what: 'no catch-all: the routes of the start', sql: `delete from allocator.routes where source is null and channel_id is null` },
];

/**
 * What the run does to division membership in Qiscus, one step every 10-16 s, in a cycle of three that ends where
 * it began (the listeners' roster pulls bring it to the database). Second line is empty for a while (its LINE rooms
 * then wait for their overflow); Sales keeps four agents or more.
 */
export const MEMBERSHIP_STEPS: ReadonlyArray<{ what: string; set: Record<number, number[]> }> = [
  { what: 'agent 16 (in none) joins Customer support; agent 13 leaves Second line', set: { 16: [SUPPORT], 13: [] } },
  {
    what: 'agents 14 and 15 leave Second line (now empty); agents 8 and 9 leave Sales for Customer support',
    set: { 14: [], 15: [SUPPORT], 8: [SUPPORT], 9: [SUPPORT] },
  },
  {
    what: 'everyone back as at the start',
    set: Object.fromEntries([8, 9, 13, 14, 15, 16].map((a) => [a, initialDivisions(a)])),
  },
];

// ------------------------------------------------------------------------------------------------------------------
// The audit, in the run's own database
// ------------------------------------------------------------------------------------------------------------------

/**
 * Installs the audit: every reservation (a row of allocator.attempts) with what the reserving transaction saw of
 * the room and the agent, and every change of an agent's divisions. The trigger on attempts runs inside reserve():
 * in reserve_for its insert comes before the session's update, so the room is still as it waited (holds_slot,
 * division_ids, overflow_at); reserve_batch (only when no route exists) never takes a held room. Not allocator
 * functions: migrations would drop those, and these are the run's.
 */
export async function installAudit(pool: pg.Pool): Promise<void> {
  await pool.query(`
    create schema chaos;
    create table chaos.reservations (
      attempt_id bigint primary key, session_id bigint not null, agent_id bigint not null,
      at timestamptz not null, decided timestamptz not null, held boolean not null,
      division_ids bigint[], overflow_at timestamptz, agent_divisions bigint[]
    );
    create function chaos.log_reservation() returns trigger language plpgsql as $$
    begin
      insert into chaos.reservations
      select new.id, new.session_id, new.agent_id, now(), clock_timestamp(),
             s.state = 'waiting' and s.holds_slot and s.agent_id = new.agent_id, s.division_ids, s.overflow_at,
             a.division_ids
      from allocator.sessions s, allocator.agents a where s.id = new.session_id and a.id = new.agent_id;
      return null;
    end $$;
    create trigger chaos_log_reservation after insert on allocator.attempts
      for each row execute function chaos.log_reservation();
    create table chaos.membership (at timestamptz not null, agent_id bigint not null, division_ids bigint[] not null);
    create function chaos.log_membership() returns trigger language plpgsql as $$
    begin
      insert into chaos.membership values (clock_timestamp(), new.id, new.division_ids);
      return null;
    end $$;
    create trigger chaos_log_membership after update of division_ids on allocator.agents
      for each row when (old.division_ids is distinct from new.division_ids) execute function chaos.log_membership();
  `);
}

/** One version of the routes table: committed between `pre` and `post` (ms, the database's clock). */
export interface RouteVersion {
  pre: number;
  post: number;
  routes: RouteRow[];
  what: string;
}

const ROUTES_SELECT = `select id::int, source, channel_id::int, division_ids::int[], overflow_seconds, position
                       from allocator.routes order by position, id`;
const NOW_MS = `select (extract(epoch from clock_timestamp()) * 1000)::float8 as t`;

/** Applies one change of the routes and returns the version it made, or throws (see readRoutes). */
export async function changeRoutes(pool: pg.Pool, sql: string, what: string): Promise<RouteVersion> {
  const c = await pool.connect();
  let broken = false;
  // PostgreSQL stopped between two statements: the client emits 'error', which the pool only handles for idle
  // clients; unhandled, it was an uncaught exception in the test process (CI, seed 858551188).
  const onError = () => (broken = true);
  c.on('error', onError);
  try {
    await c.query('begin');
    await c.query(sql);
    const routes = (await c.query<RouteRow>(ROUTES_SELECT)).rows;
    const pre = (await c.query<{ t: number }>(NOW_MS)).rows[0]!.t;
    await c.query('commit');
    const post = (await c.query<{ t: number }>(NOW_MS)).rows[0]!.t;
    return { pre, post, routes, what };
  } catch (e) {
    broken = true;
    throw e;
  } finally {
    c.off('error', onError);
    c.release(broken);
  }
}

/**
 * The routes as they are now: after a change whose commit got no answer (PostgreSQL stopped under it), it may or
 * may not have been applied, at any moment since `since`.
 */
export async function readRoutes(pool: pg.Pool, since: number, what: string): Promise<RouteVersion> {
  const routes = (await pool.query<RouteRow>(ROUTES_SELECT)).rows;
  const post = (await pool.query<{ t: number }>(NOW_MS)).rows[0]!.t;
  return { pre: since, post, routes, what };
}

// ------------------------------------------------------------------------------------------------------------------
// The checks
// ------------------------------------------------------------------------------------------------------------------

export interface RoutingFigures {
  /** Reservations judged, by what allowed them. */
  reservations: Record<string, number>;
  /** Reservations for an agent its room's route did not allow (see the header). */
  violations: string[];
  /** Rooms of those reservations. */
  violationRooms: string[];
  /** Sessions assigned, by what their route said at the assignment's reservation. */
  assigned: Record<string, number>;
  routeChanges: number;
  membershipChanges: number;
  /** Qiscus's membership changes, each: how long until the database had it (ms); null: never. */
  membershipLagMs: Array<number | null>;
  /** The database's membership went back to one Qiscus had left before (an older pull applied after a newer). */
  membershipReverted: string[];
}

interface ReservationRow {
  attempt_id: string;
  session_id: string;
  room_id: string;
  agent_id: string;
  at: number;
  decided: number;
  held: boolean;
  division_ids: number[] | null;
  overflow_at: number | null;
  agent_divisions: number[] | null;
  source: string | null;
  channel_id: number | null;
  queued_at: number;
  assigned: boolean;
  /** The room's previous session was resolved while a call to this agent was out, and that call may have landed
   * (sessions.late_landing_at). */
  inherited: boolean;
}

/** Judges every reservation of the run against the route versions (see the header). */
export async function judgeReservations(pool: pg.Pool, versions: readonly RouteVersion[]): Promise<Pick<RoutingFigures, 'reservations' | 'violations' | 'violationRooms' | 'assigned'>> {
  const ms = (col: string) => `(extract(epoch from ${col}) * 1000)::float8`;
  const rows = (
    await pool.query<ReservationRow>(
      `select r.attempt_id::text, r.session_id::text, s.room_id, r.agent_id::text, ${ms('r.at')} as at,
              ${ms('r.decided')} as decided, r.held, r.division_ids::int[], ${ms('r.overflow_at')} as overflow_at,
              r.agent_divisions::int[], s.source, s.channel_id::int, ${ms('s.queued_at')} as queued_at,
              a.outcome is not distinct from 'assigned' as assigned,
              coalesce((select ps.late_landing_at is not null and ps.agent_id = r.agent_id
                        from allocator.sessions ps where ps.room_id = s.room_id and ps.id < s.id
                        order by ps.id desc limit 1), false) as inherited
       from chaos.reservations r join allocator.sessions s on s.id = r.session_id
       left join allocator.attempts a on a.id = r.attempt_id
       order by r.attempt_id`,
    )
  ).rows;
  const reservations: Record<string, number> = {};
  const assigned: Record<string, number> = {};
  const violations: string[] = [];
  const violationRooms: string[] = [];
  const judged = new Map<string, Set<string>>(); // session → agents of its judged reservations
  const count = (o: Record<string, number>, k: string) => (o[k] = (o[k] ?? 0) + 1);
  const fmt = (t: number) => new Date(t).toISOString().slice(11, 23);
  for (const r of rows) {
    const agents = judged.get(r.session_id) ?? new Set<string>();
    judged.set(r.session_id, agents);
    if (r.held) {
      // the room's slot on this agent, held after an ambiguous call: that call's reservation was judged
      const why = agents.has(r.agent_id)
        ? 'retry of a held slot'
        : r.inherited
          ? "held slot of the previous session's call"
          : 'held slot without an earlier reservation';
      count(reservations, why);
      if (r.assigned) count(assigned, why);
      if (!agents.has(r.agent_id) && !r.inherited) {
        violations.push(`room ${r.room_id} attempt ${r.attempt_id}: retry for agent ${r.agent_id} holding a slot it was never reserved`);
        violationRooms.push(r.room_id);
      }
      continue;
    }
    agents.add(r.agent_id);
    // The versions some snapshot of the reservation may have read: committed before it decided, not yet replaced
    // when it started.
    const seen = versions.filter((v, i) => v.pre <= r.decided && (versions[i + 1]?.post ?? Infinity) >= r.at);
    const member = r.agent_divisions ?? [];
    let why: string | undefined;
    for (const v of seen) {
      const route = routeFor(v.routes, r.source, r.channel_id);
      // Overflowed by the moment the reservation was decided: reserve() runs overflow_due(), and another caller's
      // may have moved the room to anyone after this transaction began (r.at is its now(), its start).
      const w = !route
        ? 'no route matched'
        : route.overflow_seconds !== null && r.queued_at + route.overflow_seconds * 1000 <= r.decided
          ? 'overflowed'
          : intersects(route.division_ids, member)
            ? 'agent in a division of the route'
            : undefined;
      if (w && (why === undefined || w === 'agent in a division of the route')) why = w;
    }
    if (why) {
      count(reservations, why);
      if (r.assigned) count(assigned, why);
      continue;
    }
    const own = r.division_ids === null || (r.overflow_at !== null && r.overflow_at <= r.decided) || intersects(r.division_ids, member);
    violations.push(
      `room ${r.room_id} (source ${r.source}, channel ${String(r.channel_id)}, queued ${fmt(r.queued_at)}) reserved ${fmt(r.at)} ` +
        `for agent ${r.agent_id} in divisions {${member.join(',')}}; routes then: ` +
        seen.map((v) => `[${v.what}] ${JSON.stringify(routeFor(v.routes, r.source, r.channel_id) ?? null)}`).join(' or ') +
        `; the session said divisions ${JSON.stringify(r.division_ids)} overflow ${r.overflow_at === null ? 'never' : fmt(r.overflow_at)}` +
        ` (${own ? 'which allowed it: the session was not rerouted' : 'which did not allow it either: reserve() broke it'})`,
    );
    violationRooms.push(r.room_id);
  }
  return { reservations, violations, violationRooms, assigned };
}

/**
 * Qiscus's membership changes against the database's history: each reached the database (how long it took), and
 * the database never went back to a membership Qiscus had left before one the database had already shown (an
 * older pull applied after a newer one). `changes` are in order of time; before the first of an agent, Qiscus had
 * `initial(agent)`.
 */
export async function judgeMembership(
  pool: pg.Pool,
  initial: (agent: number) => number[],
  changes: ReadonlyArray<{ at: number; agent: number; divisions: number[] }>,
): Promise<Pick<RoutingFigures, 'membershipLagMs' | 'membershipReverted'>> {
  const ms = (col: string) => `(extract(epoch from ${col}) * 1000)::float8`;
  const log = (
    await pool.query<{ at: number; agent_id: number; division_ids: number[] }>(
      `select ${ms('at')} as at, agent_id::int, division_ids::int[] from chaos.membership order by at`,
    )
  ).rows;
  const key = (xs: readonly number[]) => [...xs].sort((a, b) => a - b).join(',');
  const membershipLagMs = changes.map((c) => {
    const hit = log.find((l) => l.agent_id === c.agent && l.at >= c.at && key(l.division_ids) === key(c.divisions));
    return hit ? hit.at - c.at : null;
  });
  // Per agent, Qiscus's versions (index 0: the start); each database change shows the newest version with its
  // value that Qiscus had made by then, and that index must never fall.
  const membershipReverted: string[] = [];
  const shown = new Map<number, number>();
  const fmt = (t: number) => new Date(t).toISOString().slice(11, 23);
  for (const l of log) {
    const versions = [{ at: -Infinity, divisions: initial(l.agent_id) }, ...changes.filter((c) => c.agent === l.agent_id)];
    let k = -1;
    versions.forEach((v, i) => {
      if (v.at <= l.at && key(v.divisions) === key(l.division_ids)) k = i;
    });
    const before = shown.get(l.agent_id) ?? 0;
    if (k < before) {
      membershipReverted.push(
        `agent ${l.agent_id} at ${fmt(l.at)}: database {${l.division_ids.join(',')}}, ` +
          (k < 0 ? 'which Qiscus never had' : `Qiscus's version ${k} of ${versions.length - 1}, after the database had shown version ${before}`),
      );
    }
    shown.set(l.agent_id, Math.max(before, k));
  }
  return { membershipLagMs, membershipReverted };
}
