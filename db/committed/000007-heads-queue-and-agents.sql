--! Previous: sha1:beba0608e54996a43f0c7fd560e723fd717d0ac7
--! Hash: sha1:c0b3652cc5f1bbbb5a48626e495a6b1d14648ed9
--! Message: heads: queue and agents

--------------------------------------------------------------------------------------------------------------------
-- Heads (issue 12: immune to a pinned horizon). While an old snapshot lives (a DBA's open transaction, a replica
-- with hot_standby_feedback), the index entries of every row version changed since cannot be cleaned, and a scan
-- from the start of an index walks them all: the cost of the next room grew with the rooms already served. The
-- two hot scans now start from a head, a position kept outside MVCC in a sequence, before which no live entry lies
-- (db/code/00-basics.sql, "Heads"):
--   the queue: fresh rooms (never reserved, priority 0: nearly all of them) from the queue head on; the rest
--     (retries at their original place, rooms with a priority) through an index of their own, small;
--   the agents, in the order of agent_preference(), from the agent head on.
--------------------------------------------------------------------------------------------------------------------

-- Microseconds since the epoch: no fresh room waits with queued_at before it.
create sequence allocator.queue_head minvalue 0 start 0;
comment on sequence allocator.queue_head is 'No fresh room (never reserved, priority 0) waits with queued_at before '
  'this (microseconds since the epoch). See "Heads" in db/code/00-basics.sql.';

-- (total_load, microseconds since 2020 of last_assigned_at) packed in one number (allocator.agent_position): no
-- agent that may take a room comes before it in agent_preference()'s order.
create sequence allocator.agent_head minvalue 0 start 0;
comment on sequence allocator.agent_head is 'No agent that may take a room comes before this position in the order '
  'of agent_preference() (see allocator.agent_position). See "Heads" in db/code/00-basics.sql.';

-- The rest of the queue: rooms reserved before (retries keep their place), and rooms with a priority.
create index sessions_queue_rest on allocator.sessions (priority desc, queued_at, id)
  where state = 'waiting' and (reserved_at is not null or priority <> 0);

-- "Is anything due?" for the rest only: a fresh room is due from the moment it is queued.
drop index allocator.sessions_due;
create index sessions_due on allocator.sessions (next_attempt_at)
  where state = 'waiting' and (reserved_at is not null or priority <> 0);

-- agent_preference()'s order as one number (allocator.agent_position: total_load, then last_assigned_at to the
-- microsecond, never assigned first, by id), so that the agent head bounds the index scan. Written out, not as a
-- call: the functions of db/code are dropped and created again by every migrate, and an index on one would go too.
drop index allocator.agents_accepting_by_load;
create index agents_accepting_by_load on allocator.agents
  (((least(total_load, 4095)::bigint << 50)
    + case when last_assigned_at is null then least(greatest(id, 0), 562949953421311)
           else least(greatest(floor(extract(epoch from last_assigned_at - timestamptz '2020-01-01 00:00:00+00')
                                     * 1000000),
                               0),
                      1125899906842623)::bigint
      end),
   id)
  where accepting;
