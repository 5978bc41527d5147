--! Previous: sha1:d8901548dca62bfab52cc81d11c9e94c2dcbe6b5
--! Hash: sha1:e663296562ebdac826b778fc0f99ad240a68ca94
--! Message: retention

--------------------------------------------------------------------------------------------------------------------
-- History that does not grow forever (db/code/12-retention.sql): finished sessions found by when they ended.
--------------------------------------------------------------------------------------------------------------------

create index sessions_ended on allocator.sessions ((coalesce(resolved_at, failed_at, cancelled_at)))
  where state in ('resolved', 'failed', 'cancelled');
