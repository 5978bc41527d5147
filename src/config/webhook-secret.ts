/**
 * `npm start` is secure by default: without WEBHOOK_SECRET it uses a secret of its own, generated on the first run
 * and kept beside its data (DATA_DIR's parent: `.data/webhook-secret` by default), readable by its owner only. The
 * next runs read it back, so the webhook URLs pasted into Qiscus keep working across restarts.
 */
import { randomBytes } from 'node:crypto';
import { chmod, mkdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';

/** Where `npm start` keeps its generated secret for a given DATA_DIR. */
export function webhookSecretFile(dataDir: string): string {
  return path.join(path.dirname(path.resolve(dataDir)), 'webhook-secret');
}

/** The secret in `file`, or a new one written there (mode 0600) when there is none yet. */
export async function loadOrCreateWebhookSecret(file: string): Promise<{ secret: string; created: boolean }> {
  const existing = await readSecret(file);
  if (existing) {
    await chmod(file, 0o600); // it may have been copied around with looser rights
    return { secret: existing, created: false };
  }
  await mkdir(path.dirname(file), { recursive: true });
  // 24 random bytes, URL-safe: it goes into the URLs given to Qiscus as is, no escaping needed.
  const secret = randomBytes(24).toString('base64url');
  try {
    await writeFile(file, `${secret}\n`, { mode: 0o600, flag: 'wx' });
    return { secret, created: true };
  } catch (err) {
    // Another `npm start` on the same data wrote it first: use theirs.
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    const theirs = await readSecret(file);
    if (!theirs) throw new Error(`${file} is empty: delete it to have a secret generated, or set WEBHOOK_SECRET`);
    return { secret: theirs, created: false };
  }
}

async function readSecret(file: string): Promise<string | undefined> {
  try {
    return (await readFile(file, 'utf8')).trim() || undefined;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}
