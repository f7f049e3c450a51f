//! The unit of work on SQLite, and the idempotency key it completes: the
//! same claim decision as Postgres in one `BEGIN IMMEDIATE` transaction, the
//! release, and [`SqliteUnitOfWork`], whose commit writes the outbox rows
//! and completes the key, fenced on its holder (each written once, here).

use super::*;

type Query<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>;

const KEY_WHERE: &str = "principal = ? AND method = ? AND route = ? AND key = ?";

#[async_trait]
impl KeyStore for SqliteStore {
    #[instrument(skip_all)]
    async fn claim_key(&self, claim: &KeyClaimRequest) -> Result<KeyClaim, StoreError> {
        let holder = Uuid::new_v4();
        let mut tx = self.write().await?;
        let now = now_us();
        let created = sqlx::query(
            "INSERT INTO idempotency_keys
                (principal, method, route, key, fingerprint, state, holder,
                 lease_expires_at, created_at, expires_at)
             VALUES (?, ?, ?, ?, ?, 'in_progress', ?, ?, ?, ?)
             ON CONFLICT (principal, method, route, key) DO NOTHING
             RETURNING holder",
        )
        .bind_key(&claim.scope, &claim.key)
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
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind_key(&claim.scope, &claim.key)
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
        query
            .bind_key(&claim.scope, &claim.key)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(KeyClaim::New(claim.lease_to(holder)))
    }

    #[instrument(skip_all)]
    async fn release_key(&self, lease: &KeyLease) -> Result<(), StoreError> {
        let sql = format!(
            "DELETE FROM idempotency_keys WHERE {KEY_WHERE} AND holder = ? AND state = 'in_progress'"
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind_key(&lease.scope, &lease.key)
            .bind(lease.holder.to_string())
            .execute(&self.writer)
            .await?;
        Ok(())
    }
}

/// SQLite binds ids as text and instants as integer microseconds.
impl<'q> Binds<'q> for Query<'q> {
    fn id(self, id: Uuid) -> Self {
        self.bind(id.to_string())
    }

    fn instant(self, at: DateTime<Utc>) -> Self {
        self.bind(at.timestamp_micros())
    }
}

/// A unit of work: one `BEGIN IMMEDIATE` transaction on the writer (the
/// database's write lock is taken at once, so nothing overtakes it between
/// a read and a write). Dropped without commit, sqlx rolls it back.
pub struct SqliteUnitOfWork {
    tx: Transaction<'static, Sqlite>,
    /// The key its commit completes.
    key: Option<KeyLease>,
    /// Emitted events, written at commit.
    events: Vec<OutboxEvent>,
}

#[async_trait]
impl Transact for SqliteStore {
    async fn begin(&self, key: Option<KeyLease>) -> Result<Box<dyn UnitOfWork>, StoreError> {
        Ok(Box::new(SqliteUnitOfWork {
            tx: self.write().await?,
            key,
            events: Vec::new(),
        }))
    }
}

#[async_trait]
impl UnitOfWork for SqliteUnitOfWork {
    async fn job_for_update(&mut self, id: Uuid) -> Result<Option<Job>, StoreError> {
        // The write lock, taken at BEGIN, already keeps every other writer out.
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id.to_string())
            .fetch_optional(&mut *self.tx)
            .await?;
        Ok(row.as_ref().map(job_from_row).transpose()?)
    }

    async fn insert_job(&mut self, job: &Job) -> Result<(), StoreError> {
        let keys = job.search_keys();
        bind_job(sqlx::query(INSERT_JOB), job, &keys)
            .instant(job.posted_at)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    async fn update_job(&mut self, job: &Job) -> Result<(), StoreError> {
        let keys = job.search_keys();
        bind_job(sqlx::query(UPDATE_JOB), job, &keys)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    async fn insert_application(&mut self, application: &Application) -> Result<bool, StoreError> {
        let inserted = bind_application(sqlx::query(INSERT_APPLICATION), application)
            .execute(&mut *self.tx)
            .await?
            .rows_affected();
        Ok(inserted == 1)
    }

    async fn application_of(
        &mut self,
        user_id: &str,
        job_id: Uuid,
    ) -> Result<Option<Application>, StoreError> {
        let row = sqlx::query(application_of())
            .text(user_id)
            .id(job_id)
            .fetch_optional(&mut *self.tx)
            .await?;
        Ok(row.as_ref().map(application_from_row).transpose()?)
    }

    async fn insert_charge(&mut self, charge: &Charge) -> Result<(), StoreError> {
        bind_charge(sqlx::query(INSERT_CHARGE), charge)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    async fn audit(&mut self, entry: &AuditEntry) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO admin_audit (action, subject, detail, actor, at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&entry.action)
        .bind(&entry.subject)
        .bind(&entry.detail)
        .bind(&entry.actor)
        .bind(now_us())
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    fn emit(&mut self, event: OutboxEvent) {
        self.events.push(event);
    }

    async fn commit(self: Box<Self>, answer: &StoredResponse) -> Result<(), StoreError> {
        let SqliteUnitOfWork {
            mut tx,
            key,
            events,
        } = *self;
        let now = now_us();
        // The context the events are committed in: traces continue from it.
        let traceparent = crate::telemetry::traces::current();
        for (topic, aggregate_id, payload) in events {
            sqlx::query(
                "INSERT INTO outbox_events
                        (event_id, topic, aggregate_id, payload, created_at, due_at, traceparent)
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(Uuid::now_v7().to_string())
            .bind(topic)
            .bind(aggregate_id.to_string())
            .bind(payload.to_string())
            .bind(now)
            .bind(now)
            .bind(&traceparent)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(key) = &key {
            let sql = format!(
                "UPDATE idempotency_keys
                    SET state = 'completed', response_status = ?, response_body = ?,
                        lease_expires_at = NULL
                  WHERE {KEY_WHERE} AND holder = ? AND state = 'in_progress'"
            );
            let done = sqlx::query(AssertSqlSafe(sql))
                .bind(i64::from(answer.status))
                .bind(answer.body.as_str())
                .bind_key(&key.scope, &key.key)
                .bind(key.holder.to_string())
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != 1 {
                return Err(StoreError::LeaseLost);
            }
        }
        tx.commit().await?;
        Ok(())
    }
}
