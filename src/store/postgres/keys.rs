//! Idempotency keys on Postgres: the claim (`INSERT … ON CONFLICT DO
//! NOTHING RETURNING`, then a fenced takeover), completion and release.

use super::*;

/// Atomic creation of a key, `in_progress` with a lease. DO NOTHING never
/// waits on an existing row's lock, so a duplicate of a running request is
/// answered at once.
pub const CLAIM_KEY: &str = "INSERT INTO idempotency_keys
        (principal, method, route, key, fingerprint, state, holder, lease_expires_at, expires_at)
 VALUES ($1, $2, $3, $4, $5, 'in_progress', $6,
         now() + make_interval(secs => $7), now() + make_interval(secs => $8))
 ON CONFLICT (principal, method, route, key) DO NOTHING
 RETURNING holder";

/// Binds the four columns that identify a key, `$1`…`$4` in every key query:
/// principal, method, route, key.
pub(super) trait BindKey<'q> {
    fn bind_key(self, scope: &'q KeyScope, key: &'q IdempotencyKey) -> Self;
}

impl<'q> BindKey<'q> for sqlx::query::Query<'q, Postgres, PgArguments> {
    fn bind_key(self, scope: &'q KeyScope, key: &'q IdempotencyKey) -> Self {
        self.bind(&scope.principal)
            .bind(scope.method)
            .bind(scope.route)
            .bind(key.as_str())
    }
}

impl PgStore {
    /// Marks the key completed inside `tx`, only if `lease` still holds it.
    pub(super) async fn complete_key_in(
        tx: &mut Transaction<'_, Postgres>,
        lease: &KeyLease,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE idempotency_keys
                SET state = 'completed', response_status = $6, response_body = $7,
                    lease_expires_at = NULL
              WHERE principal = $1 AND method = $2 AND route = $3 AND key = $4
                AND holder = $5 AND state = 'in_progress'",
        )
        .bind_key(&lease.scope, &lease.key)
        .bind(lease.holder)
        .bind(response.status as i16)
        .bind(&response.body)
        .execute(&mut **tx)
        .await?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(StoreError::LeaseLost)
        }
    }
}

#[async_trait]
impl KeyStore for PgStore {
    #[instrument(skip_all)]
    async fn claim_key(&self, claim: &KeyClaimRequest) -> Result<KeyClaim, StoreError> {
        let mut session = self.session().await?;
        let result: Result<KeyClaim, StoreError> = async {
            let conn: &mut PgConnection = &mut session;
            let holder = Uuid::new_v4();
            let lease_secs = claim.lease.as_secs_f64();
            let ttl_secs = claim.ttl.as_secs_f64();
            // A few passes at most: each retry follows a row that changed under us
            // (deleted by the janitor, or taken over by another request).
            for _ in 0..3 {
                let created = sqlx::query(CLAIM_KEY)
                    .bind_key(&claim.scope, &claim.key)
                    .bind(&claim.fingerprint.0[..])
                    .bind(holder)
                    .bind(lease_secs)
                    .bind(ttl_secs)
                    .fetch_optional(&mut *conn)
                    .await?;
                if created.is_some() {
                    return Ok(KeyClaim::New(claim.lease_to(holder)));
                }
                let existing = sqlx::query(
                    "SELECT fingerprint, state, holder, response_status::int8 AS response_status,
                            response_body,
                            expires_at < now() AS expired,
                            EXTRACT(EPOCH FROM expires_at - now())::float8 AS remaining_secs,
                            lease_expires_at < now() AS lapsed
                       FROM idempotency_keys
                      WHERE principal = $1 AND method = $2 AND route = $3 AND key = $4",
                )
                .bind_key(&claim.scope, &claim.key)
                .fetch_optional(&mut *conn)
                .await?;
                let Some(row) = existing else { continue };
                let previous: Uuid = row.try_get("holder")?;
                let taken = TakenKey {
                    fingerprint: row.try_get("fingerprint")?,
                    completed: completed_response(&row)?,
                    expired: row.try_get("expired")?,
                    lease_lapsed: row.try_get::<Option<bool>, _>("lapsed")? == Some(true),
                    remaining: Duration::from_secs_f64(
                        row.try_get::<f64, _>("remaining_secs")?.max(0.0),
                    ),
                };
                let answer = match decide_taken_key(taken, &claim.fingerprint) {
                    TakenKeyDecision::Answer(answer) => answer,
                    TakenKeyDecision::TakeOver => {
                        // An expired key starts afresh; a lapsed lease (its holder
                        // crashed) passes to this request. Fenced on the previous
                        // holder, so of two racing takeovers exactly one wins.
                        let taken = sqlx::query(
                            "UPDATE idempotency_keys
                            SET fingerprint = $6, state = 'in_progress', holder = $7,
                                lease_expires_at = now() + make_interval(secs => $8),
                                response_status = NULL, response_body = NULL,
                                created_at = now(), expires_at = now() + make_interval(secs => $9)
                          WHERE principal = $1 AND method = $2 AND route = $3 AND key = $4
                            AND holder = $5
                            AND (expires_at < now()
                                 OR (state = 'in_progress' AND lease_expires_at < now()))",
                        )
                        .bind_key(&claim.scope, &claim.key)
                        .bind(previous)
                        .bind(&claim.fingerprint.0[..])
                        .bind(holder)
                        .bind(lease_secs)
                        .bind(ttl_secs)
                        .execute(&mut *conn)
                        .await?;
                        if taken.rows_affected() == 1 {
                            return Ok(KeyClaim::New(claim.lease_to(holder)));
                        }
                        continue;
                    }
                };
                return Ok(answer);
            }
            Ok(KeyClaim::InFlight)
        }
        .await;
        session.settle(result)
    }

    #[instrument(skip_all)]
    async fn complete_key(
        &self,
        lease: &KeyLease,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        let mut session = self.session().await?;
        let result: Result<(), StoreError> = async {
            let conn: &mut PgConnection = &mut session;
            let mut tx = conn.begin().await?;
            Self::complete_key_in(&mut tx, lease, response).await?;
            tx.commit().await?;
            Ok(())
        }
        .await;
        session.settle(result)
    }

    #[instrument(skip_all)]
    async fn release_key(&self, lease: &KeyLease) -> Result<(), StoreError> {
        let mut session = self.session().await?;
        let result: Result<(), StoreError> = async {
            let conn: &mut PgConnection = &mut session;
            sqlx::query(
                "DELETE FROM idempotency_keys
                  WHERE principal = $1 AND method = $2 AND route = $3 AND key = $4
                    AND holder = $5 AND state = 'in_progress'",
            )
            .bind_key(&lease.scope, &lease.key)
            .bind(lease.holder)
            .execute(&mut *conn)
            .await?;
            Ok(())
        }
        .await;
        session.settle(result)
    }
}
