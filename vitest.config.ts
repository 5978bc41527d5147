import { configDefaults, defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // The real-browser suite needs Chromium installed: `npm run test:browser` (vitest.browser.config.ts).
    exclude: [...configDefaults.exclude, 'test/browser/**'],
    globalSetup: ['test/support/global-setup.ts'],
    // Test files get their own database (cloned from a migrated template), so they may run in parallel: one at a
    // time on a 2-core machine (cores - 1), which keeps the timing bounds of the liveness and chaos tests honest.
    pool: 'forks',
    // Generous: a test that spawns processes is slow on a loaded machine; the bounds that matter are asserted inside.
    testTimeout: 120_000,
    hookTimeout: 120_000,
    teardownTimeout: 30_000,
  },
});
