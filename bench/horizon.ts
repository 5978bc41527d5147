/**
 * Pinned horizon: the cold drain while another session holds a REPEATABLE READ snapshot open on the same database
 * for the whole run (`begin isolation level repeatable read; select count(*) from allocator.sessions;` and left
 * open, as a long report or a forgotten psql session would), against the same drain without it; the same for
 * graphile-worker. With the horizon pinned, no row version the drain leaves behind (a room moved from waiting to
 * reserved to assigned; a job deleted) can be pruned or vacuumed, so whoever scans past them pays more as the run
 * goes on: the rate of the last 5,000 rooms against the first 5,000 shows it. Same run, alternating; ratios are
 * medians of the per-round ratios. See bench/lib/drain.ts for the clocks.
 *
 * Knobs: BENCH_HORIZON_ROUNDS (2), and those of the drain (BENCH_DRAIN_ROOMS, BENCH_DRAIN_TIMEOUT_SECONDS, ...).
 */
import { describe, drainChecks, drainOptions, drainRun, type DrainRun } from './lib/drain.ts';
import type { Goal } from './lib/results.ts';
import { alternate, medianOf, medianRatio, pairRow } from './lib/rounds.ts';
import { isMain, partTimer, standalone, type BenchContext, type PartResult } from './lib/results.ts';
import { envInt } from './lib/stats.ts';

export async function runHorizon(ctx: BenchContext): Promise<PartResult> {
  const timer = partTimer();
  const rounds = Math.max(1, envInt('BENCH_HORIZON_ROUNDS', 2));
  const free = drainOptions({ snapshot: false });
  const pinned = drainOptions({ snapshot: true });
  const listener = { kind: 'listener', listeners: 1 } as const;
  const gw = { kind: 'gw', batched: false } as const;
  const runs = await alternate<DrainRun>(
    ctx,
    rounds,
    [
      ['l1', () => drainRun(ctx, listener, free, 'horizon_l1')],
      ['l1Pinned', () => drainRun(ctx, listener, pinned, 'horizon_l1_pinned')],
      ['gw', () => drainRun(ctx, gw, free, 'horizon_gw')],
      ['gwPinned', () => drainRun(ctx, gw, pinned, 'horizon_gw_pinned')],
    ],
    (_, r) => describe(r),
  );
  const { l1, l1Pinned, gw: g, gwPinned } = runs as Record<'l1' | 'l1Pinned' | 'gw' | 'gwPinned', DrainRun[]>;
  const rate = (r: DrainRun) => r.roomsPerSecond;
  const decay = (r: DrainRun) => r.decay;
  const gwName = `graphile-worker, concurrency ${free.gwConcurrency}`;
  const row = (what: string, unit: string, a: DrainRun[], b: DrainRun[], baseline: string, f: (r: DrainRun) => number | null | undefined) =>
    pairRow('horizon', what, unit, a, b, baseline, f);
  return {
    name: 'horizon',
    machine: ctx.machine,
    startedAt: timer.startedAt,
    seconds: timer.seconds(),
    params: { ...free, snapshot: 'held (pinned) vs none', rounds },
    rows: [
      row('cold drain rooms/s, snapshot held, 1 listener', 'rooms/s', l1Pinned, l1, 'same without the snapshot', rate),
      row('first 5,000 rooms/s, snapshot held, 1 listener', 'rooms/s', l1Pinned, l1, 'same without the snapshot', (r) => r.first5kRoomsPerSecond),
      row('last 5,000 rooms/s, snapshot held, 1 listener', 'rooms/s', l1Pinned, l1, 'same without the snapshot', (r) => r.last5kRoomsPerSecond),
      row('decay (last 5k / first 5k rate), snapshot held, 1 listener', '×', l1Pinned, l1, 'same without the snapshot', decay),
      row('PostgreSQL CPU per room, snapshot held, 1 listener', 'ms', l1Pinned, l1, 'same without the snapshot', (r) => r.cpuMsPerRoom.postgres),
      row(`cold drain jobs/s, snapshot held, ${gwName}`, 'rooms/s', gwPinned, g, 'same without the snapshot', rate),
      row(`decay (last 5k / first 5k rate), snapshot held, ${gwName}`, '×', gwPinned, g, 'same without the snapshot', decay),
      row(`PostgreSQL CPU per job, snapshot held, ${gwName}`, 'ms', gwPinned, g, 'same without the snapshot', (r) => r.cpuMsPerRoom.postgres),
      row('cold drain rooms/s, snapshot held, 1 listener', 'rooms/s', l1Pinned, gwPinned, `${gwName}, snapshot held`, rate),
    ],
    goals: horizonGoals({ l1, l1Pinned, gw: g, gwPinned }),
    details: {
      note:
        'pinned: a REPEATABLE READ transaction on the same database, its snapshot taken after the rooms (or jobs) were ' +
        'queued and before the drain started, committed after it. Decay = rate of the last 5,000 assign calls / rate ' +
        'of the first 5,000 (call 1 → 5,000). Values are medians over rounds; ratios medians of per-round ratios.',
      runs: { l1, l1Pinned, gw: g, gwPinned },
    },
  };
}

/** The goals of issue 12 for a drain under a pinned horizon, from the runs. */
export function horizonGoals(runs: Record<'l1' | 'l1Pinned' | 'gw' | 'gwPinned', DrainRun[]>): Goal[] {
  const pinnedRatio = medianRatio(runs.l1Pinned, runs.l1, (r) => r.roomsPerSecond);
  const pinnedDecay = medianOf(runs.l1Pinned, (r) => r.decay);
  return [
    { part: 'horizon', goal: 'snapshot held: drain ≥ 0.8 × without (1 listener)', measured: pinnedRatio, bound: '≥ 0.8', met: pinnedRatio === null ? null : pinnedRatio >= 0.8 },
    { part: 'horizon', goal: 'snapshot held: no decay (last 5k rate / first 5k, 1 listener)', measured: pinnedDecay, bound: '≥ 0.9', met: pinnedDecay === null ? null : pinnedDecay >= 0.9 },
    ...drainChecks('horizon', [...runs.l1, ...runs.l1Pinned, ...runs.gw, ...runs.gwPinned]),
  ];
}

if (isMain(import.meta.url)) await standalone(runHorizon, 'horizon');
