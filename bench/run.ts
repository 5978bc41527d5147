/**
 * `npm run bench`: every part in order on one PostgreSQL (embedded, or DATABASE_URL), each writing
 * bench/results/<part>.json, then the combined table on stdout and in bench/results/summary.json and summary.md
 * (the Markdown that goes into the README).
 *
 * BENCH_PARTS=ingest,latency runs a subset. `npm run bench -- --from-files` runs nothing: it combines the result files
 * of the parts (as run one by one with npm run bench:<part>) into the summary. Other knobs: see each part and
 * bench/README.md.
 */
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { runAllocation } from './allocation.ts';
import { runColdStats } from './coldstats.ts';
import { runDrain } from './drain.ts';
import { runDrainPlans } from './drainplans.ts';
import { runHorizon } from './horizon.ts';
import { runIngest } from './ingest.ts';
import { runLatency } from './latency.ts';
import { runPrune } from './prune.ts';
import { runRouted } from './routed.ts';
import { machineLine } from './lib/machine.ts';
import { root } from './lib/procs.ts';
import {
  createContext,
  goalsTable,
  printPart,
  resultFile,
  rowsTable,
  writeResult,
  type Part,
  type PartResult,
} from './lib/results.ts';
import { runScale } from './scale.ts';

const PARTS: Record<string, Part> = {
  ingest: runIngest,
  drain: runDrain,
  coldstats: runColdStats,
  horizon: runHorizon,
  drainplans: runDrainPlans,
  allocation: runAllocation,
  latency: runLatency,
  scale: runScale,
  prune: runPrune,
  routed: runRouted,
};

const wanted = (process.env.BENCH_PARTS ?? Object.keys(PARTS).join(','))
  .split(',')
  .map((s) => s.trim())
  .filter(Boolean);
for (const w of wanted) {
  if (!PARTS[w]) {
    console.error(`unknown part "${w}" in BENCH_PARTS; parts: ${Object.keys(PARTS).join(', ')}`);
    process.exit(2);
  }
}

const t0 = performance.now();
const results: PartResult[] = [];
const failures: Array<{ part: string; error: string }> = [];
let header: string;
let machineInfo: PartResult['machine'];
if (process.argv.includes('--from-files')) {
  // Only the combined table, from the result files of parts run one by one (npm run bench:drain, ...).
  for (const name of wanted) {
    try {
      results.push(JSON.parse(await readFile(resultFile(name), 'utf8')) as PartResult);
    } catch (e) {
      failures.push({ part: name, error: `no result file: ${(e as Error).message}` });
    }
  }
  if (results.length === 0) {
    console.error('no result files to combine');
    process.exit(1);
  }
  machineInfo = results[0]!.machine;
  header = [
    'Combined from the result files of parts run one by one (`npm run bench -- --from-files`):',
    '',
    ...results.map((r) => `- ${r.name}: measured ${r.startedAt.slice(0, 16).replace('T', ' ')} UTC, ${r.seconds} s, on ${machineLine(r.machine)}.`),
  ].join('\n');
} else {
  const ctx = await createContext('bench');
  try {
    for (const name of wanted) {
      ctx.log(`part ${name}`);
      try {
        const r = await PARTS[name]!(ctx);
        await writeResult(r.name, r);
        printPart(r);
        results.push(r);
      } catch (e) {
        const error = e instanceof Error ? (e.stack ?? e.message) : String(e);
        ctx.log(`part ${name} FAILED: ${error}`);
        failures.push({ part: name, error });
      }
    }
  } finally {
    await ctx.server.stop();
  }
  machineInfo = ctx.machine;
  header = `Measured ${ctx.machine.at.slice(0, 10)} on ${machineLine(ctx.machine)}; \`npm run bench\`, ${Math.round((performance.now() - t0) / 1000)} s.`;
}

const rows = results.flatMap((r) => r.rows);
const goals = results.flatMap((r) => r.goals);
const seconds = Math.round((performance.now() - t0) / 1000);
const markdown = [header, '', rowsTable(rows), '', goalsTable(goals), ''].join('\n');

await writeResult('summary', {
  machine: machineInfo,
  seconds,
  parts: Object.fromEntries(results.map((r) => [r.name, { seconds: r.seconds, params: r.params, file: `bench/results/${r.name}.json` }])),
  rows,
  goals,
  failures,
});
await writeFile(resultFile('summary', 'md'), markdown);

console.log(`\n# All parts (${seconds} s)\n`);
console.log(markdown);
console.log(`written: ${path.relative(root, resultFile('summary'))}, ${path.relative(root, resultFile('summary', 'md'))}`);
if (failures.length) {
  console.log(`\nFAILED parts: ${failures.map((f) => f.part).join(', ')}`);
  process.exitCode = 1;
}
