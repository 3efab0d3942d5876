//! A PostgreSQL database for one test: a fresh schema with a random name in the database named
//! by `MLSCHAT_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`), reached
//! through a URL whose `search_path` is that schema, and dropped with everything in it at the
//! end. Tests can therefore run in parallel and leave nothing behind.
//!
//! Without a reachable PostgreSQL the tests are skipped with a printed reason, except under
//! `CI=true`, where that is a failure: CI must never skip them silently.

#![allow(dead_code)]

use std::io::Write as _;
use std::time::Duration;

use rand::Rng as _;
use tokio_postgres::NoTls;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

pub struct TestDatabase {
    base_url: String,
    pub schema: String,
    /// `base_url` with `search_path` set to `schema`.
    pub url: String,
}

fn base_url() -> String {
    std::env::var("MLSCHAT_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_URL.to_string())
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true" || value == "1")
}

/// Connects to the base database, or explains why not.
async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let connecting =
        tokio::time::timeout(Duration::from_secs(5), tokio_postgres::connect(url, NoTls));
    match connecting.await {
        Ok(Ok((client, connection))) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok(client)
        }
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("no answer within 5 s".into()),
    }
}

impl TestDatabase {
    /// The URL of the database the test schemas live in.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// A fresh schema, or `None` (after printing why) when PostgreSQL is not reachable outside
    /// CI. Panics in CI.
    pub async fn create() -> Option<TestDatabase> {
        let base_url = base_url();
        let client = match connect(&base_url).await {
            Ok(client) => client,
            Err(reason) => {
                assert!(
                    !in_ci(),
                    "PostgreSQL is not reachable at {base_url}: {reason}; CI must run the \
                     PostgreSQL tests (.ci/run starts it)"
                );
                // Written to the real stderr, past the test harness's capture, so that the
                // skip is visible in a plain `cargo test`.
                let _ = writeln!(
                    std::io::stderr(),
                    "skipping a PostgreSQL test: PostgreSQL is not reachable at {base_url} \
                     ({reason}); start it or set MLSCHAT_TEST_POSTGRES"
                );
                return None;
            }
        };
        let schema = format!("mlschat_test_{:016x}", rand::thread_rng().r#gen::<u64>());
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .expect("create the test schema");
        let separator = if base_url.contains('?') { '&' } else { '?' };
        let url = format!("{base_url}{separator}options=-c%20search_path%3D{schema}");
        Some(TestDatabase {
            base_url,
            schema,
            url,
        })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop may run inside a runtime, which cannot block on another: use a thread with its
        // own small runtime.
        let base_url = self.base_url.clone();
        let schema = self.schema.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime to drop the test schema");
            runtime.block_on(async move {
                let client = connect(&base_url).await?;
                client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .await
                    .map_err(|error| error.to_string())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            let _ = writeln!(
                std::io::stderr(),
                "could not drop the test schema {}: {dropped:?}",
                self.schema
            );
        }
    }
}
