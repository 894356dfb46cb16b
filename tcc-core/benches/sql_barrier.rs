//! Business transactions per second through the SQL barrier next to the same business statements
//! run without it, on PostgreSQL and on MySQL (MariaDB), interleaved.
//!
//! `TCC_TEST_POSTGRES_URL=postgres://... TCC_TEST_MYSQL_URL=mysql://... cargo bench -p tcc-core
//! --features sqlx-postgres,sqlx-mysql --bench sql_barrier [-- --seconds S] [--workers N] [--rounds R]`
//!
//! One transaction is a try then a confirm of one seat: `UPDATE seats SET held = held + 1`, then
//! `held - 1, sold + 1`, each in its own database transaction. `raw` runs exactly that; `barrier`
//! runs each step through [`SqlBarrier::begin`] and [`Pending::commit`](tcc_core::barrier::sql::Pending::commit)
//! (the barrier row read and locked, inserted by the try, updated by both). Each worker has its own
//! seat, so rows do not contend. Every commit is durable (the servers' defaults). A database whose URL
//! is not set is skipped. Each measurement runs in a fresh schema / database.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tcc_core::barrier::Op;
use tcc_core::barrier::sql::{BarrierTable, Begun, SqlBarrier};
use tcc_core::{BranchId, Clock, Gid, SystemClock};

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(default)
}

#[derive(Clone, Copy)]
enum Mode {
    Raw,
    Barrier,
}

macro_rules! bench_db {
    ($run:ident, $db:ty, $pool_options:ty, $scratch:path, $try_sql:literal, $confirm_sql:literal) => {
        /// Transactions per second in `mode` with `workers` concurrent workers for `seconds`.
        async fn $run(url: &str, mode: Mode, workers: usize, seconds: f64) -> f64 {
            let url = $scratch(url, "tcc_bench").await.unwrap();
            let pool = <$pool_options>::new().max_connections(workers as u32).connect(&url).await.unwrap();
            sqlx::query(
                "CREATE TABLE seats (id BIGINT PRIMARY KEY, held BIGINT NOT NULL, sold BIGINT NOT NULL)",
            )
            .execute(&pool)
            .await
            .unwrap();
            for id in 0..workers as i64 {
                sqlx::query(sqlx::AssertSqlSafe(format!("INSERT INTO seats VALUES ({id}, 0, 0)")))
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            let clock: Arc<dyn Clock> = Arc::new(SystemClock);
            let barrier = SqlBarrier::new(
                pool.clone(),
                BarrierTable::default(),
                clock.clone(),
                Duration::from_secs(60),
            );
            barrier.migrate().await.unwrap();
            let done = Arc::new(AtomicU64::new(0));
            let start = Instant::now();
            let end = start + Duration::from_secs_f64(seconds);
            let tasks: Vec<_> = (0..workers as i64)
                .map(|seat| {
                    let (pool, barrier, clock, done) =
                        (pool.clone(), barrier.clone(), clock.clone(), done.clone());
                    tokio::spawn(async move {
                        let branch: BranchId = "seat".parse().unwrap();
                        while Instant::now() < end {
                            match mode {
                                Mode::Raw => {
                                    for sql in [$try_sql, $confirm_sql] {
                                        let mut tx = pool.begin().await.unwrap();
                                        sqlx::query(sql).bind(seat).execute(&mut *tx).await.unwrap();
                                        tx.commit().await.unwrap();
                                    }
                                }
                                Mode::Barrier => {
                                    let gid = Gid::generate();
                                    let deadline = clock.now() + Duration::from_secs(60);
                                    let steps = [
                                        (Op::Try { deadline, request: b"seat" }, $try_sql),
                                        (Op::Confirm, $confirm_sql),
                                    ];
                                    for (op, sql) in steps {
                                        let Begun::Run(mut p) =
                                            barrier.begin(&gid, &branch, op).await.unwrap()
                                        else {
                                            panic!("a fresh call runs")
                                        };
                                        sqlx::query(sql).bind(seat).execute(p.conn()).await.unwrap();
                                        p.commit(b"held".to_vec()).await.unwrap();
                                    }
                                }
                            }
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            let elapsed = start.elapsed().as_secs_f64();
            pool.close().await;
            done.load(Ordering::Relaxed) as f64 / elapsed
        }
    };
}

bench_db!(
    run_postgres,
    sqlx::Postgres,
    sqlx::postgres::PgPoolOptions,
    tcc_core::barrier::sql::testing::create_scratch_postgres_schema,
    "UPDATE seats SET held = held + 1 WHERE id = $1",
    "UPDATE seats SET held = held - 1, sold = sold + 1 WHERE id = $1"
);

bench_db!(
    run_mysql,
    sqlx::MySql,
    sqlx::mysql::MySqlPoolOptions,
    tcc_core::barrier::sql::testing::create_scratch_mysql_database,
    "UPDATE seats SET held = held + 1 WHERE id = ?",
    "UPDATE seats SET held = held - 1, sold = sold + 1 WHERE id = ?"
);

#[tokio::main]
async fn main() {
    let seconds: f64 = arg("--seconds", 3.0);
    let workers: usize = arg("--workers", 16);
    let rounds: usize = arg("--rounds", 3);
    let pg = std::env::var("TCC_TEST_POSTGRES_URL").ok().filter(|u| !u.is_empty());
    let my = std::env::var("TCC_TEST_MYSQL_URL").ok().filter(|u| !u.is_empty());
    println!(
        "{workers} workers, {seconds} s per measurement, {rounds} interleaved rounds (tx = try + confirm)"
    );
    println!("{:<10} {:>5} {:>12} {:>12} {:>7}", "database", "round", "raw tx/s", "barrier tx/s", "ratio");
    for round in 1..=rounds {
        if let Some(url) = &pg {
            let raw = run_postgres(url, Mode::Raw, workers, seconds).await;
            let barrier = run_postgres(url, Mode::Barrier, workers, seconds).await;
            println!("{:<10} {round:>5} {raw:>12.0} {barrier:>12.0} {:>7.2}", "postgres", barrier / raw);
        }
        if let Some(url) = &my {
            let raw = run_mysql(url, Mode::Raw, workers, seconds).await;
            let barrier = run_mysql(url, Mode::Barrier, workers, seconds).await;
            println!("{:<10} {round:>5} {raw:>12.0} {barrier:>12.0} {:>7.2}", "mysql", barrier / raw);
        }
    }
    if pg.is_none() && my.is_none() {
        println!("skipped: neither TCC_TEST_POSTGRES_URL nor TCC_TEST_MYSQL_URL is set");
    }
}
