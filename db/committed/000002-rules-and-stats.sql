--! Previous: sha1:d653da38a9f392c7012ba97f44efa8340f719014
--! Hash: sha1:bc0d1075638c4eccc790c2bec7a892fedab68279
--! AllowInvalidHash
--! Message: rules and stats

--------------------------------------------------------------------------------------------------------------------
-- Tables and indexes for the rules and the statistics views. (As released, this migration also defined their
-- functions, views and triggers; they live in db/code now: see the note atop migration 1.)
--------------------------------------------------------------------------------------------------------------------
--------------------------------------------------------------------------------------------------------------------
-- Priority by channel source: rooms from a higher-priority source are served first, then in arrival order.
--------------------------------------------------------------------------------------------------------------------

create table allocator.source_priority (
  source   text primary key,           -- Qiscus channel source as sent in the webhook: qiscus, wa, line, fb, ...
  priority integer not null default 0  -- higher is served first; sources not listed have 0
);
comment on table allocator.source_priority is 'Higher priority sources are served first. A change re-orders the rooms '
  'already waiting at once.';

--------------------------------------------------------------------------------------------------------------------
-- Maximum waiting time: a room waiting longer leaves the queue as cancelled, with the reason. The customer's next
-- message (the allocation webhook again) queues the room afresh.
--------------------------------------------------------------------------------------------------------------------

insert into allocator.settings (key, value, description) values
  ('max_wait_seconds', '0', 'a room waiting longer is cancelled (0: no limit)');

create index sessions_waiting_since on allocator.sessions (queued_at) where state = 'waiting';

--------------------------------------------------------------------------------------------------------------------
-- Statistics for psql. Live views read only the open rows (partial indexes); history views read recent windows
-- through timestamp indexes, so they stay cheap with millions of past sessions.
--------------------------------------------------------------------------------------------------------------------

create index sessions_assigned_at on allocator.sessions (assigned_at) where assigned_at is not null;
create index attempts_finished_at on allocator.attempts (finished_at) where finished_at is not null;
