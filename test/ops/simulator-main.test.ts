/**
 * `npm run simulator` (src/simulator/main.ts), the compose file's `demo` profile service: its environment
 * (SIM_PORT, SIM_AGENTS, SIM_HOST, QISCUS_APP_ID/QISCUS_SECRET_KEY, SIM_WEBHOOK_URL), the agents list it serves with
 * the app's credentials, a clean stop on SIGTERM, and one clear line for a bad setting.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { spawnProc, type Proc } from '../support/processes.ts';

let proc: Proc | undefined;
afterEach(async () => {
  await proc?.stop(5000);
  proc = undefined;
});

describe('npm run simulator (src/simulator/main.ts)', () => {
  it('serves SIM_AGENTS agents on SIM_PORT to the app with its credentials, and stops on SIGTERM', async () => {
    proc = spawnProc('simulator', 'src/simulator/main.ts', {
      SIM_PORT: '0',
      SIM_AGENTS: '3',
      SIM_HOST: '127.0.0.1',
      QISCUS_APP_ID: 'sim-app',
      QISCUS_SECRET_KEY: 'sim-key',
      SIM_WEBHOOK_URL: 'http://127.0.0.1:9/',
    });
    const url = (await proc.waitFor(/^http:\/\/127\.0\.0\.1:\d+$/)).trim();
    expect(url).not.toMatch(/:0$/);

    const list = `${url}/api/v2/admin/agents?page=1&limit=50`;
    expect((await fetch(list)).status).toBe(401);
    const res = await fetch(list, { headers: { 'Qiscus-App-Id': 'sim-app', 'Qiscus-Secret-Key': 'sim-key' } });
    expect(res.status).toBe(200);
    const body = (await res.json()) as { data: { agents: Array<{ id: number; name: string; type_as_string: string }> } };
    expect(body.data.agents.map((a) => [a.id, a.name, a.type_as_string])).toEqual([
      [1001, 'Ayu', 'agent'],
      [1002, 'Budi', 'agent'],
      [1003, 'Citra', 'agent'],
    ]);

    expect(await proc.stop()).toBe(0);
  });

  it('refuses a malformed setting with one line naming it', async () => {
    proc = spawnProc('simulator', 'src/simulator/main.ts', { SIM_PORT: 'many' });
    expect(await proc.exited).toBe(1);
    expect(proc.lines.join('\n')).toMatch(/SIM_PORT must be a non-negative integer/);
  });
});
