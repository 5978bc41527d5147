/**
 * Cold drain (issue 12, "beat graphile-worker at its own game"): 20,000 rooms queued, 10,000 free agents, then one
 * listener starts; rooms per second from its start to the last outcome committed. Peers from the same run, on
 * the same machine, PostgreSQL and simulator: graphile-worker 0.17 draining the same 20,000 assign calls at
 * concurrency 10 (defaults, then with its batching options), two listeners, and one listener with routes (issue 13:
 * 200 divisions, four rooms in five routed by channel). The listeners find the roster pulled a moment before (a
 * restart); one more listener run is a first start, which pulls the roster first. Each round runs the six one after
 * the other, pairs side by side (order reversed every other round); ratios are the median over rounds of the
 * per-round ratio.
 * See bench/lib/drain.ts for the clocks.
 *
 * Knobs: BENCH_DRAIN_ROUNDS (2), BENCH_DRAIN_ROOMS (20000), BENCH_DRAIN_AGENTS (rooms / 2),
 * BENCH_LISTENER_CONCURRENCY (the shipped LISTENER_CONCURRENCY, 32), BENCH_GW_CONCURRENCY (10), BENCH_DRAIN_TIMEOUT_SECONDS (240),
 * BENCH_DRAIN_DIVISIONS (200: the routed run, l1r), BENCH_DRAIN_PEERS (l1f,gw,l1,l2,gwb,l1r: a subset, for profiling), BENCH_PGSS=1 and BENCH_CPU_PROF=1 (profiles),
 * BENCH_DRAIN_ANALYZE_AT=n with BENCH_DRAIN_ANALYZE_VERB (analyze; or vacuum analyze): once n calls were made, the
 * hot tables analysed, as autovacuum does at a moment of its choosing (see bench/lib/drain.ts).
 */
import { describe, drainChecks, drainOptions, drainRun, type DrainRun } from './lib/drain.ts';
import type { Goal } from './lib/results.ts';
import { alternate, medianRatio, pairRow } from './lib/rounds.ts';
import { isMain, partTimer, standalone, type BenchContext, type PartResult } from './lib/results.ts';
import { envInt } from './lib/stats.ts';

