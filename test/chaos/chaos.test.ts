/**
 * The one-minute chaos run of `npm test` (see chaos.ts): two web and three listener processes at the shipped
 * defaults, Qiscus faults (10% 5xx, 429s, hangs, assigned-then-500, latency spikes), a listener killed with
 * kill -9 every 3-6 s, a web process every 10-20 s, PostgreSQL restarts, rooms resolved 0.1-0.5 s after their
 * assignment and returning customers, rooms routed to three divisions by source and channel.id while the routes and
 * Qiscus's division membership change (routing.ts), for 60 s; then heal, drain and check. Every check must pass:
 * nothing lost, nobody over capacity, no room with two agents, every reservation allowed by the room's route
 * (its divisions, or overflowed, or no route), every membership change pulled, and liveness (liveness.ts: a waiting
 * room with an agent who may serve it and has a free slot gets its assign call within 1 s + 0.5 s margin, outside
 * the excuses listed there; webhook 2xx → assign call p95 ≤ 2 s;
 * settled within 5 s of the traffic stopping; the p95 is judged only when the machine is not loaded beyond three
 * times its cores by others). The report is printed.
 * CHAOS_SEED=<n> replays a seed (fault and customer choices; process timing still varies), CHAOS_SECONDS changes
 * the length, CHAOS_LOG=1 prints the progress lines.
 */
import os from 'node:os';
import { expect, it } from 'vitest';
import { formatReport, runChaos } from './chaos.ts';

const seconds = Number(process.env.CHAOS_SECONDS ?? 60);
const seed = process.env.CHAOS_SEED === undefined ? undefined : Number(process.env.CHAOS_SEED);

it(
  `chaos: ${seconds} s of faults, kill -9, PostgreSQL restarts and changing routes; nothing lost, nobody over capacity, routes kept, no free slot left idle`,
  async () => {
    const report = await runChaos({
      seconds,
      seed,
      drainSeconds: 30,
      log: process.env.CHAOS_LOG ? (line) => console.log(line) : undefined,
    });
    console.log(formatReport(report));

    expect(report.webhooks.accepted).toBeGreaterThan(0);
    expect(report.sessions.assigned).toBeGreaterThan(0);
    if (seconds >= 30) {
      // the faults did happen (the first listener kill comes within 6 s, the first PostgreSQL restart within 20 s)
      expect(report.faults['kill -9 listener'] ?? 0).toBeGreaterThanOrEqual(3);
      expect(report.faults['PostgreSQL restart'] ?? 0).toBeGreaterThanOrEqual(1);
      expect(report.customers.fastResolutions).toBeGreaterThan(0);
      expect(report.customers.returning).toBeGreaterThan(0);
      // routes and membership did change while rooms waited, and rooms went both ways
      expect(report.routing.routeChanges).toBeGreaterThanOrEqual(3);
      expect(report.routing.membershipChanges).toBeGreaterThanOrEqual(2);
      expect(report.routing.assigned['agent in a division of the route'] ?? 0).toBeGreaterThan(0);
      expect(report.routing.assigned['no route matched'] ?? 0).toBeGreaterThan(0);
    }
    // The liveness watch and the webhook→assign percentile are times: on a machine loaded by others they measure the
    // others. `npm run chaos` judges them always; here they are judged with CHAOS_STRICT=1, or when the machine is
    // not loaded beyond its cores, else printed. Every other check (nothing lost, capacity, one agent per room,
    // settled) holds always.
    const load = os.loadavg()[0] ?? 0;
    const overloaded = process.env.CHAOS_STRICT !== '1' && load > os.availableParallelism();
    const timing = (name: string) => name.startsWith('webhook 2xx → assign call') || name.startsWith('liveness');
    if (overloaded) {
      for (const c of report.checks.filter((x) => !x.ok && timing(x.name))) {
        console.warn(`not judged (load ${load.toFixed(1)} on ${os.availableParallelism()} cores): ${c.name}: ${c.value}`);
      }
    }
    const failed = report.checks.filter((c) => !c.ok && !(overloaded && timing(c.name)));
    expect(
      failed.map((c) => `${c.name}: ${c.value}${c.detail ? ` — ${c.detail}` : ''}`),
      `seed ${report.seed}; timelines:\n${report.forensics.join('\n')}`,
    ).toEqual([]);
  },
  (seconds + 150) * 1000,
);
