//! [`Admin`](crate::store::admin::Admin) for [`SqliteStore`]: one statement
//! per operation, judged by SQLite's clock like the store's own.

use super::{SqliteStore, NOW};
use crate::store::sql::admin::{sql_admin, AdminSql};

impl SqliteStore {
    fn admin_sql(&self) -> AdminSql {
        let t = &self.sql.table;
        // A row idem cannot read is `corrupt: why` (the status word, then
        // the problem), judged before its state.
        let status = format!(
            "CASE WHEN typeof(fingerprint) NOT IN ('blob', 'null') OR length(fingerprint) <> 32
                       THEN 'corrupt: the stored fingerprint is not 32 bytes'
                  WHEN typeof(token) <> 'integer' OR typeof(expires_at) <> 'integer'
                       OR typeof(steps_until) NOT IN ('integer', 'null')
                       THEN 'corrupt: a stored token or time is not an integer'
                  WHEN state <> 'completed' AND steps_until > {NOW} AND NOT json_valid(steps)
                       THEN 'corrupt: the kept steps are not JSON'
                  WHEN state = 'processing' THEN CASE WHEN expires_at > {NOW} THEN 'running' ELSE 'lapsed' END
                  WHEN state = 'completed' THEN CASE WHEN expires_at > {NOW} THEN 'completed' ELSE 'expired' END
                  WHEN coalesce(steps_until, 0) > {NOW} THEN 'released' ELSE 'expired' END"
        );
        let columns = format!(
            "CAST(key AS BLOB), {status}, token, fingerprint,
             CASE WHEN state = 'completed' THEN length(CAST(outcome AS BLOB)) END,
             max(CASE WHEN state = 'released' THEN coalesce(steps_until, 0) ELSE expires_at END - {NOW}, 0),
             CASE WHEN state <> 'completed' AND steps_until > {NOW} THEN steps END"
        );
        // A tombstone that keeps the token sequence, deciding no claim.
        let end = format!(
            "UPDATE {t} SET state = 'released', outcome = NULL, steps = NULL, steps_until = NULL,
                    expires_at = {NOW}, updated_at = {NOW}
              WHERE key = ?1 AND token = ?2"
        );
        AdminSql {
            inspect: format!("SELECT {columns} FROM {t} WHERE key = ?1"),
            list: format!(
                "SELECT {columns} FROM {t}
                  WHERE (?1 IS NULL OR (substr(key, 1, length(?1) + 1) = ?1 || ':'
                                        AND length(key) = length(?1) + 65))
                    AND (?4 IS NULL OR (length(key) > 65 AND substr(key, -65) = ':' || ?4))
                    AND (NOT ?2 OR (state = 'processing' AND expires_at <= {NOW} AND {status} = 'lapsed'))
                  ORDER BY key LIMIT ?3"
            ),
            stats: format!(
                "SELECT CAST(substr(key, 1, max(length(key) - 65, 0)) AS BLOB), {status}, count(*)
                   FROM {t} GROUP BY 1, 2"
            ),
            invalidate: format!("{end} AND state = 'completed'"),
            forget: format!("{end} AND state IN ('processing', 'released')"),
        }
    }
}

sql_admin!(SqliteStore);
