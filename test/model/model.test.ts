/**
 * Model-based test of the SQL core: random sequences of webhooks (with duplicates), reservations and their
 * outcomes (current and stale), lease expiries, time passing, roster syncs, capacity changes and pauses, and in
 * two runs of three routing by division (routes added, changed and deleted, membership pulled, rooms from several
 * sources and channels, overflow times passing), run against PostgreSQL and against the reference model
 * (model.ts). After every step the database must agree with the model (who waits, in what order, with which
 * divisions, who holds what) and the service's invariants must hold (commands.ts).
 *
 *   MODEL_RUNS=2000 MODEL_SEED=42 npx vitest run test/model/model.test.ts   # a longer or a replayed run
 *   MODEL_COMMANDS=100   # longer runs (default up to 60 commands after the initial roster)
 *   MODEL_RULES=spec     # follow the product spec where the SQL is known to differ (see Rules in model.ts); or a comma
 *                        # list of Rules keys, e.g. MODEL_RULES=repeatedResolution
 *   MODEL_STATS=1        # print how often each outcome happened;  MODEL_TRACE=1: the model's state after each step
 *
 * By default the model follows the SQL on the three known deviations (SQL_RULES), so that this property guards
 * everything else; regressions.test.ts holds those three, failing until the SQL is fixed.
 * A failure prints the shrunk command list: paste it into regressions.test.ts.
 */
import fc from 'fast-check';
import type pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { Harness, resetDatabase, scenarioArb } from './commands.ts';
import { SPEC_RULES, SQL_RULES, type Rules } from './model.ts';

const RUNS = Number(process.env.MODEL_RUNS ?? 150);
// `npm test` replays seed 1 (150 runs, every step checked), so that CI judges the code, not the dice; explore with
// MODEL_SEED=random (or any number) and more MODEL_RUNS; a failure prints its seed, which replays it with the same
// MODEL_RUNS. (The one left unshrunk at the close of issue 11, a mismatch after resolveOpen, was most likely the
// resolution of a late-landed service, now in regressions.test.ts.)
const SEED = process.env.MODEL_SEED === 'random' ? undefined : Number(process.env.MODEL_SEED ?? 1);
const MAX_COMMANDS = Number(process.env.MODEL_COMMANDS ?? 60);
// MODEL_RULES=spec: the spec's side of every known disagreement; or a comma list of Rules keys to take from the spec
const RULES: Rules = { ...SQL_RULES };
for (const k of (process.env.MODEL_RULES ?? '').split(',').filter(Boolean)) {
  if (k === 'spec') Object.assign(RULES, SPEC_RULES);
  else if (k in SQL_RULES) RULES[k as keyof Rules] = 'spec';
  else throw new Error(`MODEL_RULES: unknown rule ${k}`);
}

let db: TestDatabase;
let client: pg.Client;
beforeAll(async () => {
  db = await createTestDatabase();
  client = await db.client();
  await client.query('set synchronous_commit = off'); // durability is not under test here: faster commits
});
afterAll(async () => {
  await db?.drop();
});

describe('the SQL core agrees with the reference model', () => {
  it(
    `after every step of ${RUNS} random runs of up to ${MAX_COMMANDS} commands`,
    async () => {
      const stats = { runs: 0, steps: 0, reservations: 0 };
      const seen: Record<string, number> = {};
      await fc.assert(
        fc.asyncProperty(scenarioArb(MAX_COMMANDS), async (commands) => {
          await resetDatabase(client);
          const h = new Harness(client, RULES);
          await h.run(commands);
          stats.runs += 1;
          stats.steps += commands.length;
          stats.reservations += h.reservations.length;
          for (const [k, v] of Object.entries(h.stats)) seen[k] = (seen[k] ?? 0) + v;
        }),
        { numRuns: RUNS, seed: SEED },
      );
      expect(stats.reservations).toBeGreaterThan(0);
      console.log(`[model] ${stats.runs} runs, ${stats.steps} steps, ${stats.reservations} reservations`);
      if (process.env.MODEL_STATS) console.log(Object.entries(seen).sort().map(([k, v]) => `${k}=${v}`).join(' '));
    },
    600_000,
  );
});
