//! [`Admin`](crate::store::admin::Admin) for [`PostgresStore`]: one statement
//! per operation, judged by the database clock like the store's own.

use super::PostgresStore;
use crate::store::sql::admin::{sql_admin, AdminSql};

impl PostgresStore {
    fn admin_sql(&self) -> AdminSql {
        let t = &self.sql.table;
        let status = "CASE WHEN octet_length(fingerprint) <> 32 THEN 'corrupt'
                  WHEN state = 'processing' THEN CASE WHEN expires_at > clock_timestamp() THEN 'running' ELSE 'lapsed' END
                  WHEN state = 'completed' THEN CASE WHEN expires_at > clock_timestamp() THEN 'completed' ELSE 'expired' END
                  WHEN coalesce(steps_until > clock_timestamp(), false) THEN 'released' ELSE 'expired' END";
        let columns = format!(
            "key, {status}, token, fingerprint,
             CASE WHEN state = 'completed' THEN octet_length(outcome)::bigint END,
             greatest((extract(epoch FROM (CASE WHEN state = 'released'
                                                THEN coalesce(steps_until, clock_timestamp())
                                                ELSE expires_at END) - clock_timestamp()) * 1000)::bigint, 0),
             CASE WHEN state <> 'completed' AND steps_until > clock_timestamp() THEN steps::text END"
        );
        // A tombstone that keeps the token (the sequence never repeats one
        // anyway), deciding no claim.
        let end = format!(
            "UPDATE {t} SET state = 'released', outcome = NULL, steps = NULL, steps_until = NULL,
                    expires_at = clock_timestamp(), updated_at = clock_timestamp()
              WHERE key = $1 AND token = $2"
        );
        AdminSql {
            inspect: format!("SELECT {columns} FROM {t} WHERE key = $1"),
            list: format!(
                "SELECT {columns} FROM {t}
                  WHERE ($1::text IS NULL OR (left(key, char_length($1) + 1) = $1 || ':'
                                              AND char_length(key) = char_length($1) + 65))
                    AND ($4::text IS NULL OR (char_length(key) > 65 AND right(key, 65) = ':' || $4))
                    AND (NOT $2 OR (state = 'processing' AND expires_at <= clock_timestamp()))
                  ORDER BY key LIMIT $3"
            ),
            stats: format!(
                "SELECT left(key, greatest(char_length(key) - 65, 0)), {status}, count(*)
                   FROM {t} GROUP BY 1, 2"
            ),
            invalidate: format!("{end} AND state = 'completed'"),
            forget: format!("{end} AND state IN ('processing', 'released')"),
        }
    }
}

sql_admin!(PostgresStore);