export async function runDrain(ctx: BenchContext): Promise<PartResult> {
  const timer = partTimer();
  const rounds = Math.max(1, envInt('BENCH_DRAIN_ROUNDS', 2));
  const o = drainOptions();
  const routed = drainOptions({ divisions: envInt('BENCH_DRAIN_DIVISIONS', 200) });
  const firstStart = drainOptions({ rosterPulled: false });
  // In this order (reversed every other round) each pair compared below runs back to back: graphile-worker and
  // one listener, one listener and two, two listeners and graphile-worker batched (not adjacent: batched vs one).
  // The listener runs find the roster pulled a moment before, as a restarted listener (or one added beside another)
  // does; l1f is a first start, which pulls the roster before its first call.
  const steps: Array<[string, () => Promise<DrainRun>]> = [
    ['l1f', () => drainRun(ctx, { kind: 'listener', listeners: 1 }, firstStart, 'drain_l1_first_start')],
    ['gw', () => drainRun(ctx, { kind: 'gw', batched: false }, o, 'drain_gw')],
    ['l1', () => drainRun(ctx, { kind: 'listener', listeners: 1 }, o, 'drain_l1')],
    ['l2', () => drainRun(ctx, { kind: 'listener', listeners: 2 }, o, 'drain_l2')],
    ['gwb', () => drainRun(ctx, { kind: 'gw', batched: true }, o, 'drain_gwb')],
    ['l1r', () => drainRun(ctx, { kind: 'listener', listeners: 1 }, routed, 'drain_l1_routed')],
  ];
  // BENCH_DRAIN_PEERS=l1,gw: a subset (for profiling); the rows of the others stay empty.
  const only = process.env.BENCH_DRAIN_PEERS?.split(',').map((x) => x.trim());
  const runs = await alternate<DrainRun>(ctx, rounds, only ? steps.filter(([k]) => only.includes(k)) : steps, (_, r) => describe(r));
  const { l1 = [], gw = [], gwb = [], l2 = [], l1r = [], l1f = [] } =
    runs as Partial<Record<'l1' | 'gw' | 'gwb' | 'l2' | 'l1r' | 'l1f', DrainRun[]>>;
  const rate = (r: DrainRun) => r.roomsPerSecond;
  const steady = (r: DrainRun) => r.steadyRoomsPerSecond;
  const cpu = (g: string) => (r: DrainRun) => r.cpuMsPerRoom[g];
  const peak = (r: DrainRun) => Math.max(...r.memory.map((m) => m.peakMiB ?? 0));
  const gwName = `graphile-worker, concurrency ${o.gwConcurrency}`;
  const row = (what: string, unit: string, a: DrainRun[], b: DrainRun[], baseline: string, f: (r: DrainRun) => number | null | undefined) =>
    pairRow('drain', what, unit, a, b, baseline, f);
  const goals = drainGoals({ l1, gw, gwb, l2, l1r, l1f }, gwName);
  return {
    name: 'drain',
    machine: ctx.machine,
    startedAt: timer.startedAt,
    seconds: timer.seconds(),
    params: { ...o, rounds, routedDivisions: routed.divisions, defaultMaxLoad: 2, gwBatching: { localQueueSize: 500, completeJobBatchDelay: 0, failJobBatchDelay: 0, useNodeTime: true } },
    rows: [
      row('cold drain rooms/s, 1 listener (start → last commit)', 'rooms/s', l1, gw, gwName, rate),
      row('cold drain rooms/s, 1 listener (start → last commit)', 'rooms/s', l1, gwb, `${gwName}, batched`, rate),
      row('cold drain rooms/s, 2 listeners', 'rooms/s', l2, l1, '1 listener', rate),
      row('steady rooms/s, 1 listener (first → last call)', 'rooms/s', l1, gw, gwName, steady),
      row('steady rooms/s, 1 listener (first → last call)', 'rooms/s', l1, gwb, `${gwName}, batched`, steady),
      row('startup: spawn → first assign call, 1 listener', 's', l1, gw, gwName, (r) => r.startupSeconds),
      row('cold drain rooms/s, 1 listener, first start (roster pulled before the first call)', 'rooms/s', l1f, gw, gwName, rate),
      row('startup: spawn → first assign call, 1 listener, first start', 's', l1f, gw, gwName, (r) => r.startupSeconds),
      row('listener CPU per room', 'ms', l1, gw, `${gwName} CPU per job`, cpu('peer')),
      row('listener CPU per room', 'ms', l1, gwb, `${gwName}, batched`, cpu('peer')),
      row('PostgreSQL CPU per room, 1 listener', 'ms', l1, gw, `same, ${gwName}`, cpu('postgres')),
      row('PostgreSQL CPU per room, 1 listener', 'ms', l1, gwb, `same, ${gwName}, batched`, cpu('postgres')),
      row('listeners CPU per room, 2 listeners', 'ms', l2, l1, '1 listener', cpu('peer')),
      row('PostgreSQL CPU per room, 2 listeners', 'ms', l2, l1, '1 listener', cpu('postgres')),
      row('listener peak RSS', 'MiB', l1, gw, `${gwName} peak RSS`, peak),
      row('listener peak RSS', 'MiB', l1, gwb, `${gwName}, batched`, peak),
      row(`cold drain rooms/s, 1 listener, routes (${routed.divisions} divisions, 4 rooms in 5 routed)`, 'rooms/s', l1r, l1, '1 listener, no routes', rate),
      row('PostgreSQL CPU per room, 1 listener, routes', 'ms', l1r, l1, '1 listener, no routes', cpu('postgres')),
    ],
    goals,
    details: {
      note:
        'Each value is the median over rounds; each ratio the median of the per-round ratios (the pair measured back to ' +
        'back in the same round), so a ratio need not equal value / baseline. cpu.cores.others is the rest of the ' +
        'machine (other test suites ran on the same two cores).',
      runs: { l1, gw, gwb, l2, l1r, l1f },
    },
  };
}

/** The goals of issue 12 for the cold drain, from the runs (also used to re-derive them from a result file). */
export function drainGoals(
  runs: Record<'l1' | 'gw' | 'gwb' | 'l2', DrainRun[]> & { l1r?: DrainRun[]; l1f?: DrainRun[] },
  gwName: string,
): Goal[] {
  const rate = (r: DrainRun) => r.roomsPerSecond;
  const vsGw = medianRatio(runs.l1, runs.gw, rate);
  const twoVsOne = medianRatio(runs.l2, runs.l1, rate);
  const routedVsNot = medianRatio(runs.l1r ?? [], runs.l1, rate);
  return [
    { part: 'drain', goal: 'cold drain with routes ≥ 0.8 × without (issue 13)', measured: routedVsNot, bound: '≥ 0.8', met: routedVsNot === null ? null : routedVsNot >= 0.8 },
    { part: 'drain', goal: `cold drain, 1 listener ≥ 1.0 × ${gwName} (fetch)`, measured: vsGw, bound: '≥ 1.0', met: vsGw === null ? null : vsGw >= 1 },
    { part: 'drain', goal: 'two listeners no slower than one', measured: twoVsOne, bound: '≥ 1.0', met: twoVsOne === null ? null : twoVsOne >= 1 },
    ...drainChecks('drain', [...runs.gw, ...runs.l1, ...runs.l2, ...runs.gwb, ...(runs.l1r ?? []), ...(runs.l1f ?? [])]),
  ];
}

if (isMain(import.meta.url)) await standalone(runDrain, 'drain');
