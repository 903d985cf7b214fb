//! The connection pool (`deadpool-postgres`) and one borrowed connection.
//!
//! - Acquiring waits at most `acquire_timeout` for a free connection and
//!   `connect_timeout` for a new one; a connection goes back to the pool
//!   without a round trip (deadpool's `Fast` recycling: only
//!   `is_closed()` is checked).
//! - Statements are prepared once per connection (deadpool's statement
//!   cache) and every round trip is counted in
//!   `digibot_store_round_trips_total`.
//! - Every statement is held to the server's `statement_timeout` and, for
//!   a server that stops answering altogether, to a client-side deadline a
//!   little longer; past it the connection is thrown away. Both are
//!   [`StoreError::Timeout`].

use crate::Error;
use crate::connect::DatabaseUrl;
use deadpool_postgres::{Manager, ManagerConfig, Object, PoolError, RecyclingMethod, Runtime};
use digibot_store::StoreError;
use std::time::Duration;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement};

/// How long past the server's `statement_timeout` the client waits before
/// it gives up on a server that does not answer at all.
const CLIENT_GRACE: Duration = Duration::from_secs(1);

/// Counts one round trip to the database.
fn count_round_trip() {
    metrics::counter!(digibot_store::metrics::ROUND_TRIPS).increment(1);
}

/// The timeouts a pool applies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub acquire: Duration,
    pub statement: Duration,
}

/// At most `size` connections, opened on demand, reused while healthy.
/// A clone shares the connections.
#[derive(Clone)]
pub(crate) struct Pool {
    pool: deadpool_postgres::Pool,
    timeouts: Timeouts,
    connect: Duration,
}

impl Pool {
    pub(crate) fn new(url: &DatabaseUrl, size: usize, timeouts: Timeouts) -> Result<Pool, Error> {
        let config = url.session(timeouts.statement);
        let connect = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(5));
        let manager = Manager::from_config(
            config,
            url.tls()?,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeouts.acquire))
            // The whole startup (TCP, TLS, authentication), which
            // tokio-postgres's connect_timeout (the TCP connect) does not
            // cover: a server that accepts and never answers.
            .create_timeout(Some(connect))
            .recycle_timeout(Some(connect))
            .build()
            .map_err(|e| StoreError::Config(format!("database pool: {e}")))?;
        Ok(Pool {
            pool,
            timeouts,
            connect,
        })
    }

    /// A connection, within the acquire (and connect) timeouts.
    pub(crate) async fn get(&self) -> Result<Conn, Error> {
        match self.pool.get().await {
            Ok(object) => Ok(Conn {
                object: Some(object),
                deadline: self.timeouts.statement + CLIENT_GRACE,
                broken: false,
            }),
            Err(PoolError::Timeout(kind)) => Err(StoreError::Timeout(format!(
                "no database connection within {} ms ({kind:?})",
                match kind {
                    deadpool_postgres::TimeoutType::Wait => self.timeouts.acquire,
                    _ => self.connect,
                }
                .as_millis()
            ))
            .into()),
            Err(PoolError::Backend(e)) => Err(e.into()),
            Err(PoolError::Closed) => Err(StoreError::Closed.into()),
            Err(e) => Err(StoreError::Database(e.to_string()).into()),
        }
    }

    /// Later [`get`](Self::get)s fail with [`StoreError::Closed`]; idle
    /// connections are closed.
    pub(crate) fn close(&self) {
        self.pool.close();
    }
}

/// A connection borrowed from the pool; it goes back when dropped, unless
/// a statement outlived the client-side deadline on it.
pub(crate) struct Conn {
    /// `Some` until dropped.
    object: Option<Object>,
    deadline: Duration,
    broken: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.broken
            && let Some(object) = self.object.take()
        {
            // Out of the pool for good: its connection task ends and the
            // socket closes; the pool may open a fresh one.
            drop(Object::take(object));
        }
    }
}

type Elapsed = tokio::time::error::Elapsed;

impl Conn {
    /// The client, for a transaction (migrations).
    pub(crate) fn client(&mut self) -> &mut deadpool_postgres::ClientWrapper {
        self.object.as_mut().expect("present until dropped")
    }

    fn object(&self) -> &Object {
        self.object.as_ref().expect("present until dropped")
    }

    /// The answer within the client-side deadline, else a timeout that
    /// retires the connection.
    fn settle<T>(
        &mut self,
        answer: Result<Result<T, tokio_postgres::Error>, Elapsed>,
    ) -> Result<T, Error> {
        match answer {
            Ok(result) => Ok(result?),
            Err(_) => {
                self.broken = true;
                Err(StoreError::Timeout(format!(
                    "the database did not answer within {} ms",
                    self.deadline.as_millis()
                ))
                .into())
            }
        }
    }

    /// `sql` prepared on this connection: a round trip the first time only.
    async fn prepare(&mut self, sql: &str) -> Result<Statement, Error> {
        let object = self.object();
        let cached = object.statement_cache.size();
        let answer = tokio::time::timeout(self.deadline, object.prepare_cached(sql)).await;
        if self.object().statement_cache.size() != cached {
            count_round_trip();
        }
        self.settle(answer)
    }

    pub(crate) async fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        let statement = self.prepare(sql).await?;
        count_round_trip();
        let answer =
            tokio::time::timeout(self.deadline, self.object().query(&statement, params)).await;
        self.settle(answer)
    }

    pub(crate) async fn query_one(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error> {
        let statement = self.prepare(sql).await?;
        count_round_trip();
        let answer =
            tokio::time::timeout(self.deadline, self.object().query_one(&statement, params)).await;
        self.settle(answer)
    }

    pub(crate) async fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        let statement = self.prepare(sql).await?;
        count_round_trip();
        let answer =
            tokio::time::timeout(self.deadline, self.object().query_opt(&statement, params)).await;
        self.settle(answer)
    }

    pub(crate) async fn execute(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error> {
        let statement = self.prepare(sql).await?;
        count_round_trip();
        let answer =
            tokio::time::timeout(self.deadline, self.object().execute(&statement, params)).await;
        self.settle(answer)
    }
}
