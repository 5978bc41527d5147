/**
 * Stops what a test started (process stacks, databases) after each test, whatever its outcome, newest first.
 * Call `disposeAfterEach()` once at the top of a test file (or a module it imports), then hand it each stop.
 */
import { afterEach } from 'vitest';

export function disposeAfterEach(): (dispose: () => Promise<unknown>) => void {
  const pending: Array<() => Promise<unknown>> = [];
  afterEach(async () => {
    for (const dispose of pending.splice(0).reverse()) await dispose();
  });
  return (dispose) => void pending.push(dispose);
}
