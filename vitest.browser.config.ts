import { defineConfig } from 'vitest/config';

/**
 * The real-browser suite (`npm run test:browser`): headless Chromium from Debian's `chromium` package, driven by
 * playwright-core. Kept out of `npm test`, which needs nothing installed beyond `npm ci`; .ci/run installs Chromium
 * and runs both. Same PostgreSQL set-up as the main suite.
 */
export default defineConfig({
  test: {
    include: ['test/browser/**/*.test.ts'],
    globalSetup: ['test/support/global-setup.ts'],
    pool: 'forks',
    testTimeout: 120_000,
    hookTimeout: 120_000,
    teardownTimeout: 30_000,
  },
});
