//! The replica's side of the fleet's shared state: every
//! [`SYNC_EVERY`](crate::store::SYNC_EVERY) it tells the fleet what
//! upstreams told it (429 cooldowns, `x-ratelimit-*` counts, circuits that
//! opened, prompt blocks routed with prefix affinity) and takes up what
//! the others learned, while the store carries its queued spend, token
//! charges and lease renewals along.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::AppState;
use crate::config::Affinity;
use crate::metering::budget;
use crate::store::{SYNC_EVERY, SyncAsk};

/// How long spend queued by one request waits for others' before it is
/// sent: one call settles every request that ended meanwhile (Redis runs
/// one settlement script per 20 ms, not one per request). Spend that
/// releases a budget reservation held in Redis is sent at once, with what
/// queued while the call before ran: a client's next request, to any
/// replica, finds the budget its last answer held free.
const SETTLE_GATHER: Duration = Duration::from_millis(20);

/// How often the sketch of this month's Llama end users (12 KiB) goes
/// to the fleet and back: an estimate needs no more.
const USERS_EVERY: Duration = Duration::from_secs(2);

/// Exchanges with the fleet, and sends admissions to it, until dropped.
pub struct Sharing(Vec<JoinHandle<()>>);

impl Drop for Sharing {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Starts the exchange when the gateway shares its state (`[state]
/// backend = "redis"`).
pub fn share(app: &Arc<AppState>) -> Sharing {
    let Some(fleet) = app.fleet.clone() else {
        return Sharing(Vec::new());
    };
    let admissions = tokio::spawn(async move { fleet.admit_queued().await });
    let app: Weak<AppState> = Arc::downgrade(app);
    let users = tokio::spawn(merge_users(app.clone()));
    let exchanges = tokio::spawn(async move {
        let mut tick = tokio::time::interval(SYNC_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let Some(fleet) = app.upgrade().and_then(|app| app.fleet.clone()) else {
                return;
            };
            tokio::select! {
                _ = tick.tick() => {
                    let Some(app) = app.upgrade() else { return };
                    exchange(&app).await;
                }
                releases = fleet.spend_queued() => {
                    if !releases {
                        tokio::time::sleep(SETTLE_GATHER).await;
                    }
                    fleet.settle_now().await;
                }
            }
        }
    });
    Sharing(vec![admissions, exchanges, users])
}

/// Every `USERS_EVERY`, this month's Llama end users are merged with the
/// fleet's: each replica's gauge then counts the fleet's.
async fn merge_users(app: Weak<AppState>) {
    let mut tick = tokio::time::interval(USERS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(app) = app.upgrade() else { return };
        let Some(fleet) = &app.fleet else { return };
        let (month, registers) = app.licence.registers();
        if let Some(merged) = fleet.merge_users(&month, &registers).await {
            app.licence.merge(&month, &merged);
        }
    }
}

/// One exchange: what changed here goes out, what the others learned
/// comes in. Also run once more at shutdown, so the last spend is sent.
pub async fn exchange(app: &AppState) {
    let Some(fleet) = &app.fleet else { return };
    let snapshot = app.snapshot.load_full();
    let live = snapshot.live();
    let config = &snapshot.config;
    let now = Instant::now();
    let mut ask = SyncAsk {
        prefix_blocks: config.routing.prefix_blocks,
        ..SyncAsk::default()
    };
    // The prefix memories that take up what the other replicas routed.
    let mut learning = Vec::new();
    for (model, health) in config.models.iter().zip(&live.deployments) {
        for (deployment, health) in model.deployments.iter().zip(health) {
            if let Some(pressure) = health.take_pressure(now) {
                ask.push.push((deployment.name.clone(), pressure));
            }
            ask.pull.push(deployment.name.clone());
            if model.affinity == Affinity::Prefix {
                ask.prefixes.push(deployment.name.clone());
                learning.push(health);
            }
        }
    }
    let today = budget::today();
    ask.budgets = snapshot.budgeted.clone();
    let deployments: Vec<_> = live.deployments.iter().flatten().collect();
    let Some(reply) = fleet.exchange(ask, today, &app.ledger).await else {
        return;
    };
    let now = Instant::now();
    for (health, seen) in deployments.into_iter().zip(reply.pressure) {
        if let Some(seen) = seen
            && health.newer_pressure(seen.at)
        {
            health.apply_pressure(&seen.pressure, now);
        }
    }
    for (health, hashes) in learning.into_iter().zip(reply.blocks) {
        health.prefix.learn(&hashes);
    }
}
