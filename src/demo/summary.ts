/**
 * The end of a demo run: what happened (from allocator.sessions/queue/agent_load/attempts and from what the fake
 * Qiscus saw), and the checks that must hold: no agent above its capacity in Qiscus, no room assigned twice, no
 * row from allocator.check_invariants(), every webhook accepted.
 */
import type pg from 'pg';
import type { Simulator } from '../simulator/qiscus-simulator.ts';
import type { TrafficCounts } from './traffic.ts';
import { duration } from './view.ts';

export interface DemoSummary
  extends Pick<TrafficCounts, 'arrived' | 'returning' | 'repeats' | 'webhooksSent' | 'webhooksAccepted' | 'webhooksRejected'> {
  seconds: number;
  seed: number;
  agents: number;
  assigned: number;
  resolved: number;
  stillWaiting: number;
  /** Longest any room waited for an agent (assigned ones, and those still waiting at the end). */
  maxWaitSeconds: number;
  p50AssignSeconds: number | null;
  p90AssignSeconds: number | null;
  /** Highest number of rooms any agent held at once in Qiscus (the simulator), rooms assigned by hand included. */
  maxLoadSeen: number;
  capacity: number;
  overCapacity: Array<{ agent: string; maxLoad: number; capacity: number }>;
  /** Rooms the simulator saw assigned more than once in the same session. */
  doubleAssignments: number;
  invariantProblems: number;
  invariantDetails: string[];
  /** allocator.attempts by outcome. */
  qiscusCalls: Record<string, number>;
  /** Routed rooms (a route named divisions for them) and how many of those went to an agent of none of them. */
  routed: number;
  routedOutside: number;
  /** Assignments Qiscus accepted for an agent who had gone offline there (before the next roster sync noticed). */
  assignedWhileOffline: number;
  ok: boolean;
  failures: string[];
}

export interface SummaryInput {
  pool: pg.Pool;
  sim: Simulator;
  counts: TrafficCounts;
  seconds: number;
  seed: number;
}

const num = (v: unknown): number | null => (v === null || v === undefined ? null : Number(v));

export async function summarize({ pool, sim, counts, seconds, seed }: SummaryInput): Promise<DemoSummary> {
  const s = (
    await pool.query(`
      select count(*) filter (where assigned_at is not null)::int as assigned,
             count(*) filter (where state = 'resolved')::int as resolved,
             percentile_cont(0.5) within group (order by extract(epoch from assigned_at - queued_at))::float8 as p50,
             percentile_cont(0.9) within group (order by extract(epoch from assigned_at - queued_at))::float8 as p90,
             coalesce(max(extract(epoch from assigned_at - queued_at)), 0)::float8 as max_assign_wait
      from allocator.sessions`)
  ).rows[0];
  const q = (
    await pool.query(
      `select count(*)::int as waiting, coalesce(extract(epoch from max(waited)), 0)::float8 as longest from allocator.queue`,
    )
  ).rows[0];
  const agents = (
    await pool.query<{ id: string; name: string; capacity: number }>(
      `select id, name, capacity from allocator.agent_load order by id`,
    )
  ).rows;
  const invariants = (await pool.query<{ problem: string; detail: string }>(`select * from allocator.check_invariants()`))
    .rows;
  // Routed rooms assigned, and those whose agent is in none of the route's divisions (no overflow is set here).
  const routing = (
    await pool.query<{ routed: number; outside: number }>(`
      select count(*)::int as routed,
             count(*) filter (where not (s.division_ids && coalesce(a.division_ids, '{}')))::int as outside
      from allocator.sessions s join allocator.agents a on a.id = s.agent_id
      where s.assigned_at is not null and s.division_ids is not null`)
  ).rows[0]!;
  const calls = (
    await pool.query<{ outcome: string | null; n: number }>(
      `select outcome, count(*)::int as n from allocator.attempts group by outcome order by outcome`,
    )
  ).rows;

  // Each successful, first-time assignment of a room's session in the fake Qiscus; a second one would be a double.
  const perSession = new Map<string, number>();
  for (const a of sim.assignments) {
    if (a.status !== 200 || a.repeat) continue;
    const key = `${a.room_id}#${a.session}`;
    perSession.set(key, (perSession.get(key) ?? 0) + 1);
  }
  const doubleAssignments = [...perSession.values()].filter((n) => n > 1).length;

  const overCapacity = agents
    .map((a) => ({ agent: a.name, maxLoad: sim.maxLoadSeen(Number(a.id)), capacity: a.capacity }))
    .filter((a) => a.maxLoad > a.capacity);
  const capacity = Math.max(0, ...agents.map((a) => a.capacity));
  const rejected = Object.values(counts.webhooksRejected).reduce((n, x) => n + x, 0);

  const failures: string[] = [];
  if (s.assigned === 0) failures.push('no room was assigned');
  for (const o of overCapacity) failures.push(`${o.agent} held ${o.maxLoad} rooms, capacity ${o.capacity}`);
  if (doubleAssignments > 0) failures.push(`${doubleAssignments} rooms assigned twice`);
  if (invariants.length > 0) failures.push(`${invariants.length} rows from allocator.check_invariants()`);
  if (rejected > 0) failures.push(`${rejected} webhooks not accepted`);
  if (routing.outside > 0) failures.push(`${routing.outside} routed rooms went to an agent outside their divisions`);

  return {
    seconds,
    seed,
    agents: agents.length,
    arrived: counts.arrived,
    returning: counts.returning,
    repeats: counts.repeats,
    webhooksSent: counts.webhooksSent,
    webhooksAccepted: counts.webhooksAccepted,
    webhooksRejected: counts.webhooksRejected,
    assigned: s.assigned,
    resolved: s.resolved,
    stillWaiting: q.waiting,
    maxWaitSeconds: Math.max(Number(s.max_assign_wait), Number(q.longest)),
    p50AssignSeconds: num(s.p50),
    p90AssignSeconds: num(s.p90),
    maxLoadSeen: sim.maxLoadSeenAll(),
    capacity,
    overCapacity,
    doubleAssignments,
    invariantProblems: invariants.length,
    invariantDetails: invariants.map((r) => `${r.problem}: ${r.detail}`),
    qiscusCalls: Object.fromEntries(calls.map((c) => [c.outcome ?? 'open', c.n])),
    routed: routing.routed,
    routedOutside: routing.outside,
    assignedWhileOffline: sim.stats.assignedWhileOffline,
    ok: failures.length === 0,
    failures,
  };
}

