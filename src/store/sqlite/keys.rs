//! Idempotency keys on SQLite: the same claim decision as Postgres in one
//! `BEGIN IMMEDIATE` transaction, completion fenced on the holder, release.

use super::*;

pub(super) type Query<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>;

/// Binds the four columns that identify a key: principal, method, route, key.
pub(super) fn bind_key<'q>(query: Query<'q>, scope: &'q KeyScope, key: &'q str) -> Query<'q> {
    query
        .bind(scope.principal.as_str())
        .bind(scope.method)
        .bind(scope.route)
        .bind(key)
}

pub(super) const KEY_WHERE: &str = "principal = ? AND method = ? AND route = ? AND key = ?";

impl SqliteStore {
    /// Marks the key completed inside `tx`, only if `lease` still holds it.
    pub(super) async fn complete_key_in(
        tx: &mut Transaction<'_, Sqlite>,
        lease: &KeyLease,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        let sql = format!(
            "UPDATE idempotency_keys
                SET state = 'completed', response_status = ?, response_body = ?,
                    lease_expires_at = NULL
              WHERE {KEY_WHERE} AND holder = ? AND state = 'in_progress'"
        );
        let done = bind_key(
            sqlx::query(AssertSqlSafe(sql))
                .bind(i64::from(response.status))
                .bind(response.body.as_str()),
            &lease.scope,
            lease.key.as_str(),
        )
        .bind(lease.holder.to_string())
        .execute(&mut **tx)
        .await?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(StoreError::LeaseLost)
        }
    }

    /// A write transaction for a business write: if the request carries a
    /// key, it must still hold the key's lease (else `LeaseLost`).
    pub(super) async fn write_holding(
        &self,
        lease: Option<&KeyLease>,
    ) -> Result<Transaction<'static, Sqlite>, StoreError> {
        let mut tx = self.write().await?;
        if let Some(lease) = lease {
            if !Self::holds(&mut tx, lease).await? {
                return Err(StoreError::LeaseLost);
            }
        }
        Ok(tx)
    }

    /// Whether `lease` still holds its key, inside `tx`.
    pub(super) async fn holds(
        tx: &mut Transaction<'_, Sqlite>,
        lease: &KeyLease,
    ) -> Result<bool, StoreError> {
        let sql = format!(
            "SELECT 1 FROM idempotency_keys WHERE {KEY_WHERE} AND holder = ? AND state = 'in_progress'"
        );
        let row = bind_key(
            sqlx::query(AssertSqlSafe(sql)),
            &lease.scope,
            lease.key.as_str(),
        )
        .bind(lease.holder.to_string())
        .fetch_optional(&mut **tx)
        .await?;
        Ok(row.is_some())
    }
}

#[async_trait]
impl KeyStore for SqliteStore {
    #[instrument(skip_all)]
    async fn claim_key(&self, claim: &KeyClaimRequest) -> Result<KeyClaim, StoreError> {
        let holder = Uuid::new_v4();
        let mut tx = self.write().await?;
        let now = now_us();
        let created = bind_key(
            sqlx::query(
                "INSERT INTO idempotency_keys
                    (principal, method, route, key, fingerprint, state, holder,
                     lease_expires_at, created_at, expires_at)
                 VALUES (?, ?, ?, ?, ?, 'in_progress', ?, ?, ?, ?)
                 ON CONFLICT (principal, method, route, key) DO NOTHING
                 RETURNING holder",
            ),
            &claim.scope,
            claim.key.as_str(),
        )
        .bind(&claim.fingerprint.0[..])
        .bind(holder.to_string())
        .bind(now + us(claim.lease))
        .bind(now)
        .bind(now + us(claim.ttl))
        .fetch_optional(&mut *tx)
        .await?;
        if created.is_some() {
            tx.commit().await?;
            return Ok(KeyClaim::New(claim.lease_to(holder)));
        }
        let sql = format!(
            "SELECT fingerprint, state, response_status, response_body, expires_at,
                    lease_expires_at
               FROM idempotency_keys WHERE {KEY_WHERE}"
        );
        let row = bind_key(
            sqlx::query(AssertSqlSafe(sql)),
            &claim.scope,
            claim.key.as_str(),
        )
        .fetch_one(&mut *tx)
        .await?;
        let expires_at = row.try_get::<i64, _>("expires_at")?;
        let taken = TakenKey {
            fingerprint: row.try_get("fingerprint")?,
            completed: completed_response(&row)?,
            expired: expires_at < now,
            lease_lapsed: row
                .try_get::<Option<i64>, _>("lease_expires_at")?
                .is_some_and(|t| t < now),
            remaining: Duration::from_micros(u64::try_from(expires_at - now).unwrap_or(0)),
        };
        if let TakenKeyDecision::Answer(answer) = decide_taken_key(taken, &claim.fingerprint) {
            tx.commit().await?;
            return Ok(answer);
        }
        // An expired key starts afresh; a lapsed lease (its holder
        // crashed) passes to this request. This transaction holds the
        // write lock, so nobody takes it over in between.
        let sql = format!(
            "UPDATE idempotency_keys
                SET fingerprint = ?, state = 'in_progress', holder = ?, lease_expires_at = ?,
                    response_status = NULL, response_body = NULL, created_at = ?,
                    expires_at = ?
              WHERE {KEY_WHERE}"
        );
        let query = sqlx::query(AssertSqlSafe(sql))
            .bind(&claim.fingerprint.0[..])
            .bind(holder.to_string())
            .bind(now + us(claim.lease))
            .bind(now)
            .bind(now + us(claim.ttl));
        bind_key(query, &claim.scope, claim.key.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(KeyClaim::New(claim.lease_to(holder)))
    }

    #[instrument(skip_all)]
    async fn complete_key(
        &self,
        lease: &KeyLease,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        Self::complete_key_in(&mut tx, lease, response).await?;
        tx.commit().await?;
        Ok(())
    }

    #[instrument(skip_all)]
    async fn release_key(&self, lease: &KeyLease) -> Result<(), StoreError> {
        let sql = format!(
            "DELETE FROM idempotency_keys WHERE {KEY_WHERE} AND holder = ? AND state = 'in_progress'"
        );
        bind_key(
            sqlx::query(AssertSqlSafe(sql)),
            &lease.scope,
            lease.key.as_str(),
        )
        .bind(lease.holder.to_string())
        .execute(&self.writer)
        .await?;
        Ok(())
    }
}
