/**
 * Retention (issue 14): while history older than `retention_days` is being deleted (BENCH_PRUNE_WEBHOOKS old webhook
 * rows, 10,000,000 by default, and BENCH_PRUNE_SESSIONS old resolved sessions with an attempt each), the latency of
 * what the queue does, against the same database with nothing being deleted, in the same run.
 *
 * The queue's work, one room at a time with free agents, each statement timed on its own connection as the web
 * and the listener send them: the allocation webhook (accept_new_request), the reservation (reserve), its confirm,
 * and the resolution (accept_close_request). Meanwhile another connection runs prune_history() with the sweep's
 * batch (1,000): "sweep", one batch every 2.5 s, as the sweeps of two listeners do at the shipped SWEEP_SECONDS;
 * "flat", batches back to back, a stress far beyond what the service does; "idle", no pruning. Autovacuum runs as
 * it will. Phases alternate (idle, sweep, flat, idle, ...), BENCH_PRUNE_SECONDS each, BENCH_PRUNE_ROUNDS rounds;
 * ratios are to idle, of the pooled samples.
 *
 * Knobs: BENCH_PRUNE_WEBHOOKS (10000000), BENCH_PRUNE_SESSIONS (1000000), BENCH_PRUNE_SECONDS (15),
 * BENCH_PRUNE_ROUNDS (2), BENCH_PRUNE_BATCH (1000).
 */
import pg from 'pg';
import { isMain, partTimer, standalone, type BenchContext, type PartResult, type Row } from './lib/results.ts';
import { INSERT_AGENTS_SQL, newRequestBody } from './lib/stack.ts';
import { envInt, ratio, roundSummary, Samples, sleep, summarize, type Summary } from './lib/stats.ts';

const AGENTS = 20;

/** idle: nothing deleted; sweep: a batch every 2.5 s, as the sweeps of two listeners at the shipped SWEEP_SECONDS
 * (5) do; flat: batches back to back (a stress far beyond what the service does). */
type Kind = 'idle' | 'sweep' | 'flat';
const KINDS: Kind[] = ['idle', 'sweep', 'flat'];
const SWEEP_EVERY_MS = 2500;

interface Phase {
  kind: Kind;
  webhook: Samples;
  reserve: Samples;
  confirm: Samples;
  resolve: Samples;
  rooms: number;
  pruned: number;
}

function closeBody(room: string, serviceId: number): string {
  return JSON.stringify({
    customer: { additional_info: [], avatar: null, name: `cust${room}`, user_id: `cust${room}@example.com` },
    resolved_by: { email: 'agent1@example.com', id: 1, is_available: true, name: 'Agent 1', type: 'agent' },
    service: { first_comment_id: '1', id: serviceId, is_resolved: true, last_comment_id: '2', notes: null, room_id: room, source: 'qiscus' },
  });
}

/** Old history: resolved sessions (with one attempt each) and webhooks, all 60 days old, in batches of 500,000. */
async function fillHistory(c: pg.Client, webhooks: number, sessions: number, log: (m: string) => void): Promise<void> {
  const step = 500_000;
  for (let from = 1; from <= sessions; from += step) {
    const to = Math.min(sessions, from + step - 1);
    await c.query(
      `with s as (
         insert into allocator.sessions (room_id, source, state, agent_id, queued_at, assigned_at, resolved_at, attempts)
         select 'old-' || g, 'qiscus', 'resolved', 1 + g % $3, now() - interval '60 days', now() - interval '60 days',
                now() - interval '60 days' + make_interval(secs => g % 86400), 1
         from generate_series($1::int, $2::int) g
         returning id, agent_id)
       insert into allocator.attempts (session_id, agent_id, number, finished_at, outcome)
       select id, agent_id, 1, now() - interval '60 days', 'assigned' from s`,
      [from, to, AGENTS],
    );
  }
  log(`prune: ${sessions} old sessions with their attempts`);
  for (let from = 1; from <= webhooks; from += step) {
    const to = Math.min(webhooks, from + step - 1);
    await c.query(
      `insert into allocator.webhooks (kind, room_id, received_at, outcome, payload)
       select case when g % 2 = 0 then 'new_request' else 'close_request' end, 'old-' || (g / 2),
              now() - interval '60 days' + make_interval(secs => g % 86400), 'queued',
              jsonb_build_object('room_id', 'old-' || (g / 2), 'source', 'qiscus', 'name', 'customer ' || g)
       from generate_series($1::int, $2::int) g`,
      [from, to],
    );
    if (to % 2_000_000 === 0 || to === webhooks) log(`prune: ${to} old webhooks`);
  }
  await c.query('vacuum analyze allocator.sessions, allocator.attempts, allocator.webhooks');
}

