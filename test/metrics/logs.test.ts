/**
 * Log format: JSON lines when stdout is not a terminal (what a log shipper reads), pretty on a terminal, JSON on a
 * terminal too with LOG_FORMAT=json. Run in child processes, since the choice depends on the process's stdout.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const script = `const { createLogger } = await import('./src/log.ts'); createLogger('info', 'demo').info({ room: '42' }, 'hello');`;
const env = (extra: Record<string, string> = {}) => {
  const e: NodeJS.ProcessEnv = { ...process.env, ...extra };
  if (!('LOG_FORMAT' in extra)) delete e.LOG_FORMAT;
  return e;
};
const hasScript = spawnSync('script', ['--version']).status === 0;

describe('log format', () => {
  it('is one JSON object per line when stdout is a pipe', () => {
    const out = execFileSync(process.execPath, ['--import', 'tsx', '-e', script], { cwd: root, env: env() }).toString();
    const line = JSON.parse(out.trim());
    expect(line).toMatchObject({ level: 30, name: 'demo', room: '42', msg: 'hello' });
  });

  // `script` runs the command on a pseudo-terminal.
  it.runIf(hasScript)('is pretty on a terminal, unless LOG_FORMAT=json', () => {
    const onTty = (extra?: Record<string, string>) =>
      execFileSync('script', ['-qec', `"${process.execPath}" --import tsx -e "${script}"`, '/dev/null'], {
        cwd: root,
        env: env(extra),
      }).toString();
    const pretty = onTty();
    expect(pretty).toMatch(/INFO.*\(demo\).*hello/);
    expect(pretty).not.toMatch(/^\{/m);
    const forced = onTty({ LOG_FORMAT: 'json' });
    expect(JSON.parse(forced.trim())).toMatchObject({ msg: 'hello', room: '42' });
  });
});
