--! Previous: sha1:dc0874e0f198723c7aee1a363bf836b93576ff95
--! Hash: sha1:852409a04a10a9dcb3d7f8c565ca18217f8da557
--! Message: retention

--------------------------------------------------------------------------------------------------------------------
-- History that does not grow forever (db/code/12-retention.sql): finished sessions found by when they ended.
--------------------------------------------------------------------------------------------------------------------

create index sessions_ended on allocator.sessions ((coalesce(resolved_at, failed_at, cancelled_at)))
  where state in ('resolved', 'failed', 'cancelled');
