--! Previous: sha1:bc0d1075638c4eccc790c2bec7a892fedab68279
--! Hash: sha1:7d78aaf63301324380df790c36a73ae8a5f763cb
--! Message: code in files, named agent predicates, liveness

--------------------------------------------------------------------------------------------------------------------
-- From this migration on, the committed migrations hold only the schema (tables, columns, indexes, data). Every
-- function, view and trigger lives in db/code/*.sql, which `npm run migrate` applies after the migrations (see
-- src/db/migrate.ts); the definitions in migrations 1 and 2 are history, replaced by those files.
--------------------------------------------------------------------------------------------------------------------

-- What db/code/*.sql was last applied: the migrate step skips the files when their hash is unchanged.
create table allocator.code_version (
  singleton      boolean primary key default true check (singleton),
  hash           text not null,
  applied_at     timestamptz not null default now(),
  -- md5 of agent_preference() as we shipped it: a different definition at the next apply is a DBA's own rule,
  -- which the apply keeps.
  preference_md5 text
);
comment on table allocator.code_version is 'The db/code files applied last (hash), so that a migrate with the same files changes nothing.';

-- Rooms we hold for an agent: `our_load`, beside `external_load` (assigned by hand in Qiscus). The total is what
-- capacity bounds.
alter table allocator.agents rename column load to our_load;

-- The agent predicates, named once. `online`: Qiscus may assign it rooms at all. `accepting`: online and not paused
-- by a DBA, so it may be given new rooms (a paused agent still gets the retry of a room whose slot it holds).
alter table allocator.agents
  add column online boolean generated always as
    (type = 'agent' and present and is_available and not force_offline) stored,
  add column accepting boolean generated always as
    (type = 'agent' and present and is_available and not force_offline and not paused) stored,
  add column total_load integer generated always as (our_load + external_load) stored;
comment on column allocator.agents.online is 'Qiscus may assign rooms to this agent: type agent, listed, available, not forced offline.';
comment on column allocator.agents.accepting is 'online and not paused: may be given new rooms.';
comment on column allocator.agents.total_load is 'our_load + external_load: the rooms the agent holds, which capacity bounds.';

drop index allocator.agents_online_by_load;
create index agents_accepting_by_load on allocator.agents (total_load, last_assigned_at nulls first, id)
  where accepting;

comment on column allocator.agents.external_hold_until is
  'external_load includes a room whose assign call may have landed: no pull that started before this time (when '
  'the call ended) may lower it (see allocator.external_after_pull).';
comment on column allocator.agents.external_seen is 'Rooms assigned by hand as the last pull found them.';

--------------------------------------------------------------------------------------------------------------------
-- Liveness (see db/code/06-rescue.sql and 09-qiscus-health.sql)
--------------------------------------------------------------------------------------------------------------------

-- Listener instances. A listener takes an id from this sequence and holds the session-level advisory lock
-- (1365, id) on a connection of its own for as long as it lives: PostgreSQL releases it the moment that
-- connection dies, so anyone can tell a dead listener's reservations without waiting for their lease.
create sequence allocator.listener_ids as integer cycle;
alter table allocator.sessions add column owner integer;
comment on column allocator.sessions.owner is 'While reserved (or resolved with its call in flight): the listener '
  'instance making the call (see allocator.listener_alive).';

-- The reservation was abandoned: its listener died with the call in flight.
alter table allocator.attempts drop constraint attempts_outcome_check;
alter table allocator.attempts add constraint attempts_outcome_check
  check (outcome in ('assigned', 'transient', 'refused', 'expired', 'released', 'resolved', 'stale', 'abandoned'));

-- Is Qiscus answering at all? One row. While down_since is set, rooms do not spend attempts and only one call a
-- probe interval goes out (see allocator.reserve).
create table allocator.qiscus_health (
  singleton  boolean primary key default true check (singleton),
  down_since timestamptz,            -- null: up
  probe_at   timestamptz,            -- while down: the next call may go out at this time
  calls_while_down integer not null default 0,
  changed_at timestamptz not null default now()
);
insert into allocator.qiscus_health default values;
comment on table allocator.qiscus_health is 'Whether Qiscus fails every call (an outage): then rooms wait without '
  'spending attempts and Qiscus is probed once per probe interval.';

-- The lease is only for a listener that hangs while connected (a dead one is seen at once): 30 s is above the
-- Qiscus call's own bound (3 s connect + 10 s answer) with room to report. Changed only where still the default.
update allocator.settings set value = '30' where key = 'lease_seconds' and value = '60';
