/**
 * The demo's throwaway PostgreSQL, in a process of its own that the demo starts in a new session (process group).
 * Ctrl-C on a terminal sends SIGINT to the whole foreground group: PostgreSQL, a child of the demo, would get it too
 * and shut down before the demo has read its summary. Here it is out of that group's reach; the demo stops it.
 *
 * Protocol: prints one JSON line `{"url": ..., "root": ...}` once PostgreSQL accepts connections. Stops PostgreSQL
 * and deletes its folder when its stdin ends (the demo closes it, or died: nothing outlives the demo) or on SIGTERM.
 */
import { rm } from 'node:fs/promises';
import path from 'node:path';
import { startEmbeddedPostgres, tempDataDir, type EmbeddedServer } from '../db/embedded.ts';

const dataDir = await tempDataDir('allocator-demo-');
const root = path.dirname(dataDir);
const starting: Promise<EmbeddedServer> = startEmbeddedPostgres({ dataDir, persistent: false });
let stopping = false;

/** Stops PostgreSQL (once it has started, if it is still starting) and deletes its folder, then exits. */
async function stop(code = 0): Promise<never> {
  if (!stopping) {
    stopping = true;
    const server = await starting.catch(() => undefined);
    await server?.stop().catch(() => {});
    await rm(root, { recursive: true, force: true }).catch(() => {});
  }
  return process.exit(code);
}

process.on('SIGINT', () => {}); // not ours to act on: the demo decides when PostgreSQL stops
process.on('SIGTERM', () => void stop());
process.on('SIGHUP', () => void stop());
process.stdin.on('end', () => void stop());
process.stdin.on('error', () => void stop());
process.stdin.resume();

try {
  const server = await starting;
  process.stdout.write(JSON.stringify({ url: server.urlFor('postgres'), root }) + '\n');
} catch (e) {
  process.stderr.write(`cannot start the embedded PostgreSQL: ${e instanceof Error ? e.message : String(e)}\n`);
  await stop(1);
}
