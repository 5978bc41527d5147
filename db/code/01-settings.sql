--------------------------------------------------------------------------------------------------------------------
-- Settings: tunables a DBA may change at any time (read on every call, so a change applies at once).
-- Each default is written once, in setting_defaults(); the rows of allocator.settings are seeded from it, and each
-- setting has one typed accessor that falls back to it when the row is missing or unparsable (a DBA's typo cannot
-- stop allocation).
--------------------------------------------------------------------------------------------------------------------

create function allocator.setting_defaults()
returns table (key text, value text, description text)
language sql immutable
as $$
  values
    ('default_max_load',   '2',   'rooms an agent may hold at once unless agents.max_load says otherwise'),
    ('lease_seconds',      '30',  'how long a reservation may stay unconfirmed, its listener alive, before '
                                  'rescue_expired() puts it back (a dead listener''s are rescued at once)'),
    ('retry_base_seconds', '2',   'first backoff after a transient failure; doubles per attempt'),
    ('retry_max_seconds',  '300', 'cap of the backoff'),
    ('max_attempts',       '8',   'reservations of one session before it ends as failed'),
    ('max_wait_seconds',   '0',   'a room waiting longer is cancelled (0: no limit)'),
    ('outage_failures',    '5',   'this many transient failures in a row, of at least two rooms, mean Qiscus is down'),
    ('probe_seconds',      '1',   'while Qiscus is down, one assign call goes out per this many seconds'),
    ('retention_days',     '30',  'finished sessions, their attempts and old webhooks are deleted after this many '
                                  'days (0: keep everything)')
$$;

-- New settings appear with their defaults; a value a DBA set is never overwritten.
insert into allocator.settings (key, value, description)
select d.key, d.value, d.description from allocator.setting_defaults() d
on conflict (key) do update set description = excluded.description
  where settings.description is distinct from excluded.description;

-- The value of a numeric setting: the row if it parses, else its default.
-- (PL/pgSQL, not SQL: a SQL function that is not inlined is planned again in every statement that calls it, which
-- cost each statement of a reservation about 0.15 ms; PL/pgSQL keeps its plan for the session.)
create function allocator.setting(setting_key text)
returns numeric
language plpgsql stable
as $$
begin
  return coalesce(
    (select case when s.value ~ '^\s*-?\d{1,9}(\.\d{1,6})?\s*$' then s.value::numeric end
       from allocator.settings s where s.key = setting_key),
    (select d.value::numeric from allocator.setting_defaults() d where d.key = setting_key));
end;
$$;

-- One typed accessor per setting.
create function allocator.default_max_load() returns integer language sql stable
as $$ select floor(greatest(allocator.setting('default_max_load'), 0))::integer $$;

create function allocator.lease() returns interval language sql stable
as $$ select make_interval(secs => greatest(allocator.setting('lease_seconds'), 0)) $$;

create function allocator.retry_base_seconds() returns numeric language sql stable
as $$ select greatest(allocator.setting('retry_base_seconds'), 0) $$;

create function allocator.retry_max_seconds() returns numeric language sql stable
as $$ select greatest(allocator.setting('retry_max_seconds'), 0) $$;

create function allocator.max_attempts() returns integer language sql stable
as $$ select floor(allocator.setting('max_attempts'))::integer $$;

create function allocator.outage_failures() returns integer language sql stable
as $$ select greatest(floor(allocator.setting('outage_failures')), 2)::integer $$;

create function allocator.probe_interval() returns interval language sql stable
as $$ select make_interval(secs => greatest(allocator.setting('probe_seconds'), 0.05)) $$;

-- 0 or less: keep everything
create function allocator.retention() returns interval language sql stable
as $$ select make_interval(days => greatest(floor(allocator.setting('retention_days')), 0)::integer) $$;

-- 0 or less: no limit
create function allocator.max_wait() returns interval language sql stable
as $$ select make_interval(secs => greatest(allocator.setting('max_wait_seconds'), 0)) $$;

create trigger notify_settings
  after insert or update or delete on allocator.settings
  for each statement
  execute function allocator.notify('settings');
