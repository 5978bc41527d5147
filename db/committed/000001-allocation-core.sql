--! Previous: -
--! Hash: sha1:d653da38a9f392c7012ba97f44efa8340f719014
--! AllowInvalidHash
--! Message: allocation core

--------------------------------------------------------------------------------------------------------------------
-- The allocation core: its tables, indexes and first data. (As released, this migration also defined the
-- functions, views and triggers; they live in db/code now, one file per concern, and `npm run migrate` applies
-- them after the migrations. This file was edited to hold the schema alone, hence AllowInvalidHash: a database
-- that ran the released text has the same tables and indexes, and gets its functions from db/code too.)
--------------------------------------------------------------------------------------------------------------------

create schema allocator;
comment on schema allocator is 'Qiscus agent allocator: queue, agents and the functions that assign rooms.';

--------------------------------------------------------------------------------------------------------------------
-- Settings
--------------------------------------------------------------------------------------------------------------------

create table allocator.settings (
  key         text primary key,
  value       text not null,
  description text
);
comment on table allocator.settings is 'Tunables, read on every call: an UPDATE here applies to the next reservation.';

insert into allocator.settings (key, value, description) values
  ('default_max_load',   '2',  'rooms an agent may hold at once unless agents.max_load says otherwise'),
  ('lease_seconds',      '60', 'how long a reservation may stay unconfirmed before rescue_expired() puts it back'),
  ('retry_base_seconds', '2',  'first backoff after a transient failure; doubles per attempt'),
  ('retry_max_seconds',  '300','cap of the backoff'),
  ('max_attempts',       '8',  'reservations of one session before it ends as failed');

--------------------------------------------------------------------------------------------------------------------
-- Agents
--------------------------------------------------------------------------------------------------------------------

create table allocator.agents (
  id               bigint primary key,                    -- Qiscus agent id
  name             text not null default '',
  email            text,
  type             text not null default 'agent',         -- Qiscus type_as_string; only 'agent' serves rooms
  is_available     boolean not null default true,         -- Qiscus is_available
  force_offline    boolean not null default false,        -- Qiscus force_offline
  present          boolean not null default true,         -- false once the agent vanished from Qiscus's roster
  paused           boolean not null default false,        -- a DBA's pause, without touching Qiscus
  max_load         integer check (max_load >= 0),         -- null: settings.default_max_load
  load             integer not null default 0 check (load >= 0),          -- rooms we reserved or assigned, open
  external_load    integer not null default 0 check (external_load >= 0), -- rooms Qiscus shows that we did not assign
  external_seen    integer not null default 0,            -- external count computed by the last sync (see sync_agents)
  external_hold_until timestamptz,                        -- external_load may not fall before a pull started after this
  qiscus_load      integer,                               -- Qiscus current_customer_count at the last sync
  last_assigned_at timestamptz,                           -- tie-break: longest idle agent first
  synced_at        timestamptz,
  created_at       timestamptz not null default now()
);
comment on column allocator.agents.load is
  'Rooms this service holds open for the agent (reserved + assigned + waiting with holds_slot). Changed only by '
  'the allocator functions; '
  'a trigger refuses any increase beyond capacity.';
comment on column allocator.agents.external_load is
  'Rooms Qiscus shows the agent holding that we did not assign (assigned by hand), from the last roster sync.';

-- Walking online agents from the least loaded one makes agent_preference() an index scan, however many agents
-- there are.
create index agents_online_by_load on allocator.agents ((load + external_load), last_assigned_at nulls first, id)
  where type = 'agent' and present and is_available and not force_offline and not paused;

-- The largest capacity any agent has: the default or the biggest per-agent max_load (one probe of agents_max_load).
create index agents_max_load on allocator.agents (max_load) where max_load is not null;

--------------------------------------------------------------------------------------------------------------------
-- Webhooks, sessions, attempts
--------------------------------------------------------------------------------------------------------------------

create table allocator.webhooks (
  id          bigint generated always as identity primary key,
  kind        text not null check (kind in ('new_request', 'close_request')),
  room_id     text not null,
  received_at timestamptz not null default now(),
  request_id  text,                  -- the HTTP request id, to follow one webhook from the log to this row
  outcome     text not null,         -- what applying it did: queued, already_queued, resolved, unknown_room, ...
  session_id  bigint,
  payload     jsonb not null         -- exactly what Qiscus sent
);
comment on table allocator.webhooks is 'Every accepted webhook, raw, with what it did. Written in the same transaction '
  'as its effect, so a webhook is either here and applied, or was never acknowledged.';
