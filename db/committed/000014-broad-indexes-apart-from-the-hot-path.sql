--! Previous: sha1:fc183130e878e31fa18e2d7fdd5f2dfc825e2df1
--! Hash: sha1:60396d748bb359b5d5922f1ad05c5f462c4e2133
--! Message: broad indexes apart from the hot path

-- Broad indexes apart from the hot path (issue 12, item 5). Three indexes listed every waiting or open room:
-- sessions_queue and sessions_waiting_since (state = 'waiting') and the unique sessions_one_open_per_room (state in
-- waiting, reserved, assigned). Every statement of the hot path that says state = 'waiting' could read one of them
-- from end to end, and planned on few rows (a quiet queue: the statistics count live rows only) the planner found
-- that as cheap as the index that serves the statement exactly. Under an old snapshot they hold an entry for every
-- room that ever waited: overflow_due, reserve_held and the batch's rooms read 100-1,200 buffers per reservation
-- with 1,000-20,000 rooms served. Their predicates now use two stored generated columns, the same facts under
-- other names, which the views, the dashboard and the constraint use and the hot path never does; fresh rooms
-- (never reserved, no priority: the queue head's part) get an index of their own.
alter table allocator.sessions
  add column in_queue boolean generated always as (state = 'waiting') stored,
  add column open boolean generated always as (state in ('waiting', 'reserved', 'assigned')) stored;
comment on column allocator.sessions.in_queue is 'state = ''waiting'', under its own name for the views and the '
  'dashboard (sessions_queue, sessions_waiting_since); the hot path says state = ''waiting'' and reads the index '
  'made for each of its statements.';
comment on column allocator.sessions.open is 'state is waiting, reserved or assigned: at most one such session per '
  'room (sessions_one_open_per_room). A name of its own for the reason in_queue has one.';

drop index allocator.sessions_queue;
create index sessions_queue on allocator.sessions (priority desc, queued_at, id) where in_queue;
drop index allocator.sessions_waiting_since;
create index sessions_waiting_since on allocator.sessions (queued_at) where in_queue;
drop index allocator.sessions_one_open_per_room;
create unique index sessions_one_open_per_room on allocator.sessions (room_id) where open;

-- Fresh rooms in queue order from the queue head: room_due, rooms_due, advance_queue_head.
create index sessions_fresh on allocator.sessions (queued_at, id)
  where state = 'waiting' and priority = 0 and reserved_at is null;
