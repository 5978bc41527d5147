--! Previous: sha1:60396d748bb359b5d5922f1ad05c5f462c4e2133
--! Hash: sha1:b31c7c2bb5172c4dc8fcf775774a1ac7426a5977
--! Message: agents without a unique index

-- No unique index on agents.id (issue 12, item 5). An update that adds an entry to a unique index first looks at
-- every entry of the same key, and each of them is a version of the same agent: with an old snapshot pinning the
-- horizon, taking or freeing a slot read one buffer per version the agent had since (20 agents and 20,000 rooms
-- served: 2,000 buffers, 0.7 ms, twice per room). The lookups by id read agents_newest (migration 12); the id
-- stays unique through a trigger (allocator.agents_unique_id) that checks inserts under a lock on the id. The
-- membership table keeps its rows for present agents by the roster pull that writes both, and loses them with the
-- agent (allocator.agents_in_history), as the foreign key's cascade did.
alter table allocator.agent_divisions drop constraint agent_divisions_agent_id_fkey;
-- stats_agents_today grouped by the primary key alone; db/code creates it again, grouped by its columns.
drop view if exists allocator.stats_agents_today;
alter table allocator.agents drop constraint agents_pkey;
