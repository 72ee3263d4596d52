//! [`Admin`](crate::store::admin::Admin) for [`PostgresStore`]: one statement
//! per operation, judged by the database clock like the store's own.

use super::PostgresStore;
use crate::store::sql::admin::{sql_admin, AdminSql};

impl PostgresStore {
    fn admin_sql(&self) -> AdminSql {
        let t = &self.sql.table;
        // A row idem cannot read is `corrupt: why` (the status word, then
        // the problem), judged before its state.
        let status = "CASE WHEN octet_length(fingerprint) <> 32
                       THEN 'corrupt: the stored fingerprint is not 32 bytes'
                  WHEN NOT isfinite(expires_at) OR NOT coalesce(isfinite(steps_until), true)
                       THEN 'corrupt: a stored time is infinite'
                  WHEN state = 'processing' THEN CASE WHEN expires_at > clock_timestamp() THEN 'running' ELSE 'lapsed' END
                  WHEN state = 'completed' THEN CASE WHEN expires_at > clock_timestamp() THEN 'completed' ELSE 'expired' END
                  WHEN coalesce(steps_until > clock_timestamp(), false) THEN 'released' ELSE 'expired' END";
        // The time left is read of finite times only (an infinite one is
        // corrupt above, and would fail the statement here).
        let until = "CASE WHEN state = 'released' THEN coalesce(steps_until, clock_timestamp()) ELSE expires_at END";
        let columns = format!(
            "convert_to(key, 'UTF8'), {status}, token, fingerprint,
             CASE WHEN state = 'completed' THEN octet_length(outcome)::bigint END,
             CASE WHEN isfinite({until})
                  THEN greatest((extract(epoch FROM ({until}) - clock_timestamp()) * 1000)::bigint, 0)
                  ELSE 0 END,
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
                    AND (NOT $2 OR (state = 'processing' AND expires_at <= clock_timestamp()
                                    AND {status} = 'lapsed'))
                  ORDER BY key LIMIT $3"
            ),
            stats: format!(
                "SELECT convert_to(left(key, greatest(char_length(key) - 65, 0)), 'UTF8'), {status}, count(*)
                   FROM {t} GROUP BY 1, 2"
            ),
            invalidate: format!("{end} AND state = 'completed'"),
            forget: format!("{end} AND state IN ('processing', 'released')"),
        }
    }
}

sql_admin!(PostgresStore);
