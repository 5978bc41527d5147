/**
 * `npm run bench`: every part in order on one PostgreSQL (embedded, or DATABASE_URL), each writing
 * bench/results/<part>.json, then the combined table on stdout and in bench/results/summary.json and summary.md
 * (the Markdown that goes into the README).
 *
 * BENCH_PARTS=ingest,latency runs a subset. Other knobs: see each part and bench/README.md.
 */
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { runAllocation } from './allocation.ts';
import { runIngest } from './ingest.ts';
import { runLatency } from './latency.ts';
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
  allocation: runAllocation,
  latency: runLatency,
  scale: runScale,
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
const ctx = await createContext('bench');
const results: PartResult[] = [];
const failures: Array<{ part: string; error: string }> = [];
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

const rows = results.flatMap((r) => r.rows);
const goals = results.flatMap((r) => r.goals);
const seconds = Math.round((performance.now() - t0) / 1000);
const machine = machineLine(ctx.machine);
const markdown = [
  `Measured ${ctx.machine.at.slice(0, 10)} on ${machine}; \`npm run bench\`, ${seconds} s.`,
  '',
  rowsTable(rows),
  '',
  goalsTable(goals),
  '',
].join('\n');

await writeResult('summary', {
  machine: ctx.machine,
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
