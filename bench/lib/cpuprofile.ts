/**
 * Profiling support. With BENCH_CPU_PROF=1 the web and listener processes run with --cpu-prof and write
 * .cpuprofile files to bench/results/profiles/ when they exit (open them in Chrome DevTools or speedscope), and
 * this module prints the top functions by self time:
 *   tsx bench/lib/cpuprofile.ts bench/results/profiles/<file>.cpuprofile [top=25]
 */
import { mkdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { isMain, resultsDir } from './results.ts';

export function profileArgs(): string[] {
  if (!process.env.BENCH_CPU_PROF) return [];
  const dir = path.join(resultsDir, 'profiles');
  mkdirSync(dir, { recursive: true });
  return ['--cpu-prof', `--cpu-prof-dir=${dir}`];
}

interface Node {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}
interface Profile {
  nodes: Node[];
  samples: number[];
  timeDeltas: number[];
  startTime: number;
  endTime: number;
}

interface Hot {
  fn: string;
  where: string;
  selfMs: number;
  selfPct: number;
}

/** Self time per function (summed over call sites), and per package/file group. */
function summarizeProfile(file: string, top = 25): { totalMs: number; functions: Hot[]; byFile: Hot[] } {
  const p = JSON.parse(readFileSync(file, 'utf8')) as Profile;
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const self = new Map<number, number>();
  for (let i = 0; i < p.samples.length; i++) {
    self.set(p.samples[i]!, (self.get(p.samples[i]!) ?? 0) + (p.timeDeltas[i] ?? 0));
  }
  const total = [...self.values()].reduce((a, b) => a + b, 0);
  const fns = new Map<string, { fn: string; where: string; us: number }>();
  const files = new Map<string, number>();
  for (const [id, us] of self) {
    const n = byId.get(id)!;
    const url = n.callFrame.url.replace(/^file:\/\//, '');
    const short = url.includes('node_modules/')
      ? url.slice(url.lastIndexOf('node_modules/') + 13)
      : url.replace(process.cwd() + '/', '');
    const where = `${short}:${n.callFrame.lineNumber + 1}`;
    const fn = n.callFrame.functionName || '(anonymous)';
    const key = `${fn} ${where}`;
    const e = fns.get(key) ?? { fn, where, us: 0 };
    e.us += us;
    fns.set(key, e);
    const group = short.includes('/') && url.includes('node_modules/')
      ? short.split('/').slice(0, short.startsWith('@') ? 2 : 1).join('/')
      : short || fn;
    files.set(group, (files.get(group) ?? 0) + us);
  }
  const pct = (us: number) => Math.round((us / total) * 1000) / 10;
  return {
    totalMs: Math.round(total / 1000),
    functions: [...fns.values()]
      .sort((a, b) => b.us - a.us)
      .slice(0, top)
      .map((e) => ({ fn: e.fn, where: e.where, selfMs: Math.round(e.us / 1000), selfPct: pct(e.us) })),
    byFile: [...files.entries()]
      .sort((a, b) => b[1] - a[1])
      .slice(0, top)
      .map(([g, us]) => ({ fn: g, where: '', selfMs: Math.round(us / 1000), selfPct: pct(us) })),
  };
}

if (isMain(import.meta.url)) {
  const file = process.argv[2];
  if (!file) {
    console.error('usage: tsx bench/lib/cpuprofile.ts <file.cpuprofile> [top]');
    process.exit(2);
  }
  const s = summarizeProfile(file, Number(process.argv[3] ?? 25));
  console.log(`total sampled: ${s.totalMs} ms\n\nby package / file:`);
  for (const h of s.byFile) console.log(`${String(h.selfPct).padStart(6)}%  ${String(h.selfMs).padStart(7)} ms  ${h.fn}`);
  console.log('\nby function (self time):');
  for (const h of s.functions) {
    console.log(`${String(h.selfPct).padStart(6)}%  ${String(h.selfMs).padStart(7)} ms  ${h.fn}  ${h.where}`);
  }
}
