/**
 * `npm run chaos -- --minutes N` (or `--seconds N`, `--seed S`, `--no-late-copies`): the chaos run of test/chaos/chaos.ts, with its
 * progress on stderr and the report on stdout. Exits 1 if any check fails. Ctrl-C ends the chaos phase early (the
 * run still heals, drains and reports); a second Ctrl-C exits at once.
 */
import { writeFileSync } from 'node:fs';
import { formatReport, runChaos, type ChaosOptions } from './chaos.ts';

function usage(msg?: string): never {
  if (msg) process.stderr.write(`${msg}\n`);
  process.stderr.write('usage: npm run chaos -- [--minutes N | --seconds N] [--seed S] [--no-late-copies]\n');
  process.exit(2);
}

const opts: ChaosOptions = { log: (line) => process.stderr.write(`${line}\n`) };
const args = process.argv.slice(2);
for (let i = 0; i < args.length; i++) {
  const a = args[i]!;
  const [flag, inline] = a.includes('=') ? [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)] : [a, undefined];
  const value = () => {
    const v = inline ?? args[++i];
    if (v === undefined || !/^\d+(\.\d+)?$/.test(v)) usage(`${flag} needs a number`);
    return Number(v);
  };
  if (flag === '--minutes') opts.minutes = value();
  else if (flag === '--seconds') opts.seconds = value();
  else if (flag === '--seed') opts.seed = value();
  else if (flag === '--no-late-copies') opts.lateCopies = false;
  else if (flag === '--help' || flag === '-h') usage();
  else usage(`unknown argument ${a}`);
}

const abort = new AbortController();
opts.signal = abort.signal;
let interrupts = 0;
const onSignal = () => {
  if (++interrupts === 1) {
    process.stderr.write('interrupted: ending the chaos phase, then healing, draining and reporting (again to quit)\n');
    abort.abort();
  } else process.exit(130);
};
process.on('SIGINT', onSignal);
process.on('SIGTERM', onSignal);

try {
  const report = await runChaos(opts);
  process.stdout.write(`${formatReport(report)}\n`);
  // CHAOS_REPORT_JSON=<file>: the whole report as JSON too (every violation, not just the first few)
  if (process.env.CHAOS_REPORT_JSON) writeFileSync(process.env.CHAOS_REPORT_JSON, JSON.stringify(report, null, 1));
  process.exit(report.ok ? 0 : 1);
} catch (e) {
  process.stderr.write(`chaos run failed: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
  process.exit(1);
}
