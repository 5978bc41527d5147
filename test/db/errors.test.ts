/**
 * Which database failures are the database being away (the web app answers 503, the listener retries its report),
 * the data refused (422), or a bug (500; the listener gives the report up to the lease); and which of the first
 * are a lost conflict with other transactions, which `npm run migrate` retries on the same connection.
 */
import pg from 'pg';
import { describe, expect, it } from 'vitest';
import { classifyDbError, isConnectionError, isLockConflict } from '../../src/db/errors.ts';

function serverError(code: string): Error {
  const e = new pg.DatabaseError(`sqlstate ${code}`, 0, 'error');
  e.code = code;
  e.severity = 'ERROR';
  return e;
}
const sys = (code: string) => Object.assign(new Error(`connect ${code}`), { code });

describe('classifyDbError', () => {
  it.each([
    ['ECONNREFUSED', sys('ECONNREFUSED'), 'unavailable'],
    ['ECONNRESET', sys('ECONNRESET'), 'unavailable'],
    ['AggregateError of ECONNREFUSED', Object.assign(new AggregateError([sys('ECONNREFUSED')], 'x'), {}), 'unavailable'],
    ['pool timeout', new Error('timeout exceeded when trying to connect'), 'unavailable'],
    ['connection terminated', new Error('Connection terminated unexpectedly'), 'unavailable'],
    ['client not queryable', new Error('Client has encountered a connection error and is not queryable'), 'unavailable'],
    ['EPIPE', sys('EPIPE'), 'unavailable'],
    ['57P02 crash shutdown', serverError('57P02'), 'unavailable'],
    ['08006 connection failure', serverError('08006'), 'unavailable'],
    ['53300 too many connections', serverError('53300'), 'unavailable'],
    ['57P01 admin shutdown', serverError('57P01'), 'unavailable'],
    ['57P03 cannot connect now', serverError('57P03'), 'unavailable'],
    ['57014 statement timeout', serverError('57014'), 'unavailable'],
    ['40P01 deadlock', serverError('40P01'), 'unavailable'],
    ['22P05 untranslatable character', serverError('22P05'), 'rejected'],
    ['22023 invalid parameter', serverError('22023'), 'rejected'],
    ['42883 undefined function', serverError('42883'), 'bug'],
    ['23505 unique violation', serverError('23505'), 'bug'],
    ['a thrown string', 'boom', 'bug'],
  ])('%s → %s', (_name, err, kind) => {
    expect(classifyDbError(err)).toBe(kind);
    expect(isConnectionError(err)).toBe(kind === 'unavailable');
  });
});

describe('isLockConflict', () => {
  it.each([
    ['55P03 lock not available', serverError('55P03'), true],
    ['40P01 deadlock', serverError('40P01'), true],
    ['40001 serialization failure', serverError('40001'), true],
    ['57014 statement timeout', serverError('57014'), false],
    ['08006 connection failure', serverError('08006'), false],
    ['ECONNRESET', sys('ECONNRESET'), false],
    ['connection terminated', new Error('Connection terminated unexpectedly'), false],
    ['23505 unique violation', serverError('23505'), false],
  ])('%s → %s', (_name, err, conflict) => {
    expect(isLockConflict(err)).toBe(conflict);
    if (conflict) expect(classifyDbError(err)).toBe('unavailable');
  });
});
