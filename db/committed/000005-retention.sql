--! Previous: sha1:ab07c0f70857a21375326f39f3eceb2a8b68d56b
--! Hash: sha1:a66a465a70d030ec57268d5094d1a39b9b37240e
--! Message: retention

--------------------------------------------------------------------------------------------------------------------
-- History that does not grow forever (db/code/12-retention.sql): finished sessions found by when they ended.
--------------------------------------------------------------------------------------------------------------------

create index sessions_ended on allocator.sessions ((coalesce(resolved_at, failed_at, cancelled_at)))
  where state in ('resolved', 'failed', 'cancelled');