create index webhooks_room on allocator.webhooks (room_id, id);
create index webhooks_received_at on allocator.webhooks (received_at);

create type allocator.session_state as enum ('waiting', 'reserved', 'assigned', 'resolved', 'failed', 'cancelled');

create table allocator.sessions (
  id               bigint generated always as identity primary key,
  room_id          text not null,
  state            allocator.session_state not null default 'waiting',
  source           text,                     -- Qiscus channel source (qiscus, wa, line, ...)
  priority         integer not null default 0,       -- higher first; equal priority in arrival order
  prior_service_id bigint,                   -- latest_service.id of the opening webhook: tells a repeat from a new session
  service_id       bigint,                   -- Qiscus service id, from the assign answer or the resolution
  agent_id         bigint references allocator.agents (id),  -- reserved/assigned agent; kept afterwards as history
  attempt_id       bigint,                   -- the current reservation (attempts.id) while reserved
  attempts         integer not null default 0,       -- reservations made so far
  excluded_agents  bigint[] not null default '{}',   -- agents Qiscus refused for this room: never tried again
  holds_slot       boolean not null default false, -- waiting, but still counted on agent_id: see requeue()
  uncertain        boolean not null default false, -- a call for agent_id may have reached Qiscus: see requeue()
  last_agent_id    bigint,                   -- agent of the last failed try: preferred for the retry
  last_error       text,
  next_attempt_at  timestamptz not null default now(),   -- backoff: not reserved before this
  lease_expires_at timestamptz,              -- while reserved: rescue_expired() puts it back after this
  queued_at        timestamptz not null default now(),   -- arrival: the queue order, kept across retries
  reserved_at      timestamptz,
  assigned_at      timestamptz,
  resolved_at      timestamptz,
  failed_at        timestamptz,
  cancelled_at     timestamptz,
  updated_at       timestamptz not null default now(),
  constraint reserved_has_lease check (state <> 'reserved' or (agent_id is not null and attempt_id is not null
                                                                 and lease_expires_at is not null)),
  constraint assigned_has_agent check (state <> 'assigned' or agent_id is not null),
  constraint hold_is_waiting check (not holds_slot or (state = 'waiting' and agent_id is not null))
);
comment on table allocator.sessions is 'One row per customer session in a room. A room has at most one open session '
  '(waiting, reserved or assigned); a returning customer opens a new one.';

-- At most one open session per room: repeated allocation webhooks cannot queue a room twice.
create unique index sessions_one_open_per_room on allocator.sessions (room_id)
  where state in ('waiting', 'reserved', 'assigned');
create index sessions_room on allocator.sessions (room_id, id);
-- The queue, in the order it is served.
create index sessions_queue on allocator.sessions (priority desc, queued_at, id) where state = 'waiting';
-- "Is anything due at all?" in one probe.
create index sessions_due on allocator.sessions (next_attempt_at) where state = 'waiting';
-- Rescue of expired leases (reserved rooms, and rooms resolved while their call was in flight).
create index sessions_leases on allocator.sessions (lease_expires_at) where lease_expires_at is not null;
-- Rooms holding a slot after an ambiguous failure: retried first, with their agent.
create index sessions_held on allocator.sessions (next_attempt_at) where state = 'waiting' and holds_slot;
-- Open rooms per agent (load checks, roster sync).
create index sessions_open_by_agent on allocator.sessions (agent_id) where state in ('reserved', 'assigned');

create table allocator.attempts (
  id               bigint generated always as identity primary key,
  session_id       bigint not null references allocator.sessions (id) on delete cascade,
  agent_id         bigint not null references allocator.agents (id),
  number           integer not null,         -- 1 for the session's first reservation, 2 for the next, ...
  reserved_at      timestamptz not null default now(),
  finished_at      timestamptz,
  outcome          text check (outcome in ('assigned', 'transient', 'refused', 'expired', 'released', 'resolved', 'stale')),
  error            text
);
comment on table allocator.attempts is 'One row per reservation of a room for an agent, and how it ended.';
create index attempts_session on allocator.attempts (session_id);