/** One room through the queue, each statement timed. */
async function oneRoom(hook: pg.Client, listener: pg.Client, room: string, serviceId: number, p: Phase): Promise<void> {
  let t = performance.now();
  await hook.query(`select * from allocator.accept_new_request($1::jsonb)`, [newRequestBody(room)]);
  p.webhook.push(performance.now() - t);
  t = performance.now();
  const r = await listener.query<{ attempt_id: string }>(`select attempt_id from allocator.reserve(null, 1)`);
  p.reserve.push(performance.now() - t);
  const attempt = r.rows[0]?.attempt_id;
  if (!attempt) throw new Error(`room ${room}: nothing reserved`);
  t = performance.now();
  await listener.query(`select allocator.confirm($1, $2)`, [attempt, serviceId]);
  p.confirm.push(performance.now() - t);
  t = performance.now();
  await hook.query(`select * from allocator.accept_close_request($1::jsonb)`, [closeBody(room, serviceId)]);
  p.resolve.push(performance.now() - t);
  p.rooms++;
}

export async function runPrune(ctx: BenchContext): Promise<PartResult> {
  const timer = partTimer();
  const webhooks = envInt('BENCH_PRUNE_WEBHOOKS', 10_000_000);
  const sessions = envInt('BENCH_PRUNE_SESSIONS', 1_000_000);
  const seconds = envInt('BENCH_PRUNE_SECONDS', 15);
  const rounds = Math.max(1, envInt('BENCH_PRUNE_ROUNDS', 2));
  const batch = envInt('BENCH_PRUNE_BATCH', 1000);
  const db = await ctx.server.createDatabase('prune');
  const clients = await Promise.all([0, 1, 2].map(async () => {
    const c = new pg.Client({ connectionString: db.url });
    await c.connect();
    return c;
  }));
  const [hook, listener, pruner] = clients as [pg.Client, pg.Client, pg.Client];
  const phases: Phase[] = [];
  const history = { webhooksBefore: 0, webhooksAfter: 0, sessionsBefore: 0, sessionsAfter: 0 };
  try {
    await hook.query(INSERT_AGENTS_SQL, [1, AGENTS]);
    const t0 = performance.now();
    await fillHistory(hook, webhooks, sessions, ctx.log);
    ctx.log(`prune: history written in ${Math.round((performance.now() - t0) / 1000)} s`);
    const count = async () => {
      const r = await hook.query<{ w: string; s: string }>(
        `select (select count(*) from allocator.webhooks) as w, (select count(*) from allocator.sessions) as s`,
      );
      return { w: Number(r.rows[0]!.w), s: Number(r.rows[0]!.s) };
    };
    const before = await count();
    history.webhooksBefore = before.w;
    history.sessionsBefore = before.s;

    let room = 0;
    for (let i = 0; i < rounds * KINDS.length; i++) {
      const p: Phase = {
        kind: KINDS[i % KINDS.length]!,
        webhook: new Samples(),
        reserve: new Samples(),
        confirm: new Samples(),
        resolve: new Samples(),
        rooms: 0,
        pruned: 0,
      };
      let running = true;
      const prune =
        p.kind === 'idle'
          ? Promise.resolve()
          : (async () => {
              while (running) {
                const t = performance.now();
                const r = await pruner.query<{ n: number }>(`select allocator.prune_history($1) as n`, [batch]);
                p.pruned += r.rows[0]!.n;
                if (p.kind === 'sweep') {
                  while (running && performance.now() - t < SWEEP_EVERY_MS) await sleep(20);
                }
              }
            })();
      const end = performance.now() + seconds * 1000;
      while (performance.now() < end) {
        room++;
        await oneRoom(hook, listener, `prune-${room}`, 900_000_000 + room, p);
      }
      running = false;
      await prune;
      phases.push(p);
      ctx.log(`prune: phase ${i + 1}/${rounds * KINDS.length} ${p.kind}: ${p.rooms} rooms, ${p.pruned} rows pruned`);
    }
    const after = await count();
    history.webhooksAfter = after.w;
    history.sessionsAfter = after.s;
  } finally {
    await Promise.all(clients.map((c) => c.end().catch(() => {})));
    await db.drop();
  }

  const pool = (kind: Phase['kind'], k: 'webhook' | 'reserve' | 'confirm' | 'resolve'): Summary => {
    const all: number[] = [];
    for (const p of phases.filter((x) => x.kind === kind)) all.push(...p[k].values());
    return roundSummary(summarize(all));
  };
  const stats = Object.fromEntries(
    KINDS.map((kind) => [
      kind,
      Object.fromEntries((['webhook', 'reserve', 'confirm', 'resolve'] as const).map((k) => [k, pool(kind, k)])),
    ]),
  ) as Record<Kind, Record<'webhook' | 'reserve' | 'confirm' | 'resolve', Summary>>;
  const prunedBy = (kind: Kind) => phases.filter((p) => p.kind === kind).reduce((n, p) => n + p.pruned, 0);
  const pruned = prunedBy('sweep') + prunedBy('flat');
  const labels = { webhook: 'allocation webhook (accept_new_request)', reserve: 'reservation (reserve)', confirm: 'confirm', resolve: 'resolution webhook (accept_close_request)' };
  const rows: Row[] = [];
  const how = { sweep: 'pruning at the sweep\'s pace', flat: 'pruning flat out' };
  for (const kind of ['sweep', 'flat'] as const) {
    for (const k of ['webhook', 'reserve', 'confirm', 'resolve'] as const) {
      for (const q of ['p50', 'p99'] as const) {
        const v = stats[kind][k][q];
        const b = stats.idle[k][q];
        rows.push({ part: 'prune', what: `${labels[k]} ${q}, ${how[kind]}`, value: v, unit: 'ms', baseline: 'same, idle', baselineValue: b, ratio: ratio(v, b) });
      }
    }
    rows.push({ part: 'prune', what: `history rows deleted per second, ${how[kind]}`, value: Math.round(prunedBy(kind) / (rounds * seconds)), unit: 'rows/s', baseline: '—', baselineValue: null, ratio: null });
  }
  const worst = (kind: 'sweep' | 'flat', k: 'webhook' | 'reserve') =>
    Math.max(ratio(stats[kind][k].p50, stats.idle[k].p50) ?? Infinity, ratio(stats[kind][k].p99, stats.idle[k].p99) ?? Infinity);
  return {
    name: 'prune',
    machine: ctx.machine,
    startedAt: timer.startedAt,
    seconds: timer.seconds(),
    params: { webhooks, sessions, seconds, rounds, batch, agents: AGENTS },
    rows,
    goals: [
      { part: 'prune', goal: 'webhook latency, pruning at the sweep\'s pace, ≤ 1.2 × idle (p50 and p99)', measured: worst('sweep', 'webhook'), bound: '≤ 1.2', met: worst('sweep', 'webhook') <= 1.2 },
      { part: 'prune', goal: 'reservation latency, pruning at the sweep\'s pace, ≤ 1.2 × idle (p50 and p99)', measured: worst('sweep', 'reserve'), bound: '≤ 1.2', met: worst('sweep', 'reserve') <= 1.2 },
      { part: 'prune', goal: 'webhook latency, pruning flat out, ≤ 1.2 × idle (p50 and p99)', measured: worst('flat', 'webhook'), bound: '≤ 1.2', met: worst('flat', 'webhook') <= 1.2 },
      { part: 'prune', goal: 'reservation latency, pruning flat out, ≤ 1.2 × idle (p50 and p99)', measured: worst('flat', 'reserve'), bound: '≤ 1.2', met: worst('flat', 'reserve') <= 1.2 },
      { part: 'prune', goal: 'the pruner deleted history while the queue ran', measured: pruned, bound: '> 0', met: pruned > 0 },
    ],
    details: { stats, phases: phases.map((p) => ({ kind: p.kind, rooms: p.rooms, pruned: p.pruned })), history },
  };
}

if (isMain(import.meta.url)) await standalone(runPrune, 'prune');
