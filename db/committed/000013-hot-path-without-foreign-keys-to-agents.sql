--! Previous: sha1:c186b4fc0af2b728d66f5c7fa1556097d1084acf
--! Hash: sha1:fc183130e878e31fa18e2d7fdd5f2dfc825e2df1
--! Message: hot path without foreign keys to agents, ordered indexes for held and multi-division rooms

-- The hot path under an old snapshot, whatever the statistics (issue 12, item 5). While a snapshot pins the
-- horizon, a lookup that walks an index from the start, or every entry of one key, walks every version kept since.
-- Each statement of the hot path now has an index that serves it exactly, read in its order.

-- Checking a foreign key to agents looks the agent up by its primary key: every version of it an old snapshot
-- keeps (20 agents, 1,000 rooms served: 40 buffers, twice per reservation). The rows of the hot path (a session's
-- agent, an attempt's) name an agent the reservation has just locked, so the check can never fail there; what it
-- guarded, an agent deleted while history names it, is refused by a trigger on delete instead (agents_in_history,
-- db/code/02-agents.sql).
alter table allocator.sessions drop constraint sessions_agent_id_fkey;
alter table allocator.attempts drop constraint attempts_agent_id_fkey;

-- Held rooms in the order reserve_held reads them, so that its LIMIT 1 stops at the first.
drop index allocator.sessions_held;
create index sessions_held on allocator.sessions (next_attempt_at, id) where state = 'waiting' and holds_slot;

-- Rooms routed to several divisions (few), in queue order: a b-tree head_rooms reads in order, where the GIN index
-- needed a bitmap scan and a sort, and lost to a walk of every waiting room's entries when the plan was made on a
-- small table. The hot path runs without bitmap scans (see "Plans" in db/code/00-basics.sql).
drop index allocator.sessions_waiting_divisions;
create index sessions_queue_several on allocator.sessions (priority desc, queued_at, id)
  where state = 'waiting' and division_ids is not null and division_key is null;
