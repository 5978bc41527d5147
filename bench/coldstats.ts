/**
 * Cold drain straight after a burst on a never-analysed database: the 20,000 rooms are created and the listener
 * starts at once, with no ANALYZE (the planner still sees the empty tables of the migration; autovacuum may
 * analyse them during the run, which result files record), against the same drain after ANALYZE. Same run,
 * alternating; ratios are medians of the per-round ratios. See bench/lib/drain.ts for the clocks.
 *
 * Knobs: BENCH_COLDSTATS_ROUNDS (2), and those of the drain (BENCH_DRAIN_ROOMS, ...).
 */
import { describe, drainChecks, drainOptions, drainRun, type DrainRun } from './lib/drain.ts';
import { alternate, pairRow } from './lib/rounds.ts';
import { isMain, partTimer, standalone, type BenchContext, type PartResult } from './lib/results.ts';
import { envInt } from './lib/stats.ts';

export async function runColdStats(ctx: BenchContext): Promise<PartResult> {
  const timer = partTimer();
  const rounds = Math.max(1, envInt('BENCH_COLDSTATS_ROUNDS', 2));
  const fresh = drainOptions({ analyze: false });
  const analysed = drainOptions({ analyze: true });
  const listener = { kind: 'listener', listeners: 1 } as const;
  const runs = await alternate<DrainRun>(
    ctx,
    rounds,
    [
      ['fresh', () => drainRun(ctx, listener, fresh, 'coldstats_fresh')],
      ['analysed', () => drainRun(ctx, listener, analysed, 'coldstats_analysed')],
    ],
    (_, r) => `${describe(r)}; autoanalyze during the run: sessions ${r.checks.sessionsAutoanalyzed}, agents ${r.checks.agentsAutoanalyzed}`,
  );
  const { fresh: f, analysed: a } = runs as Record<'fresh' | 'analysed', DrainRun[]>;
  const row = (what: string, unit: string, fn: (r: DrainRun) => number | null | undefined) =>
    pairRow('coldstats', what, unit, f, a, 'same after ANALYZE', fn);
  return {
    name: 'coldstats',
    machine: ctx.machine,
    startedAt: timer.startedAt,
    seconds: timer.seconds(),
    params: { ...fresh, analyze: 'no (fresh) vs yes (analysed)', rounds },
    rows: [
      row('cold drain rooms/s, never analysed, 1 listener', 'rooms/s', (r) => r.roomsPerSecond),
      row('steady rooms/s, never analysed', 'rooms/s', (r) => r.steadyRoomsPerSecond),
      row('first 5,000 rooms/s, never analysed', 'rooms/s', (r) => r.first5kRoomsPerSecond),
      row('PostgreSQL CPU per room, never analysed', 'ms', (r) => r.cpuMsPerRoom.postgres),
      row('listener CPU per room, never analysed', 'ms', (r) => r.cpuMsPerRoom.peer),
    ],
    goals: drainChecks('coldstats', [...f, ...a]),
    details: {
      note:
        'fresh: no ANALYZE after the migration or the burst (autovacuum left on; checks.*Autoanalyzed says whether it ' +
        'analysed the table during the run). Values are medians over rounds; ratios medians of per-round ratios.',
      runs: { fresh: f, analysed: a },
    },
  };
}

if (isMain(import.meta.url)) await standalone(runColdStats, 'coldstats');
