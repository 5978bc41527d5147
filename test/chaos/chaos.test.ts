/**
 * The one-minute chaos run of `npm test` (see chaos.ts): two web and three listener processes, Qiscus faults,
 * kill -9 and PostgreSQL restarts for 60 s, then heal, drain and check. The report is printed; every check must
 * pass. CHAOS_SEED=<n> replays a seed (fault and customer choices; process timing still varies), CHAOS_SECONDS
 * changes the length.
 */
import { expect, it } from 'vitest';
import { formatReport, runChaos } from './chaos.ts';

const seconds = Number(process.env.CHAOS_SECONDS ?? 60);
const seed = process.env.CHAOS_SEED === undefined ? undefined : Number(process.env.CHAOS_SEED);

it(
  `chaos: ${seconds} s of faults, kill -9 and PostgreSQL restarts; nothing lost, nobody over capacity`,
  async () => {
    const report = await runChaos({
      seconds,
      seed,
      drainSeconds: 40,
      log: process.env.CHAOS_LOG ? (line) => console.log(line) : undefined,
    });
    console.log(formatReport(report));

    expect(report.webhooks.accepted).toBeGreaterThan(0);
    expect(report.sessions.assigned).toBeGreaterThan(0);
    if (seconds >= 30) {
      // the faults did happen (the first kill comes within 10 s, the first PostgreSQL restart within 20 s)
      expect((report.faults['kill -9 web'] ?? 0) + (report.faults['kill -9 listener'] ?? 0)).toBeGreaterThanOrEqual(1);
      expect(report.faults['PostgreSQL restart'] ?? 0).toBeGreaterThanOrEqual(1);
    }
    const failed = report.checks.filter((c) => !c.ok);
    expect(
      failed.map((c) => `${c.name}: ${c.value}${c.detail ? ` — ${c.detail}` : ''}`),
      `seed ${report.seed}; timelines:\n${report.forensics.join('\n')}`,
    ).toEqual([]);
  },
  (seconds + 90) * 1000,
);