/** The summary for people; the caller prints the `DEMO SUMMARY {json}` line after it. */
export function renderSummary(r: DemoSummary, useColor: boolean): string {
  const green = (t: string) => (useColor ? `\x1b[32m${t}\x1b[0m` : t);
  const red = (t: string) => (useColor ? `\x1b[31m${t}\x1b[0m` : t);
  const bold = (t: string) => (useColor ? `\x1b[1m${t}\x1b[0m` : t);
  const check = (good: boolean) => (good ? green('✓') : red('✗'));
  const row = (label: string, value: string | number, mark = ' ') => `  ${mark} ${label.padEnd(26)} ${value}`;
  const calls = Object.entries(r.qiscusCalls)
    .map(([k, n]) => `${n} ${k}`)
    .join(', ');
  const rejected = Object.values(r.webhooksRejected).reduce((n, x) => n + x, 0);
  const lines = [
    '',
    bold(` Summary · ${Math.round(r.seconds)} s · ${r.agents} agents · seed ${r.seed}`),
    row('customers arrived', `${r.arrived}  (${r.returning} returning, ${r.repeats} wrote again while waiting)`),
    row('webhooks accepted', `${r.webhooksAccepted} of ${r.webhooksSent}`),
    row('assigned', `${r.assigned}  (Qiscus calls: ${calls || 'none'})`),
    row('resolved', r.resolved),
    row('still waiting', r.stillWaiting),
    row(
      'time to assign',
      `p50 ${duration(r.p50AssignSeconds)} · p90 ${duration(r.p90AssignSeconds)} · longest wait ${duration(r.maxWaitSeconds)}`,
    ),
    row('highest load on an agent', `${r.maxLoadSeen} (capacity ${r.capacity})`, check(r.overCapacity.length === 0)),
    row('rooms assigned twice', r.doubleAssignments, check(r.doubleAssignments === 0)),
    row('check_invariants()', `${r.invariantProblems} problems`, check(r.invariantProblems === 0)),
    row('webhooks rejected', rejected, check(rejected === 0)),
    row('routed rooms to their team', `${r.routed - r.routedOutside} of ${r.routed}`, check(r.routedOutside === 0)),
  ];
  if (r.assignedWhileOffline > 0) {
    lines.push(
      `    (${r.assignedWhileOffline} assigned to an agent in the seconds between going offline in Qiscus and the next roster sync)`,
    );
  }
  for (const d of r.invariantDetails) lines.push(red(`    ${d}`));
  lines.push(r.ok ? green(' All checks hold.') : red(` Failed: ${r.failures.join('; ')}`));
  return lines.join('\n') + '\n';
}
