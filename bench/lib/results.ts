/**
 * The shape every part returns, the result files, the combined table, and the harness that runs one part alone.
 */
import { mkdir, rename, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { sqlPatches, startBenchServer, type BenchServer } from './db.ts';
import { machineInfo, machineLine, type MachineInfo } from './machine.ts';
import { root } from './procs.ts';
import { table, type Cell } from './table.ts';

/** One figure with the baseline it is compared with, measured in the same run. */
export interface Row {
  part: string;
  what: string;
  value: number | null;
  unit: string;
  baseline: string;
  baselineValue: number | null;
  /** value / baselineValue. */
  ratio: number | null;
}

export interface Goal {
  part: string;
  goal: string;
  /** The ratio or value that decides the goal, and the bound it must meet. */
  measured: number | null;
  bound: string;
  met: boolean | null;
  note?: string;
}

export interface PartResult {
  name: string;
  machine: MachineInfo;
  startedAt: string;
  seconds: number;
  params: Record<string, unknown>;
  rows: Row[];
  goals: Goal[];
  /** Everything measured, in detail (latency summaries, CPU per process, plans, ...). */
  details: Record<string, unknown>;
}

export interface BenchContext {
  server: BenchServer;
  machine: MachineInfo;
  log(msg: string): void;
}

export type Part = (ctx: BenchContext) => Promise<PartResult>;

export const resultsDir = path.join(root, 'bench', 'results');

/**
 * bench/results/<name>.json; with BENCH_SQL_PATCH or BENCH_APP_ROOT set, <name>.patched.json, so that a run of a proposed change
 * does not overwrite the run of the code as committed.
 */
export function resultFile(name: string, ext = 'json'): string {
  const patched = sqlPatches().length > 0 || !!process.env.BENCH_APP_ROOT;
  return path.join(resultsDir, `${name}${patched ? '.patched' : ''}.${ext}`);
}

export async function writeResult(name: string, data: unknown): Promise<string> {
  await mkdir(resultsDir, { recursive: true });
  const file = resultFile(name);
  const tmp = `${file}.${process.pid}.tmp`;
  await writeFile(tmp, `${JSON.stringify(data, null, 2)}\n`);
  await rename(tmp, file);
  return file;
}

export function rowsTable(rows: Row[]): string {
  return table(
    ['part', 'measurement', 'value', 'unit', 'baseline (same run)', 'baseline', 'ratio'],
    rows.map((r): Cell[] => [r.part, r.what, r.value, r.unit, r.baseline, r.baselineValue, r.ratio]),
  );
}

export function goalsTable(goals: Goal[]): string {
  return table(
    ['part', 'goal', 'measured', 'bound', 'met'],
    goals.map((g): Cell[] => [g.part, g.goal, g.measured, g.bound, g.met === null ? '—' : g.met ? 'yes' : 'NO']),
  );
}

export function printPart(r: PartResult): void {
  console.log(`\n## ${r.name} (${r.seconds} s)\n`);
  console.log(rowsTable(r.rows));
  if (r.goals.length) {
    console.log('');
    console.log(goalsTable(r.goals));
  }
}

function logger(prefix: string): (msg: string) => void {
  const t0 = performance.now();
  return (msg: string) => {
    const s = ((performance.now() - t0) / 1000).toFixed(1).padStart(6);
    process.stderr.write(`[bench ${s}s] ${prefix}: ${msg}\n`);
  };
}

/** True when `metaUrl` is the module node was asked to run (tsx bench/x.ts). */
export function isMain(metaUrl: string): boolean {
  const arg = process.argv[1];
  return !!arg && metaUrl === pathToFileURL(path.resolve(arg)).href;
}

/** Creates the server and machine info for a run. */
export async function createContext(prefix: string): Promise<BenchContext> {
  const log = logger(prefix);
  const server = await startBenchServer(log);
  const machine = await machineInfo(server.adminUrl, server.kind);
  log(machineLine(machine));
  return { server, machine, log };
}

/** Runs one part alone: its own server, its result file, its table. */
export async function standalone(part: Part, name: string): Promise<void> {
  const ctx = await createContext(name);
  try {
    const r = await part(ctx);
    const file = await writeResult(r.name, r);
    printPart(r);
    console.log(`\nmachine: ${machineLine(r.machine)}\nwritten: ${path.relative(root, file)}`);
  } finally {
    await ctx.server.stop();
  }
}

/** Helper for parts: the common header of a result. */
export function partTimer(): { startedAt: string; seconds(): number } {
  const t0 = performance.now();
  return { startedAt: new Date().toISOString(), seconds: () => Math.round((performance.now() - t0) / 100) / 10 };
}
