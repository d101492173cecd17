"""Rewrites of the saga log that stand for what a database crash can leave."""

from __future__ import annotations

# What a PostgreSQL crash that lost the saga's last lazy saves leaves: the
# steps from ``$2`` on show pending again and nothing says the saga finished.
# Past its deadline and without a lease, the next recovery pass claims it.
LOSE_SAVES = (
    "UPDATE sagas SET state = 'RUNNING', direction = 'forward', current_step = $2::integer,"
    " attempts = 0, finished_at = NULL, lease_owner = NULL, lease_expires = NULL,"
    " next_attempt_at = now(), deadline = now() - interval '1 second',"
    " steps = (SELECT jsonb_agg(CASE WHEN n > $2::integer"
    "          THEN jsonb_set(s, '{state}', '\"pending\"') ELSE s END ORDER BY n)"
    "          FROM jsonb_array_elements(steps) WITH ORDINALITY AS t(s, n))"
    " WHERE gid = $1 AND state = 'COMPLETED' RETURNING gid"
)
