--! Previous: sha1:7d78aaf63301324380df790c36a73ae8a5f763cb
--! Hash: sha1:dc0874e0f198723c7aee1a363bf836b93576ff95
--! Message: routing by division

--------------------------------------------------------------------------------------------------------------------
-- Routing by division (db/code/11-routing.sql): Qiscus's divisions and who is in each, pulled with the roster;
-- routes a DBA writes; and on each waiting room the divisions that may serve it.
--------------------------------------------------------------------------------------------------------------------

create table allocator.divisions (
  id        bigint primary key,          -- Qiscus division id
  name      text not null default '',
  synced_at timestamptz not null default now()
);
comment on table allocator.divisions is 'Qiscus divisions (teams), as the last complete roster pull found them.';

-- Who is in which division, as the last complete pull found it; the agents' own list is agents.division_ids.
create table allocator.agent_divisions (
  division_id bigint not null references allocator.divisions (id) on delete cascade,
  agent_id    bigint not null references allocator.agents (id) on delete cascade,
  primary key (division_id, agent_id)
);
create index agent_divisions_agent on allocator.agent_divisions (agent_id);

alter table allocator.agents add column division_ids bigint[] not null default '{}';
comment on column allocator.agents.division_ids is 'Divisions the agent is in (Qiscus), sorted; {} for none.';

create table allocator.routes (
  id               bigint generated always as identity primary key,
  source           text,                  -- the webhook's `source` exactly; null matches any
  channel_id       bigint,                -- the webhook's `channel.id`; null matches any (and rooms without channel)
  division_ids     bigint[] not null check (cardinality(division_ids) > 0),
  overflow_seconds integer check (overflow_seconds >= 0),  -- after this long since queued, any agent; null: never
  position         integer not null default 0
);
comment on table allocator.routes is 'Which divisions serve a room: the first route matching its source and channel '
  '(lowest position, then id) decides; no match: any agent. A change applies to waiting rooms at once.';

alter table allocator.sessions
  add column channel_id   bigint,         -- the webhook's channel.id, when it had one
  add column division_ids bigint[],       -- while waiting: the divisions that may serve it (null: any agent)
  add column overflow_at  timestamptz,    -- while waiting: from then on any agent may serve it (null: never)
  -- the one division, when division_ids names exactly one (most routes): a queue per division in one index
  add column division_key bigint generated always as
    (case when cardinality(division_ids) = 1 then division_ids[1] end) stored;

-- Overflows that fall due wake the listeners (next_due_at) and are applied (overflow_due).
create index sessions_overflow on allocator.sessions (overflow_at) where state = 'waiting' and overflow_at is not null;
-- An agent's next room is the oldest of: the first room for anyone (a queue of its own, so that routed rooms are
-- never walked over), the first room of each of its divisions (a queue per division), and the first room routed
-- to several divisions among them (few: found through a GIN index and sorted). An agent whose divisions have no
-- room waiting pays nothing for the rooms of others.
create index sessions_queue_any on allocator.sessions (priority desc, queued_at, id)
  where state = 'waiting' and division_ids is null;
create index sessions_queue_division on allocator.sessions (division_key, priority desc, queued_at, id)
  where state = 'waiting' and division_key is not null;
create index sessions_waiting_divisions on allocator.sessions using gin (division_ids)
  where state = 'waiting' and division_ids is not null and division_key is null;
