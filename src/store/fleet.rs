//! The fleet's shared state in Redis: admission by script on the server's
//! clock or from the credit it granted, and the batched exchange that
//! carries everything else. Every
//! call is bounded by `[state] timeout_ms`; one that fails or runs late
//! marks the replica degraded, and the request path stops asking Redis
//! until an exchange succeeds again.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use prometheus::{IntCounter, IntCounterVec, IntGauge};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script};
use serde_json::json;
use time::Date;
use time::macros::format_description;
use tokio::sync::{mpsc, oneshot};

use super::credit::{Budgeted, Credits, Draw, Terms};
use super::prefixes::{self, Prefixes, WirePrefixes};
use super::remembered::{self, Keeper, KeyShare, Remembered, Shares, Update};
use super::sync::{SyncAsk, SyncReply, WirePush, WireReply};
use super::users;
use crate::config::{ClientTls, OnUnavailable, RedisState, Roots};
use crate::ledger::Ledger;
use crate::limits::{Limit, Refused, SharedCells, SharedTokens};
use crate::metering::budget::{
    Ask, Period, SharedSpend, spent_in as budget_spent_in, today as budget_today,
};
use crate::metering::prefix::Block;

const DAY: &[time::format_description::BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]-[day]");
const MONTH: &[time::format_description::BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]");

/// The field of a key's home that holds its spend in `period`.
fn period_field(period: Period, day: Date) -> String {
    match period {
        Period::Daily => format!("d:{}", day.format(DAY).unwrap_or_default()),
        Period::Monthly => format!("m:{}", day.format(MONTH).unwrap_or_default()),
    }
}

/// Spend fields of periods no settlement reaches any more (a request that
/// ran over midnight settles into yesterday): dropped by the exchange.
fn stale_fields(today: Date) -> Vec<String> {
    let days = (2..=8).filter_map(|back| today.checked_sub(time::Duration::days(back)));
    let month = today
        .replace_day(1)
        .ok()
        .and_then(|first| first.previous_day())
        .and_then(|last| last.replace_day(1).ok())
        .and_then(|first| first.previous_day());
    days.map(|day| period_field(Period::Daily, day))
        .chain(month.map(|day| period_field(Period::Monthly, day)))
        .collect()
}
/// How many budgeted keys not in use an exchange sweeps (see `payload`).
const SWEEP: usize = 256;

/// The indexes of the `n` budgeted keys an exchange sweeps in turn from
/// the `from`th on.
fn in_turn(n: usize, from: usize) -> impl Iterator<Item = usize> {
    (0..n.min(SWEEP)).map(move |i| (from + i) % n)
}

/// The exchange is not on a request's path: it may take longer than an
/// admission before the replica counts Redis away.
const SYNC_TIMEOUT: Duration = Duration::from_secs(1);

/// While Redis answers, what the exchanges learned is written to the
/// data_dir at most this often (when it changed): a restart reads it only
/// if Redis is away, and an outage writes the latest at once.
const REMEMBER_EVERY: Duration = Duration::from_secs(1);

/// How long a request refused for budget that other replicas hold waits
/// before it asks once more: a release each sends as its answer's last
/// bytes go out reaches Redis in about a round trip, and a client that
/// sent its next request to this replica on that answer may have beaten
/// it there.
const HELD_RECHECK: Duration = Duration::from_millis(10);

/// A credit asked for by a request in flight. Every other admission of
/// its owner goes to Redis without asking until it is answered, so one
/// whose request is cancelled first (its client left) lets the next ask.
struct Asking<'a> {
    credits: &'a Mutex<Credits>,
    home: &'a str,
    answered: bool,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        if !self.answered {
            lock(self.credits).unasked(self.home);
        }
    }
}

/// An admission's answer from Redis, awaited. Dropped before it took the
/// answer (its request was cancelled, or stopped waiting), a reservation
/// the answer made is released at once: no request will settle it.
struct Awaited<'a> {
    fleet: &'a Fleet,
    answer: oneshot::Receiver<Option<Vec<i64>>>,
    /// The key whose budget it reserves, and the reservation's id.
    reservation: Option<(String, String)>,
}

impl Drop for Awaited<'_> {
    fn drop(&mut self) {
        // Closed first, an answer sent later fails to arrive, and the
        // sender releases its reservation itself.
        self.answer.close();
        if let Ok(Some(reply)) = self.answer.try_recv() {
            self.fleet.abandoned(self.reservation.take(), &reply);
        }
    }
}

/// A request admitted by the fleet, with its budget reservation (its id
/// and nano-dollars) when its key has a budget.
#[derive(Debug)]
pub struct Admitted {
    pub reservation: Option<(String, u64)>,
}

/// Why the fleet did not admit a request.
#[derive(Debug)]
pub enum Denied {
    Rate(Refused),
    Budget {
        period: Period,
        limit: u64,
        spent: u64,
        held: u64,
        needed: u64,
    },
    /// Redis did not answer in time: the caller serves on this replica's
    /// own state or refuses, as configured.
    Unavailable,
}

pub struct Fleet {
    connection: ConnectionManager,
    /// Admissions waiting for the next call to Redis.
    admissions: mpsc::UnboundedSender<Queued>,
    /// Taken by the task that sends them.
    admission_queue: Mutex<Option<mpsc::UnboundedReceiver<Queued>>>,
    prefix: String,
    /// The spend log's position and its changed hashes (see
    /// `lua/spend_log.lua`), the first keys of both scripts.
    spend_log: [String; 2],
    timeout: Duration,
    lease: Duration,
    pub on_unavailable: OnUnavailable,
    /// This process, among the replicas.
    replica: String,
    sequence: AtomicU64,
    /// Where the next exchange's sweep of the budgeted keys starts.
    sweep: AtomicUsize,
    degraded: AtomicBool,
    admit: Script,
    sync: Script,
    /// Taken before `pending` when both are.
    credits: Mutex<Credits>,
    pending: Mutex<Pending>,
    /// One call of the exchange script at a time.
    sending: tokio::sync::Mutex<()>,
    /// Wakes the sender when a request's spend is queued.
    settled: tokio::sync::Notify,
    /// Spend queued since the last call releases a reservation in Redis.
    releases: AtomicBool,
    /// The last batch of spend Redis acknowledged.
    acknowledged: AtomicU64,
    known: Mutex<Known>,
    /// Where `known` is kept across restarts; `None` without a ledger of
    /// this replica's own spend in a data_dir.
    remember: Option<Remember>,
    prefixes: Mutex<Prefixes>,
    degraded_gauge: IntGauge,
    replicas_gauge: IntGauge,
    from_credit: IntCounter,
    from_redis: IntCounter,
}

/// Admissions sent to Redis in one call, at most.
const MAX_BATCH: usize = 128;

/// One admission's keys and arguments, as `lua/admit.lua` reads them, and
/// where its answer goes (`None`: Redis did not answer).
struct Queued {
    keys: [String; 2],
    args: Vec<String>,
    reply: oneshot::Sender<Option<Vec<i64>>>,
    /// The key whose budget it reserves, and the reservation's id.
    reservation: Option<(String, String)>,
}

#[derive(Default)]
struct Pending {
    settle: Vec<Settlement>,
    /// Tokens per shared cell, by home and field: its per-minute quota
    /// and the net charge.
    charge: Charges,
    /// Batches sent and not yet acknowledged, oldest first: sent again,
    /// with the same numbers, until Redis acknowledges them.
    unsent: Vec<Batch>,
    next_batch: u64,
    /// Reservations requests here hold in Redis, by key: renewed until
    /// settled.
    live: HashMap<String, HashSet<String>>,
    renewed: Option<Instant>,
}

impl Pending {
    /// What `key` spent in `[from, to]` that Redis has not acknowledged.
    fn unsent(&self, key: &str, from: Date, to: Date) -> u64 {
        self.unsent
            .iter()
            .flat_map(|b| &b.settle)
            .chain(&self.settle)
            .filter(|s| s.key == key && s.day >= from && s.day <= to)
            .fold(0u64, |sum, s| sum.saturating_add(s.nano_usd))
    }

    /// Whether a settlement not yet acknowledged releases a reservation
    /// `key` holds in Redis.
    fn settles_reservation_of(&self, key: &str) -> bool {
        self.unsent
            .iter()
            .flat_map(|b| &b.settle)
            .chain(&self.settle)
            .any(|s| s.key == key && s.reservation.is_some())
    }
}

/// Spend and token charges sent together under one number. Redis keeps
/// the highest number it applied for each replica and skips a batch it
/// has seen, so one sent again after a lost reply is not counted twice.
struct Batch {
    number: u64,
    settle: Vec<Settlement>,
    charge: Charges,
}

type Charges = HashMap<String, HashMap<String, (u32, i64)>>;

struct Settlement {
    key: String,
    /// The reservation it releases in Redis.
    reservation: Option<String>,
    /// The credit it was admitted from, whose reservation in Redis gives
    /// up what it cost.
    drawn: Option<String>,
    nano_usd: u64,
    day: Date,
}

#[derive(Default)]
struct Known {
    replicas: u64,
    /// Per key with a budget, as of the last exchange (on `day`): the
    /// day's and the month's spend, and what requests hold.
    spent: HashMap<String, [u64; 3]>,
    /// Per key, with `remember`: of the day's and the month's spend in
    /// this replica's ledger, what `spent` counts, and what settlement
    /// calls added to the fleet's counts since.
    counted: HashMap<String, [u64; 2]>,
    settled: HashMap<String, [u64; 2]>,
    /// `None`: no exchange since start, and nothing remembered.
    day: Option<Date>,
    /// Read from the data_dir at start, and no exchange since: this
    /// replica's spend since that exchange is in its ledger, beyond
    /// `counted`.
    remembered: bool,
    /// Whether the store's spend counters were seeded since it was last
    /// away.
    seeded: bool,
    /// The spend log's position (epoch, number) `spent` was read at, when
    /// the next exchange may read only the keys changed after it.
    position: Option<[String; 2]>,
    /// The budgeted keys `spent` holds: while the config stays, the
    /// exchange's list is this one, and no key is new.
    budgets: Arc<[String]>,
    /// What may have moved of the shares the data_dir keeps since they
    /// were last taken: writing them costs what moved. Without
    /// `remember` nothing takes it, and from the first exchange on it
    /// says `every` and names no key.
    moved: Moved,
}

/// Keys whose share (`Known::share`) may have moved; `every`: any may.
#[derive(Default)]
struct Moved {
    every: bool,
    keys: HashSet<String>,
}

impl Moved {
    fn key(&mut self, key: &str) {
        if !self.every && !self.keys.contains(key) {
            self.keys.insert(key.to_owned());
        }
    }
}

/// Which budgeted keys' spend an exchange reads, and seeds.
#[derive(Debug, Default, PartialEq)]
struct Reading {
    /// The spend log's position the last exchange read: the keys changed
    /// after it are read. `None`: `read` holds every key.
    since: Option<[String; 2]>,
    /// Indexes, in the exchange's budgets, of the keys read whatever
    /// changed: every key, or those newly budgeted.
    read: Vec<usize>,
    /// Per budgeted key, what its spend counters are seeded with when the
    /// store was away or lost its data (every key is read then).
    seeds: Option<Vec<Seed>>,
}

impl Known {
    /// What the next exchange reads of `budgets` on `today`: every key
    /// after a start, a day or month that began, or an exchange that
    /// seeds (Redis was away or lost its data); otherwise the keys
    /// changed since the last one, and the keys newly budgeted.
    fn reading(&self, budgets: &Arc<[String]>, today: Date) -> Reading {
        let since = (self.position.clone())
            .filter(|_| self.seeded && !self.remembered && self.day == Some(today));
        let read = if since.is_some() && Arc::ptr_eq(budgets, &self.budgets) {
            Vec::new()
        } else {
            (budgets.iter().enumerate())
                .filter(|(_, key)| since.is_none() || !self.spent.contains_key(*key))
                .map(|(i, _)| i)
                .collect()
        };
        Reading {
            since,
            read,
            seeds: None,
        }
    }

    /// Takes up what an exchange read of `budgets` as `reading` asked:
    /// `keys` names a budget hash's key; `counted` is the ledger's spend
    /// of the keys whose share of it in the fleet's counts may have moved.
    fn take_up(
        &mut self,
        budgets: &Arc<[String]>,
        reading: &Reading,
        reply: &WireReply,
        counted: Vec<(String, [u64; 2])>,
        key_of: impl Fn(&str) -> Option<&str>,
    ) {
        let n = |t: &String| t.parse::<u64>().unwrap_or(0);
        if reading.since.is_none() || reply.reset {
            self.moved.every = true;
            // What the store does not name has nothing.
            self.spent = budgets.iter().map(|key| (key.clone(), [0; 3])).collect();
            self.counted.retain(|key, _| self.spent.contains_key(key));
        } else if self.spent.len() + reading.read.len() != budgets.len() {
            // Some keys are no longer budgeted.
            let budgeted: HashSet<&str> = budgets.iter().map(String::as_str).collect();
            let moved = &mut self.moved;
            self.spent.retain(|key, _| {
                let kept = budgeted.contains(key.as_str());
                if !kept {
                    moved.key(key);
                }
                kept
            });
            self.counted
                .retain(|key, _| budgeted.contains(key.as_str()));
        }
        self.budgets = budgets.clone();
        for (&i, s) in reading.read.iter().zip(&reply.spent) {
            self.moved.key(&budgets[i]);
            self.spent
                .insert(budgets[i].clone(), [n(&s[0]), n(&s[1]), n(&s[2])]);
        }
        for c in &reply.changed {
            if let Some((key, spent)) =
                key_of(&c[0]).and_then(|key| self.spent.get_mut(key).map(|spent| (key, spent)))
            {
                let read = [n(&c[1]), n(&c[2]), n(&c[3])];
                if *spent != read {
                    *spent = read;
                    self.moved.key(key);
                }
            }
        }
        if reading.since.is_none() {
            self.counted.clear();
        }
        for (key, counted) in counted {
            if self.spent.contains_key(&key) && self.counted.get(&key) != Some(&counted) {
                self.moved.key(&key);
                self.counted.insert(key, counted);
            }
        }
        // A log that began anew, or replicas that came or went (one of a
        // version that logs nothing, in a rolling upgrade), and the next
        // exchange reads every key again.
        self.position = reply
            .version
            .clone()
            .filter(|_| !reply.reset && reply.replicas == self.replicas);
        self.replicas = reply.replicas.max(1);
    }

    /// What the data_dir keeps of `key`: `None` for a key not budgeted,
    /// or whose share of the fleet's counts is not known.
    fn share(&self, key: &str) -> Option<KeyShare> {
        Some(KeyShare {
            fleet: *self.spent.get(key)?,
            counted: *self.counted.get(key)?,
            settled: self.settled.get(key).copied().unwrap_or_default(),
        })
    }

    /// What to keep in the data_dir, of the keys only those that may have
    /// moved since the last call; `None` before any exchange.
    fn take_moved(&mut self, degraded: bool) -> Option<Update> {
        let day = self.day?;
        let moved = std::mem::take(&mut self.moved);
        let keys = if moved.every {
            Shares::Every(
                (self.spent.keys())
                    .filter_map(|key| Some((key.clone(), self.share(key)?)))
                    .collect(),
            )
        } else {
            Shares::Moved(
                (moved.keys.into_iter())
                    .map(|key| {
                        let share = self.share(&key);
                        (key, share)
                    })
                    .collect(),
            )
        };
        Some(Update {
            day,
            replicas: self.replicas,
            degraded,
            keys,
        })
    }

    /// Settlement calls added `settled` (key, day, nano-dollars) to the
    /// fleet's counts after the last exchange.
    fn settled_since(&mut self, settled: &[(String, Date, u64)]) {
        let Some(day) = self.day else { return };
        for (key, on, nano_usd) in settled {
            if !self.spent.contains_key(key) {
                continue;
            }
            self.moved.key(key);
            let sums = self.settled.entry(key.clone()).or_default();
            for (at, period) in [Period::Daily, Period::Monthly].into_iter().enumerate() {
                if period.bounds(day) == period.bounds(*on) {
                    sums[at] = sums[at].saturating_add(*nano_usd);
                }
            }
        }
    }
}

/// What this replica spent after the exchange `remembered` left, while
/// Redis was away, by its ledger: settled again, so that the fleet's
/// counts have it once Redis answers (a replica stopped then loses its
/// queue, not its ledger). Days the exchange no longer keeps fields of
/// are left out.
fn unsent_before_start(remembered: &Remembered, ledger: &Ledger, today: Date) -> Vec<Settlement> {
    let oldest = today.checked_sub(time::Duration::days(8));
    if !remembered.degraded
        || today < remembered.day
        || oldest.is_none_or(|oldest| remembered.day < oldest)
    {
        return Vec::new();
    }
    let (first, last) = Period::Monthly.bounds(remembered.day);
    let mut unsent = Vec::new();
    for (key, share) in &remembered.keys {
        let spent = |from: Date, to: Date| ledger.own_spent(key, from, to);
        let counted = |at: usize| share.counted[at].saturating_add(share.settled[at]);
        let mut days: Vec<(Date, u64)> = std::iter::successors(Some(remembered.day), |day| {
            day.next_day().filter(|next| *next <= today)
        })
        .map(|day| (day, spent(day, day)))
        .collect();
        days[0].1 = days[0].1.saturating_sub(counted(0));
        // What days of the month before the exchange's settled after it.
        let in_month = days
            .iter()
            .filter(|(day, _)| *day <= last)
            .fold(0u64, |sum, (_, nano)| sum.saturating_add(*nano));
        let before = spent(first, last)
            .saturating_sub(counted(1))
            .saturating_sub(in_month);
        days[0].1 = days[0].1.saturating_add(before);
        unsent.extend(
            days.into_iter()
                .filter(|(_, nano)| *nano > 0)
                .map(|(day, nano_usd)| Settlement {
                    key: key.clone(),
                    reservation: None,
                    drawn: None,
                    nano_usd,
                    day,
                }),
        );
    }
    unsent
}

/// The file in the data_dir `Known` is kept in, and the ledger of this
/// replica's own spend beside it.
struct Remember {
    ledger: Arc<Ledger>,
    /// Locked by one write at a time, while it runs.
    kept: Arc<Mutex<Kept>>,
}

struct Kept {
    keeper: Keeper,
    /// When the last write began.
    written: Option<Instant>,
    failing: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Fleet {
    /// Connects lazily: the gateway starts, degraded, when Redis is away.
    /// `own_ledger`: a ledger in a data_dir that keeps this replica's own
    /// spend, where what exchanges learn of budgets is kept across
    /// restarts.
    pub fn connect(
        settings: &RedisState,
        own_ledger: Option<(PathBuf, Arc<Ledger>)>,
        degraded_gauge: IntGauge,
        replicas_gauge: IntGauge,
        admitted: &IntCounterVec,
    ) -> Result<Self, String> {
        let url = settings
            .url
            .as_ref()
            .ok_or("[state]: the config was validated without its secrets")?;
        let info = redis::IntoConnectionInfo::into_connection_info(url.expose())
            .map_err(|e| format!("[state] url: {}", e.category()))?
            // Admissions are small writes that wait on their answer:
            // Nagle's algorithm would hold one back behind another's ACK.
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let client = match &settings.tls {
            ClientTls {
                roots: Roots::System,
                identity: None,
            } => redis::Client::open(info),
            ClientTls { roots, identity } => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: identity.as_ref().map(|identity| redis::ClientTlsConfig {
                        client_cert: identity.cert_pem.to_vec(),
                        client_key: identity.key_pem.to_vec(),
                    }),
                    root_cert: match roots {
                        Roots::System => None,
                        Roots::File(ca) => Some(ca.pem.to_vec()),
                    },
                },
            ),
        }
        .map_err(|e| format!("[state] url: {}", e.category()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(SYNC_TIMEOUT))
            .set_response_timeout(Some(SYNC_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("[state] redis: {}", e.category()))?;
        let (admissions, admission_queue) = mpsc::unbounded_channel();
        let mut known = Known {
            replicas: 1,
            ..Known::default()
        };
        let mut pending = Pending::default();
        let remember = own_ledger.map(|(dir, ledger)| {
            let content = remembered::read(&dir);
            if let Some(content) = &content {
                pending.settle = unsent_before_start(content, &ledger, budget_today());
                if !pending.settle.is_empty() {
                    let nano_usd = pending.settle.iter().fold(0u64, |sum, s| sum.saturating_add(s.nano_usd));
                    tracing::info!(
                        usd = nano_usd as f64 / 1e9,
                        "spend this replica recorded while Redis was away, before it restarted, goes to the fleet's counts when Redis answers"
                    );
                }
                tracing::info!(
                    day = %content.day,
                    replicas = content.replicas,
                    keys = content.keys.len(),
                    "took up the fleet's budgets as this replica's last exchange left them; it spends its share of them until Redis answers"
                );
                known.day = Some(content.day);
                known.replicas = content.replicas;
                known.remembered = true;
                for (key, share) in &content.keys {
                    known.spent.insert(key.clone(), share.fleet);
                    known.counted.insert(key.clone(), share.counted);
                    known.settled.insert(key.clone(), share.settled);
                }
                replicas_gauge.set(i64::try_from(content.replicas).unwrap_or(i64::MAX));
            }
            Remember {
                ledger,
                kept: Arc::new(Mutex::new(Kept {
                    keeper: Keeper::new(dir, content),
                    written: None,
                    failing: false,
                })),
            }
        });
        Ok(Self {
            connection,
            admissions,
            admission_queue: Mutex::new(Some(admission_queue)),
            prefix: settings.prefix.clone(),
            spend_log: ["spend-version", "spend-changed"]
                .map(|k| format!("{}{k}", settings.prefix)),
            timeout: settings.timeout,
            lease: settings.lease,
            on_unavailable: settings.on_unavailable,
            replica: format!("{:016x}", fastrand::u64(..)),
            sequence: AtomicU64::new(0),
            sweep: AtomicUsize::new(0),
            degraded: AtomicBool::new(false),
            admit: Script::new(concat!(
                include_str!("lua/spend_log.lua"),
                include_str!("lua/admit.lua")
            )),
            sync: Script::new(concat!(
                include_str!("lua/spend_log.lua"),
                include_str!("lua/sync.lua")
            )),
            credits: Mutex::default(),
            pending: Mutex::new(pending),
            sending: tokio::sync::Mutex::new(()),
            settled: tokio::sync::Notify::new(),
            releases: AtomicBool::new(false),
            acknowledged: AtomicU64::new(0),
            known: Mutex::new(known),
            remember,
            prefixes: Mutex::default(),
            degraded_gauge,
            replicas_gauge,
            from_credit: admitted.with_label_values(&["credit"]),
            from_redis: admitted.with_label_values(&["redis"]),
        })
    }

    /// Resolves when a request's spend was queued since the last call:
    /// whether it releases a reservation held in Redis, which the fleet's
    /// next request on the key may be waiting for.
    pub async fn spend_queued(&self) -> bool {
        self.settled.notified().await;
        self.releases.swap(false, Ordering::AcqRel)
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    pub fn replicas(&self) -> u64 {
        lock(&self.known).replicas.max(1)
    }

    /// Where everything of API key `key` lives: its limits' cells, what
    /// its requests hold and what it spent (see `lua/admit.lua`).
    fn key_home(&self, key: &str) -> String {
        self.home(&format!("key:{key}"))
    }

    /// The sorted set of the lease expiries of a key's reservations.
    fn leases(home: &str) -> String {
        format!("{home}:leases")
    }

    fn pressure_key(&self, deployment: &str) -> String {
        format!("{}pressure:{deployment}", self.prefix)
    }

    /// The sorted set of the prompt blocks replicas routed to a
    /// deployment with prefix affinity.
    fn prefix_key(&self, deployment: &str) -> String {
        format!("{}prefix:{deployment}", self.prefix)
    }

    /// Queues the prompt blocks of a request routed to `deployment` with
    /// prefix affinity, for the next exchange to share; whether Redis
    /// answers or not, nothing waits on it.
    pub fn routed_prefix(&self, deployment: &str, blocks: &[Block]) {
        lock(&self.prefixes).queue(deployment, blocks);
    }

    /// Redis is away: the request path stops asking it until an exchange
    /// succeeds.
    fn unavailable(&self, why: &str) {
        if !self.degraded.swap(true, Ordering::AcqRel) {
            self.degraded_gauge.set(1);
            lock(&self.known).seeded = false;
            tracing::warn!(
                error = why,
                on_unavailable = ?self.on_unavailable,
                "the shared state (Redis) does not answer; serving on this replica's own state until it does"
            );
        }
    }

    async fn bounded<T>(
        &self,
        limit: Duration,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Option<T> {
        self.within(limit, call).await.ok().flatten()
    }

    /// `call`'s answer, `None` when it failed, or `Err` when Redis did not
    /// answer within `limit`; either counts Redis away.
    async fn within<T>(
        &self,
        limit: Duration,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<Option<T>, tokio::time::error::Elapsed> {
        match tokio::time::timeout(limit, call).await {
            Ok(Ok(value)) => Ok(Some(value)),
            Ok(Err(e)) => {
                self.unavailable(&e.to_string());
                Ok(None)
            }
            Err(elapsed) => {
                self.unavailable(&format!("no answer within {} ms", limit.as_millis()));
                Err(elapsed)
            }
        }
    }

    /// Takes a request from an owner's shared limits (`cells`: a request,
    /// and `tokens` of its prompt) and, for a key with a budget, reserves
    /// what it asks; all or nothing, from the owner's credit here or in
    /// one round trip, which a busy owner's also asks credit in.
    pub async fn admit(
        &self,
        cells: &SharedCells,
        tokens: u64,
        budget: Option<(&crate::config::Key, Ask, Date)>,
    ) -> Result<Admitted, Denied> {
        let acknowledged = self.acknowledged.load(Ordering::Acquire);
        let admitted = self.admit_once(cells, tokens, budget).await;
        // A budget held by reservations this replica has settled but whose
        // release had not reached Redis when it was asked is free once it
        // has: sent now if it is still unsent (or acknowledged since), the
        // request is asked for again, so a client that waits for each
        // answer is not told to retry. Held by another replica, it is
        // asked for again after the time that replica's release takes.
        if let (
            Err(Denied::Budget {
                limit,
                spent,
                held,
                needed,
                ..
            }),
            Some((key, ..)),
        ) = (&admitted, budget)
            && *held > 0
            && spent.saturating_add(*needed) <= *limit
        {
            let unsent = lock(&self.pending).settles_reservation_of(&key.name);
            // Boxed: rare, and each request's future would otherwise hold
            // room for all three.
            if unsent {
                Box::pin(self.settle_now()).await;
            } else if self.acknowledged.load(Ordering::Acquire) == acknowledged {
                Box::pin(tokio::time::sleep(HELD_RECHECK)).await;
            }
            return Box::pin(self.admit_once(cells, tokens, budget)).await;
        }
        admitted
    }

    async fn admit_once(
        &self,
        cells: &SharedCells,
        tokens: u64,
        budget: Option<(&crate::config::Key, Ask, Date)>,
    ) -> Result<Admitted, Denied> {
        if self.is_degraded() {
            return Err(Denied::Unavailable);
        }
        let terms = Terms {
            cells,
            tokens,
            budget: budget.as_ref().map(|(key, ask, today)| {
                let limit = |p: Period| p.limit(key).map_or(-1, |l| l.min(i64::MAX as u64) as i64);
                (
                    key.name.as_str(),
                    Budgeted {
                        limits: [limit(Period::Daily), limit(Period::Monthly)],
                        want: ask.want,
                        day: *today,
                    },
                )
            }),
        };
        let (units, credit) =
            match lock(&self.credits).draw(&terms, Instant::now(), || self.fresh_id()) {
                Draw::Taken(reservation) => {
                    self.from_credit.inc();
                    return Ok(Admitted { reservation });
                }
                Draw::Ask { units, id } => (units, id),
            };
        let id = terms.budget.map(|_| self.fresh_id());
        let asking = (units > 0).then(|| Asking {
            credits: &self.credits,
            home: &cells.home,
            answered: false,
        });
        let reply = self
            .ask_redis(&terms, budget.map(|b| b.1), id.as_deref(), units, &credit)
            .await;
        let at = |i: usize| reply.as_ref().and_then(|r| r.get(i).copied()).unwrap_or(0);
        if let Some(mut asking) = asking {
            asking.answered = true;
            let granted = if at(0) == 0 { at(2).max(0) as u64 } else { 0 };
            let mut credits = lock(&self.credits);
            if let Some(credit) = credits.granted(&terms, granted, credit, Instant::now())
                && let Some((key, _)) = terms.budget
            {
                lock(&self.pending)
                    .live
                    .entry(key.to_owned())
                    .or_default()
                    .insert(credit);
            }
        }
        if reply.is_none() {
            return Err(Denied::Unavailable);
        }
        self.from_redis.inc();
        let micros = |us: i64| u64::try_from(us).ok().map(Duration::from_micros);
        let per_minute = |cell: &Option<(String, u32)>| cell.as_ref().map_or(0, |c| c.1);
        match at(0) {
            0 => Ok(Admitted {
                reservation: id.map(|id| {
                    if let Some((key, _)) = terms.budget {
                        lock(&self.pending)
                            .live
                            .entry(key.to_owned())
                            .or_default()
                            .insert(id.clone());
                    }
                    (id, at(1).max(0) as u64)
                }),
            }),
            1 => Err(Denied::Rate(Refused {
                limit: Limit::Requests,
                per_minute: per_minute(&cells.requests),
                wait: micros(at(1)),
                full_in: micros(at(2)).unwrap_or_default(),
            })),
            2 => Err(Denied::Rate(Refused {
                limit: Limit::Tokens,
                per_minute: per_minute(&cells.tokens),
                wait: micros(at(1)),
                full_in: micros(at(2)).unwrap_or_default(),
            })),
            _ => Err(Denied::Budget {
                period: if at(1) == 2 {
                    Period::Monthly
                } else {
                    Period::Daily
                },
                limit: at(2).max(0) as u64,
                spent: at(3).max(0) as u64,
                held: at(4).max(0) as u64,
                needed: at(5).max(0) as u64,
            }),
        }
    }

    /// A reservation id no other replica's or request's shares.
    fn fresh_id(&self) -> String {
        format!(
            "{}:{}",
            self.replica,
            self.sequence.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// One admission in the next call of `lua/admit.lua`, reserving under
    /// `id` with a budget, and asking for `units` of credit whose budget
    /// is held under `credit`; `None` when Redis did not answer in time.
    async fn ask_redis(
        &self,
        terms: &Terms<'_>,
        ask: Option<Ask>,
        id: Option<&str>,
        units: u64,
        credit: &str,
    ) -> Option<Vec<i64>> {
        let cells = terms.cells;
        let cell = |c: &Option<(String, u32)>| c.clone().unwrap_or_default();
        let (rpm_field, rpm) = cell(&cells.requests);
        let (tpm_field, tpm) = cell(&cells.tokens);
        // A key's budget lives in the same home as its cells.
        let home = cells.home.clone();
        let leases = Self::leases(&home);
        let mut args = vec![
            rpm_field,
            rpm.to_string(),
            tpm_field,
            tpm.to_string(),
            terms.tokens.to_string(),
        ];
        match (terms.budget, ask, id) {
            (Some((_, budget)), Some(ask), Some(id)) => {
                let day = budget.day;
                args.extend([
                    period_field(Period::Daily, day),
                    budget.limits[0].to_string(),
                    period_field(Period::Monthly, day),
                    budget.limits[1].to_string(),
                    ask.want.to_string(),
                    ask.floor.to_string(),
                    id.to_owned(),
                    self.lease.as_micros().to_string(),
                ]);
            }
            _ => args.extend(["", "-1", "", "-1", "0", "0", "", "0"].map(str::to_owned)),
        }
        args.extend([credit.to_owned(), units.to_string()]);
        let (reply, answer) = oneshot::channel();
        let reservation =
            (terms.budget.zip(id)).map(|((key, _), id)| (key.to_owned(), id.to_owned()));
        let queued = Queued {
            keys: [home, leases],
            args,
            reply,
            reservation: reservation.clone(),
        };
        self.admissions.send(queued).ok()?;
        let mut awaited = Awaited {
            fleet: self,
            answer,
            reservation,
        };
        // Waiting includes a batch ahead of this one; the batch itself is
        // bounded by the timeout, and marks Redis away when it runs over.
        match tokio::time::timeout(self.timeout * 2, &mut awaited.answer).await {
            Ok(Ok(reply)) => reply,
            _ => None,
        }
    }

    /// What `key` spent in `period`, fleet-wide, as of the last exchange;
    /// `None` when that exchange was in another day or month than
    /// `today`'s, whose spend it does not know.
    pub fn spent(&self, key: &str, period: Period, today: Date) -> Option<u64> {
        let known = lock(&self.known);
        if period.bounds(known.day?) != period.bounds(today) {
            return None;
        }
        let spent = known.spent.get(key)?;
        Some(match period {
            Period::Daily => spent[0],
            Period::Monthly => spent[1],
        })
    }

    /// Sends queued admissions to Redis until the fleet is dropped: all
    /// that queued while the last call ran go in the next, as one script
    /// call (`lua/admit.lua`), so under load Redis and the replica spend
    /// one round trip on many requests. Started by the replica's
    /// exchange task.
    pub async fn admit_queued(&self) {
        let Some(mut queue) = lock(&self.admission_queue).take() else {
            return;
        };
        let mut batch = Vec::new();
        // Calls Redis did not answer in time, which it may still run: what
        // they reserved is released once it answers.
        let mut late = FuturesUnordered::new();
        loop {
            tokio::select! {
                received = queue.recv_many(&mut batch, MAX_BATCH) => {
                    if received == 0 {
                        return;
                    }
                }
                Some((reservations, replies)) = late.next() => {
                    self.answered_late(reservations, replies);
                    continue;
                }
            }
            let replies = if self.is_degraded() {
                None
            } else {
                let mut invocation = self.admit.prepare_invoke();
                invocation.key(&self.spend_log[0]).key(&self.spend_log[1]);
                for queued in &batch {
                    invocation.key(&queued.keys[0]).key(&queued.keys[1]);
                    for arg in &queued.args {
                        invocation.arg(arg);
                    }
                }
                let mut connection = self.connection.clone();
                let mut call = Box::pin(async move {
                    invocation
                        .invoke_async::<Vec<Vec<i64>>>(&mut connection)
                        .await
                });
                match self.within(self.timeout, call.as_mut()).await {
                    Ok(replies) => replies,
                    Err(_) => {
                        let reservations: Vec<_> =
                            batch.iter().map(|q| q.reservation.clone()).collect();
                        late.push(async move { (reservations, call.await) });
                        None
                    }
                }
                .filter(|replies| replies.len() == batch.len())
            };
            match replies {
                Some(replies) => {
                    for (queued, reply) in batch.drain(..).zip(replies) {
                        if let Err(Some(reply)) = queued.reply.send(Some(reply)) {
                            self.abandoned(queued.reservation, &reply);
                        }
                    }
                }
                None => {
                    for queued in batch.drain(..) {
                        let _ = queued.reply.send(None);
                    }
                }
            }
        }
    }

    /// Redis answered a call of admissions after the replica had stopped
    /// waiting for it and told each request it did not: the reservations
    /// it made are released, as no request will settle them.
    fn answered_late(
        &self,
        reservations: Vec<Option<(String, String)>>,
        replies: RedisResult<Vec<Vec<i64>>>,
    ) {
        let Ok(replies) = replies else { return };
        if replies.len() != reservations.len() {
            return;
        }
        let mut released = 0;
        for (reservation, reply) in reservations.into_iter().zip(replies) {
            if reservation.is_some() && reply.first() == Some(&0) {
                released += 1;
                self.abandoned(reservation, &reply);
            }
        }
        if released > 0 {
            tracing::info!(
                released,
                "Redis answered admissions after the replica had stopped waiting; the reservations they made are released"
            );
        }
    }

    /// Redis answered an admission whose request was cancelled meanwhile
    /// (its client left): a reservation it made is released now rather
    /// than held until its lease ends, as no request will settle it.
    fn abandoned(&self, reservation: Option<(String, String)>, reply: &[i64]) {
        let (Some((key, id)), Some(0)) = (reservation, reply.first()) else {
            return;
        };
        lock(&self.pending).settle.push(Settlement {
            key,
            reservation: Some(id),
            drawn: None,
            nano_usd: 0,
            day: budget_today(),
        });
        self.queued(true);
    }

    /// Wakes the sender for spend just queued; `releases`: it releases a
    /// reservation in Redis, sent at once.
    fn queued(&self, releases: bool) {
        if releases {
            self.releases.store(true, Ordering::Release);
        }
        self.settled.notify_one();
    }

    /// While Redis is away: a period's budget as this replica may use it,
    /// and what it counts as spent; `None` when it has nothing to go by
    /// (no exchange since it started and none remembered, or none since
    /// the key had a budget). Its share is what the fleet had left at the
    /// last exchange (spent and held), divided among the replicas seen in
    /// the minute before; spent is that base and what this replica spent
    /// since: what it has not sent, or, with the exchange remembered from
    /// before a restart, what its ledger has of its own beyond what the
    /// exchange counted. Of a period that began after the exchange the
    /// fleet had spent nothing, and only what its requests held may fall
    /// in it.
    pub fn local_budget(
        &self,
        key: &str,
        period: Period,
        limit: u64,
        today: Date,
    ) -> Option<(u64, u64)> {
        let (from, to) = period.bounds(today);
        let at = match period {
            Period::Daily => 0,
            Period::Monthly => 1,
        };
        let (base, since, replicas) = {
            let known = lock(&self.known);
            let day = known.day?;
            let fleet = known.spent.get(key)?;
            let (spent, counted) = if day < from {
                (0, 0)
            } else if day <= to {
                let counted = match known.counted.get(key) {
                    Some(counted) => counted[at],
                    None if known.remembered => return None,
                    None => 0,
                };
                (fleet[at], counted)
            } else {
                // The clock went back past the exchange.
                return None;
            };
            let since = match &self.remember {
                Some(remember) if known.remembered => Some(
                    remember
                        .ledger
                        .own_spent(key, from, to)
                        .saturating_sub(counted),
                ),
                _ => None,
            };
            (spent.saturating_add(fleet[2]), since, known.replicas.max(1))
        };
        let since = since.unwrap_or_else(|| lock(&self.pending).unsent(key, from, to));
        let share = limit.saturating_sub(base) / replicas;
        Some((base.saturating_add(share), base.saturating_add(since)))
    }

    /// Where this replica's share of budgets comes from while Redis is
    /// away: `exchanged` (an exchange since it started), `remembered`
    /// (one before it started, kept in its data_dir) or `none`.
    pub fn budget_share(&self) -> &'static str {
        let known = lock(&self.known);
        match (known.day, known.remembered) {
            (None, _) => "none",
            (Some(_), true) => "remembered",
            (Some(_), false) => "exchanged",
        }
    }

    /// Keeps what the exchanges learned of budgets in the data_dir, when
    /// it changed since last written: at most every `REMEMBER_EVERY`, or
    /// at once when Redis is away (`now`) or answers again. What moved
    /// meanwhile waits in `Known`.
    async fn remember(&self, now: bool) {
        let Some(remember) = &self.remember else {
            return;
        };
        let degraded = self.is_degraded();
        {
            let mut kept = match remember.kept.try_lock() {
                Ok(kept) => kept,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                // A write under way: what moved waits for the next call.
                Err(TryLockError::WouldBlock) => return,
            };
            // A file that says Redis is away has a restart send again
            // what was spent since: it is replaced as soon as Redis
            // took that spend.
            let recent = (kept.written).is_some_and(|at| at.elapsed() < REMEMBER_EVERY);
            if recent && !now && !kept.keeper.degraded() {
                return;
            }
            let Some(update) = lock(&self.known).take_moved(degraded) else {
                return;
            };
            if !kept.keeper.take(update) {
                return;
            }
            kept.written = Some(Instant::now());
        }
        let kept = remember.kept.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let kept = &mut *lock(&kept);
            match kept.keeper.write() {
                Ok(()) => kept.failing = false,
                Err(e) => {
                    if !std::mem::replace(&mut kept.failing, true) {
                        tracing::warn!(
                            file = %kept.keeper.path().display(),
                            error = %e,
                            "cannot keep the fleet's budgets in the data_dir; a restart while Redis is away refuses budgeted requests until it answers"
                        );
                    }
                }
            }
        })
        .await;
    }

    /// One exchange with the fleet (see `lua/sync.lua`): what is queued
    /// here goes out, what the fleet knows comes back.
    /// `ledger` has the spend a store that lost its data is seeded with.
    pub async fn exchange(&self, ask: SyncAsk, today: Date, ledger: &Ledger) -> Option<SyncReply> {
        // To seed: what the store said each key had spent today before it
        // went away or lost its data, and what the ledger has.
        let reading = {
            let known = lock(&self.known);
            let mut reading = known.reading(&ask.budgets, today);
            reading.seeds = (!known.seeded).then(|| {
                ask.budgets
                    .iter()
                    .map(|key| {
                        let last = known.spent.get(key).filter(|_| known.day == Some(today));
                        let last = last.map_or([0, 0], |s| [s[0], s[1]]);
                        let spent = |period| budget_spent_in(ledger, key, period, today);
                        Seed {
                            last,
                            ledger: [spent(Period::Daily), spent(Period::Monthly)],
                        }
                    })
                    .collect()
            });
            reading
        };
        let (unsent, prefixes) = {
            let mut queued = lock(&self.prefixes);
            let unsent = queued.take();
            let wire = queued.wire(&unsent, &ask.prefixes, ask.prefix_blocks, |d| {
                self.prefix_key(d)
            });
            (unsent, wire)
        };
        let Some((reply, counted)) = self.send(&ask, Some(&prefixes), today, &reading).await else {
            lock(&self.prefixes).restore(unsent);
            self.remember(true).await;
            return None;
        };
        if let Ok(at) = reply.prefix_at.parse() {
            lock(&self.prefixes).read(&ask.prefixes, at);
        }
        if reply.lost {
            // Redis answers but lost its data: the next exchange seeds the
            // spend counters before anything is added to them.
            let mut known = lock(&self.known);
            known.seeded = false;
            known.position = None;
            drop(known);
            lock(&self.prefixes).restore(unsent);
            tracing::warn!(
                "the shared state (Redis) lost its data; the next exchange seeds its spend counters from what the fleet last knew"
            );
            return None;
        }
        {
            let homes = self.key_home("");
            let mut known = lock(&self.known);
            known.take_up(&ask.budgets, &reading, &reply, counted, |hash| {
                hash.strip_prefix(&homes)
            });
            known.seeded = true;
            known.day = Some(today);
            known.remembered = false;
        }
        self.replicas_gauge.set(reply.replicas as i64);
        if self.degraded.swap(false, Ordering::AcqRel) {
            self.degraded_gauge.set(0);
            tracing::info!(
                "the shared state (Redis) answers again; spend recorded meanwhile is added to the fleet's"
            );
        }
        self.remember(false).await;
        let pressure = reply
            .pressure
            .into_iter()
            .map(|seen| seen.seen(&self.replica))
            .collect();
        let blocks = reply
            .blocks
            .iter()
            .map(|hex| prefixes::hashes(hex).unwrap_or_default())
            .collect();
        Some(SyncReply {
            replicas: reply.replicas,
            pressure,
            blocks,
        })
    }

    /// Merges this replica's sketch of `month`'s Llama end users into the
    /// fleet's (`users`), and returns the fleet's registers; `None` when
    /// Redis did not answer.
    pub async fn merge_users(&self, month: &str, registers: &[u8]) -> Option<Vec<u8>> {
        let fleet = format!("{}users:{month}", self.prefix);
        let mine = format!("{}users:{month}:{}", self.prefix, self.replica);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .set(&mine, users::encode(registers))
            .ignore()
            .cmd("PFMERGE")
            .arg(&fleet)
            .arg(&mine)
            .ignore()
            .del(&mine)
            .ignore()
            // A month's sketch outlives the month by a few days.
            .expire(&fleet, users::KEEP.as_secs() as i64)
            .ignore()
            .get(&fleet);
        let mut connection = self.connection.clone();
        let (merged,): (Vec<u8>,) = self
            .bounded(SYNC_TIMEOUT, pipe.query_async(&mut connection))
            .await?;
        users::decode(&merged)
    }

    /// Sends the spend queued here now, rather than at the next exchange:
    /// a request's reservation is released as soon as its cost is known.
    /// Left to the exchange while Redis is away or not yet seeded.
    pub async fn settle_now(&self) {
        if self.is_degraded() || !lock(&self.known).seeded {
            return;
        }
        let _ = self
            .send(
                &SyncAsk::default(),
                None,
                budget_today(),
                &Reading::default(),
            )
            .await;
    }

    /// One call of `lua/sync.lua`, one at a time, so batches reach Redis
    /// in the order of their numbers. Prefix memory travels in the
    /// periodic exchange only. With the reply (when `remember`), what the
    /// counts it brings hold of this replica's ledger, for the keys where
    /// that may have moved.
    async fn send(
        &self,
        ask: &SyncAsk,
        prefixes: Option<&WirePrefixes>,
        today: Date,
        reading: &Reading,
    ) -> Option<(WireReply, Vec<(String, [u64; 2])>)> {
        let _turn = self.sending.lock().await;
        // Keys this replica's settlement calls added spend of since the
        // last exchange (only kept with `remember`).
        let settled: Vec<String> = if prefixes.is_some() {
            lock(&self.known).settled.keys().cloned().collect()
        } else {
            Vec::new()
        };
        let payload = {
            let mut credits = lock(&self.credits);
            let released = credits.release(Instant::now(), today, self.is_degraded());
            let mut pending = lock(&self.pending);
            drop(credits);
            for credit in released {
                for (field, per_minute, cells) in credit.refunds {
                    let cells = i64::try_from(cells).unwrap_or(i64::MAX);
                    charge(&mut pending, &credit.home, &field, per_minute, -cells);
                }
                if let Some((key, id)) = credit.reservation {
                    if let Some(ids) = pending.live.get_mut(&key) {
                        ids.remove(&id);
                    }
                    pending.settle.push(Settlement {
                        key,
                        reservation: Some(id),
                        drawn: None,
                        nano_usd: 0,
                        day: today,
                    });
                }
            }
            if !pending.settle.is_empty() || !pending.charge.is_empty() {
                pending.next_batch += 1;
                let batch = Batch {
                    number: pending.next_batch,
                    settle: std::mem::take(&mut pending.settle),
                    charge: std::mem::take(&mut pending.charge),
                };
                pending.unsent.push(batch);
            }
            self.payload(&mut pending, ask, prefixes, today, reading, &settled)
        };
        let mut connection = self.connection.clone();
        let mut invocation = self.sync.key(&self.spend_log[0]);
        invocation
            .key(&self.spend_log[1])
            .key(format!("{}replicas", self.prefix))
            .key(format!("{}applied:{}", self.prefix, self.replica))
            .arg(payload.text);
        let reply: Option<String> = self
            .bounded(SYNC_TIMEOUT, invocation.invoke_async(&mut connection))
            .await;
        let Some(reply) = reply.and_then(|r| serde_json::from_str::<WireReply>(&r).ok()) else {
            self.unavailable("the exchange failed");
            if payload.renewed {
                lock(&self.pending).renewed = None;
            }
            return None;
        };
        // A store that lost its data applied nothing.
        if !reply.lost {
            let mut pending = lock(&self.pending);
            // An exchange's reply counts its batches; between exchanges,
            // what settlement calls added is kept beside the last one's.
            let exchanged = prefixes.is_some();
            let settled: Vec<(String, Date, u64)> = if self.remember.is_some() && !exchanged {
                pending
                    .unsent
                    .iter()
                    .filter(|b| b.number <= payload.last_batch)
                    .flat_map(|b| &b.settle)
                    .filter(|s| s.nano_usd > 0)
                    .map(|s| (s.key.clone(), s.day, s.nano_usd))
                    .collect()
            } else {
                Vec::new()
            };
            pending.unsent.retain(|b| b.number > payload.last_batch);
            drop(pending);
            self.acknowledged
                .fetch_max(payload.last_batch, Ordering::AcqRel);
            // Within this call's turn, so that no settlement call's answer
            // comes between.
            if exchanged {
                let known = &mut *lock(&self.known);
                for key in known.settled.drain().map(|(key, _)| key) {
                    known.moved.key(&key);
                }
            } else if !settled.is_empty() {
                lock(&self.known).settled_since(&settled);
            }
        }
        Some((reply, payload.counted))
    }

    /// The JSON `sync.lua` reads: every unacknowledged batch, and what
    /// the exchange asks.
    fn payload(
        &self,
        pending: &mut Pending,
        ask: &SyncAsk,
        prefixes: Option<&WirePrefixes>,
        today: Date,
        reading: &Reading,
        settled: &[String],
    ) -> Payload {
        let renew_due = pending
            .renewed
            .is_none_or(|at| at.elapsed() >= self.lease / 3);
        let renew: Vec<Vec<String>> = if renew_due && !ask.pull.is_empty() {
            pending.renewed = Some(Instant::now());
            pending
                .live
                .iter()
                .filter(|(_, ids)| !ids.is_empty())
                .map(|(key, ids)| {
                    let mut row = vec![Self::leases(&self.key_home(key))];
                    row.extend(ids.iter().cloned());
                    row
                })
                .collect()
        } else {
            Vec::new()
        };
        // Spend counters Redis lost start again from the most the fleet
        // is known to have spent: the ledger less what is about to be
        // added to them, or what the store last said, which has none of it.
        let seed: Vec<serde_json::Value> = match &reading.seeds {
            Some(seeds) => ask
                .budgets
                .iter()
                .zip(seeds)
                .flat_map(|(key, seed)| {
                    let home = self.key_home(key);
                    [(0, Period::Daily), (1, Period::Monthly)].map(|(at, period)| {
                        let (from, to) = period.bounds(today);
                        let ledger = seed.ledger[at].saturating_sub(pending.unsent(key, from, to));
                        let base = ledger.max(seed.last[at]);
                        json!([home, period_field(period, today), base.to_string()])
                    })
                })
                .collect(),
            None => Vec::new(),
        };
        let batches: Vec<serde_json::Value> = pending
            .unsent
            .iter()
            .map(|b| {
                // One entry per key and day: its spend in one sum, what
                // it drew on each credit, and the reservations it
                // releases.
                let mut groups: HashMap<(&str, Date), Group<'_>> = HashMap::new();
                for s in &b.settle {
                    let group = groups.entry((&s.key, s.day)).or_default();
                    group.cost = group.cost.saturating_add(s.nano_usd);
                    group.released.extend(s.reservation.as_deref());
                    if let Some(credit) = &s.drawn {
                        let drawn = group.drawn.entry(credit).or_default();
                        *drawn = drawn.saturating_add(s.nano_usd);
                    }
                }
                let settle: Vec<serde_json::Value> = groups
                    .into_iter()
                    .map(|((key, day), group)| {
                        let home = self.key_home(key);
                        let leases = Self::leases(&home);
                        let mut entry = vec![
                            json!(home),
                            json!(leases),
                            json!(period_field(Period::Daily, day)),
                            json!(period_field(Period::Monthly, day)),
                            json!(group.cost.to_string()),
                            json!(group.drawn.len()),
                        ];
                        for (credit, drawn) in group.drawn {
                            entry.extend([json!(credit), json!(drawn.to_string())]);
                        }
                        entry.extend(group.released.into_iter().map(|id| json!(id)));
                        serde_json::Value::Array(entry)
                    })
                    .collect();
                let charge: Vec<serde_json::Value> = b
                    .charge
                    .iter()
                    .flat_map(|(home, cells)| {
                        cells.iter().filter(|(_, (_, tokens))| *tokens != 0).map(
                            move |(field, (per_minute, tokens))| {
                                json!([home, field, per_minute, tokens])
                            },
                        )
                    })
                    .collect();
                json!({"number": b.number, "settle": settle, "charge": charge})
            })
            .collect();
        let push: Vec<WirePush> = ask
            .push
            .iter()
            .map(|(deployment, p)| WirePush::of(self.pressure_key(deployment), p))
            .collect();
        let pull: Vec<String> = ask.pull.iter().map(|d| self.pressure_key(d)).collect();
        // The keys `reading` names are read, and the keys changed since
        // its position. Expired leases are released and past periods'
        // fields dropped of the keys swept: those this replica settles or
        // holds reservations of, and a slice of the rest in turn, each
        // swept once every `n / SWEEP` exchanges. A key in use is swept by
        // the replicas using it. Settlement calls, which carry no budgets,
        // sweep nothing.
        let n = ask.budgets.len();
        let from = self.sweep.fetch_add(SWEEP, Ordering::Relaxed) % n.max(1);
        let in_use = (pending.unsent.iter())
            .flat_map(|b| b.settle.iter().map(|s| s.key.as_str()))
            .chain(pending.live.keys().map(String::as_str))
            .filter(|_| n > 0);
        let swept: HashSet<&str> = in_turn(n, from)
            .map(|i| ask.budgets[i].as_str())
            .chain(in_use)
            .collect();
        let sweep: Vec<[String; 2]> = (swept.into_iter())
            .map(|key| {
                let home = self.key_home(key);
                let leases = Self::leases(&home);
                [home, leases]
            })
            .collect();
        let read: Vec<String> = (reading.read.iter())
            .map(|&i| self.key_home(&ask.budgets[i]))
            .collect();
        let mut text = json!({
            "replica": self.replica,
            "lease": self.lease.as_micros() as u64,
            "seed": seed,
            "seeding": reading.seeds.is_some(),
            "batches": batches,
            "renew": renew,
            "push": push,
            "pull": pull,
            "read": read,
            "sweep": sweep,
            "fields": [period_field(Period::Daily, today), period_field(Period::Monthly, today)],
            "stale": stale_fields(today),
        });
        // Absent, not null: Lua reads JSON's null as true.
        if let Some(since) = &reading.since {
            text["since"] = json!(since);
        }
        if let Some(prefixes) = prefixes {
            text["prefix"] = json!(prefixes);
        }
        let text = text.to_string();
        // Of this replica's ledger, what the fleet's counts hold moves only
        // as its settlements reach them: it is taken again for the keys
        // read whatever changed, those settled in this call and those
        // settlement calls added to since the last exchange. Read while
        // `pending` is locked and every settlement queued is in this
        // call's batches: of the ledger's spend, only what requests
        // recorded in the instant before they settle is beyond them.
        let counted = match &self.remember {
            Some(remember) if prefixes.is_some() => {
                let mut keys: HashSet<&str> = (reading.read.iter())
                    .map(|&i| ask.budgets[i].as_str())
                    .chain(settled.iter().map(String::as_str))
                    .collect();
                keys.extend(
                    (pending.unsent.iter())
                        .flat_map(|b| &b.settle)
                        .filter(|s| s.nano_usd > 0)
                        .map(|s| s.key.as_str()),
                );
                keys.into_iter()
                    .map(|key| {
                        let spent = [Period::Daily, Period::Monthly].map(|period| {
                            let (from, to) = period.bounds(today);
                            remember.ledger.own_spent(key, from, to)
                        });
                        (key.to_owned(), spent)
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        Payload {
            text,
            last_batch: pending.unsent.last().map_or(0, |b| b.number),
            renewed: !renew.is_empty(),
            counted,
        }
    }
}

/// A key's settlements of one day in one batch.
#[derive(Default)]
struct Group<'a> {
    cost: u64,
    /// Per credit drawn on, what its requests cost.
    drawn: HashMap<&'a str, u64>,
    released: Vec<&'a str>,
}

/// One exchange's JSON, and what to do once Redis acknowledges it.
struct Payload {
    text: String,
    /// Batches up to this number are applied once it answers.
    last_batch: u64,
    renewed: bool,
    /// Per key whose share of the fleet's counts may have moved, the
    /// day's and month's spend in this replica's ledger as the batches
    /// were taken.
    counted: Vec<(String, [u64; 2])>,
}

/// What a store that lost its data is seeded with, per key: the day's and
/// month's spend the last exchange read, and the ledger's.
#[derive(Debug, PartialEq)]
struct Seed {
    last: [u64; 2],
    ledger: [u64; 2],
}

impl SharedSpend for Fleet {
    fn spent(&self, key: &str, reservation: Option<&str>, held: u64, nano_usd: u64, day: Date) {
        // The credit's lock is held while the spend is queued: a credit
        // released once its last request settled is released after it.
        let mut credits = lock(&self.credits);
        let drawn = reservation
            .filter(|id| credits.settled(id, held, nano_usd))
            .map(str::to_owned);
        let mut pending = lock(&self.pending);
        let reservation = reservation.filter(|_| drawn.is_none());
        if let Some(id) = reservation
            && let Some(ids) = pending.live.get_mut(key)
        {
            ids.remove(id);
        }
        if reservation.is_none() && nano_usd == 0 {
            return;
        }
        pending.settle.push(Settlement {
            key: key.to_owned(),
            reservation: reservation.map(str::to_owned),
            drawn,
            nano_usd,
            day,
        });
        drop(pending);
        drop(credits);
        self.queued(reservation.is_some());
    }
}

/// Adds `delta` cells to what a replica charges a shared limit's cell
/// (`field` of `home`, `per_minute` its quota) in its next batch.
fn charge(pending: &mut Pending, home: &str, field: &str, per_minute: u32, delta: i64) {
    // Named once per cell, not per charge.
    let cells = match pending.charge.get_mut(home) {
        Some(cells) => cells,
        None => pending.charge.entry(home.to_owned()).or_default(),
    };
    match cells.get_mut(field) {
        Some(entry) => entry.1 = entry.1.saturating_add(delta),
        None => {
            cells.insert(field.to_owned(), (per_minute, delta));
        }
    }
}

impl SharedTokens for Fleet {
    fn home(&self, owner: &str) -> String {
        format!("{}{owner}", self.prefix)
    }

    fn tokens(&self, home: &str, field: &str, per_minute: u32, delta: i64) {
        if self.is_degraded() {
            return;
        }
        charge(&mut lock(&self.pending), home, field, per_minute, delta);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use prometheus::Opts;
    use time::macros::date;

    use super::*;

    /// A replica whose Redis is nowhere, on a ledger in `dir`.
    fn unreachable(dir: &std::path::Path, ledger: &Arc<Ledger>) -> Fleet {
        let settings = RedisState {
            url: Some(crate::config::Secret::new("redis://127.0.0.1:1/0".into())),
            prefix: "t:".into(),
            timeout: Duration::from_millis(50),
            on_unavailable: OnUnavailable::Local,
            lease: Duration::from_secs(30),
            tls: ClientTls::default(),
        };
        let gauge = || IntGauge::new("g", "g").unwrap();
        let admitted = IntCounterVec::new(Opts::new("a", "a"), &["from"]).unwrap();
        let own = Some((dir.to_owned(), ledger.clone()));
        Fleet::connect(&settings, own, gauge(), gauge(), &admitted).unwrap()
    }

    #[test]
    fn every_budgeted_key_is_swept_within_its_share_of_the_exchanges() {
        for n in [1_usize, 2, 255, 256, 257, 1_000, 10_000] {
            for start in [0, 7, 12_345] {
                // As `payload` takes it: the cursor moves on by SWEEP.
                let exchanges = n.div_ceil(SWEEP);
                let mut swept = vec![0; n];
                for e in 0..exchanges {
                    let from = (start + e * SWEEP) % n;
                    for i in in_turn(n, from) {
                        swept[i] += 1;
                    }
                }
                assert!(swept.iter().all(|&t| t >= 1), "{n} keys from {start}");
                if n <= SWEEP {
                    assert!(swept.iter().all(|&t| t == exchanges), "every exchange");
                }
            }
        }
    }

    /// A reply of `sync.lua`: `spent` per key read, `changed` per hash
    /// changed, at log position `n` of epoch "e".
    fn reply(
        replicas: u64,
        spent: &[u64],
        changed: &[(&str, u64)],
        n: u64,
        reset: bool,
    ) -> WireReply {
        let spent: Vec<[String; 3]> = spent
            .iter()
            .map(|s| [s.to_string(), s.to_string(), "1".into()])
            .collect();
        let changed: Vec<[String; 4]> = (changed.iter())
            .map(|(hash, s)| [(*hash).to_owned(), s.to_string(), s.to_string(), "2".into()])
            .collect();
        serde_json::from_value(json!({
            "replicas": replicas, "pressure": [], "spent": spent, "changed": changed,
            "reset": reset, "version": ["e", n.to_string()],
        }))
        .unwrap()
    }

    fn names(keys: &[&str]) -> Arc<[String]> {
        keys.iter().map(|k| (*k).to_owned()).collect()
    }

    /// `known` after an exchange of `budgets` on `today` that read `reply`.
    fn exchanged(known: &mut Known, budgets: &Arc<[String]>, today: Date, reply: &WireReply) {
        let reading = known.reading(budgets, today);
        known.take_up(budgets, &reading, reply, Vec::new(), |hash| {
            hash.strip_prefix("t:key:")
        });
        known.seeded = true;
        known.day = Some(today);
    }

    /// The keys `known` names as moved since this was last called, in
    /// order; `None`: every key.
    fn moved(known: &mut Known) -> Option<Vec<String>> {
        match known.take_moved(false).unwrap().keys {
            Shares::Every(_) => None,
            Shares::Moved(keys) => {
                let mut keys: Vec<String> = keys.into_iter().map(|(key, _)| key).collect();
                keys.sort();
                Some(keys)
            }
        }
    }

    #[test]
    fn an_exchange_reads_every_key_only_when_it_cannot_go_by_what_changed() {
        let today = date!(2026 - 12 - 07);
        let budgets = names(&["a", "b", "c"]);
        let mut known = Known {
            replicas: 1,
            ..Known::default()
        };
        let everything = Reading {
            since: None,
            read: vec![0, 1, 2],
            seeds: None,
        };
        assert_eq!(known.reading(&budgets, today), everything, "at start");
        exchanged(
            &mut known,
            &budgets,
            today,
            &reply(1, &[10, 20, 30], &[], 7, false),
        );
        assert_eq!(known.spent["b"], [20, 20, 1]);
        let since = Some(["e".to_owned(), "7".to_owned()]);
        let changes = Reading {
            since: since.clone(),
            read: Vec::new(),
            seeds: None,
        };
        assert_eq!(known.reading(&budgets, today), changes, "what changed only");
        // `b` changed, and a hash this replica does not budget.
        let delta = reply(1, &[], &[("t:key:b", 25), ("t:key:x", 99)], 9, false);
        exchanged(&mut known, &budgets, today, &delta);
        assert_eq!(known.spent["a"], [10, 10, 1], "unchanged");
        assert_eq!(known.spent["b"], [25, 25, 2]);
        assert!(!known.spent.contains_key("x"));
        // What the data_dir keeps is taken of the keys that moved only.
        assert_eq!(
            moved(&mut known),
            None,
            "every key, after reading every one"
        );
        exchanged(&mut known, &budgets, today, &reply(1, &[], &[], 9, false));
        let same = reply(1, &[], &[("t:key:b", 25), ("t:key:x", 1)], 10, false);
        exchanged(&mut known, &budgets, today, &same);
        assert_eq!(moved(&mut known), Some(vec![]), "nothing moved");
        let b_moved = reply(1, &[], &[("t:key:b", 26)], 11, false);
        exchanged(&mut known, &budgets, today, &b_moved);
        assert_eq!(moved(&mut known), Some(vec!["b".to_owned()]));
        // A reload that changes no budget: nothing new.
        let same = known.reading(&names(&["a", "b", "c"]), today);
        assert!(same.since.is_some() && same.read.is_empty());
        // A reload budgets `d` and no longer `a`: `d` alone is read.
        let reloaded = names(&["b", "c", "d"]);
        let reading = known.reading(&reloaded, today);
        assert_eq!(reading.read, [2]);
        exchanged(
            &mut known,
            &reloaded,
            today,
            &reply(1, &[40], &[], 9, false),
        );
        let mut keys: Vec<&String> = known.spent.keys().collect();
        keys.sort();
        assert_eq!(keys, ["b", "c", "d"]);
        assert_eq!(known.spent["d"], [40, 40, 1]);
        assert_eq!(moved(&mut known), Some(vec!["a".into(), "d".into()]));
        // Every key again: on the next day, while seeding, after a log
        // that began anew, and when replicas came or went.
        let tomorrow = date!(2026 - 12 - 08);
        assert_eq!(known.reading(&reloaded, tomorrow).since, None);
        known.seeded = false;
        assert_eq!(known.reading(&reloaded, today).since, None);
        known.seeded = true;
        assert!(known.reading(&reloaded, today).since.is_some());
        exchanged(
            &mut known,
            &reloaded,
            today,
            &reply(1, &[], &[("t:key:c", 3)], 2, true),
        );
        assert_eq!(known.spent["b"], [0; 3], "not in the new log: nothing");
        assert_eq!(known.spent["c"], [3, 3, 2]);
        assert_eq!(known.reading(&reloaded, today).since, None);
        exchanged(
            &mut known,
            &reloaded,
            today,
            &reply(1, &[1, 2, 3], &[], 3, false),
        );
        assert!(known.reading(&reloaded, today).since.is_some());
        exchanged(&mut known, &reloaded, today, &reply(2, &[], &[], 4, false));
        assert_eq!(
            known.reading(&reloaded, today).since,
            None,
            "a second replica"
        );
    }

    #[tokio::test]
    async fn a_request_cancelled_while_it_asks_for_credit_lets_the_next_ask() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(Ledger::open(None).unwrap());
        let fleet = unreachable(dir.path(), &ledger);
        let cells = SharedCells {
            home: "t:key:a".into(),
            requests: Some(("rpm:600".into(), 600)),
            tokens: None,
        };
        let terms = Terms {
            cells: &cells,
            tokens: 10,
            budget: None,
        };
        let asks =
            |fleet: &Fleet| match lock(&fleet.credits).draw(&terms, Instant::now(), String::new) {
                Draw::Ask { units, .. } => units,
                Draw::Taken(_) => panic!("no credit was granted"),
            };
        // Busy enough to ask for credit from the fourth admission on; each
        // waits for Redis (nothing sends the queue here) until its client
        // leaves.
        for _ in 0..4 {
            let admit = fleet.admit(&cells, 10, None);
            assert!(
                tokio::time::timeout(Duration::from_millis(5), admit)
                    .await
                    .is_err()
            );
        }
        assert!(asks(&fleet) > 0, "the next admission asks again");
    }

    #[tokio::test]
    async fn a_reservation_answered_to_a_request_cancelled_before_it_took_it_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(Ledger::open(None).unwrap());
        let fleet = unreachable(dir.path(), &ledger);
        let mut queue = lock(&fleet.admission_queue).take().unwrap();
        let key = crate::config::Key {
            name: "team".into(),
            sha256: [0; 32],
            models: crate::config::AllowedModels::All,
            region: None,
            region_header: false,
            budget: crate::config::Budget {
                daily_nano_usd: Some(1_000_000),
                monthly_nano_usd: None,
            },
            limits: crate::config::PerMinute::default(),
            metrics: false,
        };
        let cells = SharedCells {
            home: "t:key:team".into(),
            requests: None,
            tokens: None,
        };
        let ask = Ask {
            want: 500,
            floor: 500,
        };
        let mut admit = Box::pin(fleet.admit(&cells, 10, Some((&key, ask, budget_today()))));
        assert!(futures_util::poll!(admit.as_mut()).is_pending());
        let queued = queue.recv().await.unwrap();
        let id = queued.reservation.clone().unwrap().1;
        // Redis reserved, and its answer reached the request, which its
        // client left before it was polled again.
        queued.reply.send(Some(vec![0, 500, 0])).unwrap();
        drop(admit);
        let pending = lock(&fleet.pending);
        assert!(pending.settles_reservation_of("team"));
        assert_eq!(pending.settle[0].reservation.as_deref(), Some(id.as_str()));
        assert!(fleet.releases.load(Ordering::Acquire), "sent at once");
    }

    #[tokio::test]
    async fn a_payload_names_only_the_keys_read_and_swept() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(Ledger::open(None).unwrap());
        let fleet = unreachable(dir.path(), &ledger);
        let today = date!(2026 - 12 - 07);
        let ask = SyncAsk {
            budgets: (0..1_000).map(|i| format!("key-{i}")).collect(),
            ..SyncAsk::default()
        };
        let named = |reading: &Reading| {
            let text = fleet
                .payload(&mut Pending::default(), &ask, None, today, reading, &[])
                .text;
            let payload: serde_json::Value = serde_json::from_str(&text).unwrap();
            let count = |field: &str| payload[field].as_array().unwrap().len();
            (
                count("read"),
                count("sweep"),
                text.matches("t:key:").count(),
            )
        };
        let since = Some(["e".to_owned(), "7".to_owned()]);
        let changes = Reading {
            since: since.clone(),
            read: vec![999],
            seeds: None,
        };
        // A home and its leases per key swept, and the home of the one read.
        assert_eq!(named(&changes), (1, SWEEP, 2 * SWEEP + 1));
        let everything = Reading {
            since: None,
            read: (0..1_000).collect(),
            seeds: None,
        };
        assert_eq!(named(&everything), (1_000, SWEEP, 2 * SWEEP + 1_000));
        // A settlement call, with reservations held, reads and sweeps
        // nothing.
        let mut pending = Pending::default();
        pending
            .live
            .insert("key-7".into(), HashSet::from(["r".to_owned()]));
        let settling = SyncAsk::default();
        let text = (fleet.payload(
            &mut pending,
            &settling,
            None,
            today,
            &Reading::default(),
            &[],
        ))
        .text;
        let payload: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (payload["read"].to_string(), payload["sweep"].to_string()),
            ("[]".into(), "[]".into())
        );
    }

    /// `team` spent `nano_usd` on `day`, in `ledger`.
    fn spend(ledger: &Ledger, day: Date, nano_usd: u64) {
        let row = crate::ledger::Row {
            day,
            key: "team".into(),
            model: "m".into(),
            deployment: "d".into(),
            api: "chat".into(),
        };
        let totals = crate::ledger::Totals {
            cost_nano_usd: nano_usd,
            ..Default::default()
        };
        ledger.record(row, totals);
    }

    #[tokio::test]
    async fn a_restarted_replica_takes_the_share_it_had_and_counts_what_it_spent_since() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(Ledger::open(None).unwrap());
        let (today, yesterday) = (date!(2026 - 12 - 07), date!(2026 - 12 - 06));
        // Its ledger has 16 today and 40 this month.
        spend(&ledger, date!(2026 - 12 - 01), 24);
        spend(&ledger, today, 16);
        let fresh = unreachable(dir.path(), &ledger);
        assert_eq!(fresh.budget_share(), "none");
        assert_eq!(
            fresh.local_budget("team", Period::Daily, 100, today),
            None,
            "nothing to go by"
        );
        // The last exchange: the fleet had spent 20 today and 50 this
        // month, its requests held 4; 10 and 30 of it were this replica's.
        let remembered = |day| Remembered {
            day,
            replicas: 2,
            degraded: false,
            keys: BTreeMap::from([(
                "team".to_owned(),
                KeyShare {
                    fleet: [20, 50, 4],
                    counted: [10, 30],
                    settled: [0, 0],
                },
            )]),
        };
        remembered::write(dir.path(), &remembered(today)).unwrap();
        let restarted = unreachable(dir.path(), &ledger);
        assert_eq!(restarted.budget_share(), "remembered");
        assert_eq!(restarted.replicas(), 2);
        // 6 of today's and 10 of the month's were spent since.
        let daily = restarted.local_budget("team", Period::Daily, 100, today);
        assert_eq!(daily, Some((24 + 38, 24 + 6)), "half of the 76 left");
        let monthly = restarted.local_budget("team", Period::Monthly, 1_000, today);
        assert_eq!(monthly, Some((54 + 473, 54 + 10)));
        assert_eq!(
            restarted.local_budget("other", Period::Daily, 100, today),
            None,
            "a key it knew nothing of"
        );
        // Of a day after the exchange the fleet had spent nothing, and
        // this replica's ledger has all it spent that day; the month goes on.
        remembered::write(dir.path(), &remembered(yesterday)).unwrap();
        let next_day = unreachable(dir.path(), &ledger);
        let daily = next_day.local_budget("team", Period::Daily, 100, today);
        assert_eq!(daily, Some((4 + 48, 4 + 16)));
        let monthly = next_day.local_budget("team", Period::Monthly, 1_000, today);
        assert_eq!(monthly, Some((54 + 473, 54 + 10)));
        // An exchange the clock is now before is no guide.
        let back = next_day.local_budget("team", Period::Daily, 100, date!(2026 - 12 - 05));
        assert_eq!(back, None);
        // What the fleet had spent is its spend only in the exchange's
        // day and month: the budget-remaining gauges read the ledger
        // otherwise.
        assert_eq!(restarted.spent("team", Period::Daily, today), Some(20));
        assert_eq!(next_day.spent("team", Period::Daily, today), None);
        assert_eq!(next_day.spent("team", Period::Monthly, today), Some(50));
        let january = date!(2027 - 01 - 02);
        assert_eq!(next_day.spent("team", Period::Monthly, january), None);
        assert_eq!(fresh.spent("team", Period::Monthly, today), None);
    }

    #[tokio::test]
    async fn a_write_after_one_key_of_many_moved_writes_that_key_alone() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(Ledger::open(None).unwrap());
        let fleet = unreachable(dir.path(), &ledger);
        let today = date!(2026 - 12 - 07);
        let budgets: Arc<[String]> = (0..10_000).map(|i| format!("key-{i}")).collect();
        let spent: Vec<u64> = (0..10_000).collect();
        let counted = budgets.iter().map(|key| (key.clone(), [1, 2])).collect();
        {
            let mut known = lock(&fleet.known);
            let reading = known.reading(&budgets, today);
            known.take_up(
                &budgets,
                &reading,
                &reply(1, &spent, &[], 7, false),
                counted,
                |_| None,
            );
            known.day = Some(today);
        }
        fleet.remember(true).await;
        let file = || std::fs::read(remembered::path(dir.path())).unwrap();
        let whole = file();
        assert!(whole.len() > 500_000, "{} bytes", whole.len());
        lock(&fleet.known).settled_since(&[("key-5000".into(), today, 7)]);
        fleet.remember(true).await;
        let after = file();
        assert!(
            after.starts_with(&whole),
            "the file as it was: {} bytes, then {}",
            whole.len(),
            after.len()
        );
        let appended = after.len() - whole.len();
        assert!(appended < 200, "{appended} bytes appended");
        let read = remembered::read(dir.path()).unwrap();
        assert_eq!(read.keys.len(), 10_000);
        assert_eq!(read.keys["key-5000"].settled, [7, 7]);
        assert_eq!(read.keys["key-4999"].fleet, [4999, 4999, 1]);
    }

    #[test]
    fn what_a_replica_spent_while_redis_was_away_before_it_restarted_is_settled_again() {
        let ledger = Ledger::open(None).unwrap();
        let spend = |day, nano_usd| spend(&ledger, day, nano_usd);
        let (before, exchanged, after) = (
            date!(2026 - 11 - 29),
            date!(2026 - 11 - 30),
            date!(2026 - 12 - 01),
        );
        // The exchange counted 45 of its day and 125 of the month; a
        // settlement call added 5 more of the day; then Redis went away,
        // and 20 of the day before (a request that ran over midnight) and
        // 7 of the day were settled, then 9 on the next day, in a new
        // month. The day before's are the month's, and go with the
        // exchange's day.
        spend(before, 80 + 20);
        spend(exchanged, 45 + 5 + 7);
        spend(after, 9);
        let remembered = |degraded| Remembered {
            day: exchanged,
            replicas: 2,
            degraded,
            keys: BTreeMap::from([(
                "team".to_owned(),
                KeyShare {
                    fleet: [0; 3],
                    counted: [45, 125],
                    settled: [5, 5],
                },
            )]),
        };
        let unsent: Vec<(Date, u64)> = unsent_before_start(&remembered(true), &ledger, after)
            .iter()
            .map(|s| (s.day, s.nano_usd))
            .collect();
        assert_eq!(unsent, [(exchanged, 7 + 20), (after, 9)]);
        assert!(
            unsent_before_start(&remembered(false), &ledger, after).is_empty(),
            "written while Redis answered: what was spent since reached it"
        );
        let weeks_later = date!(2026 - 12 - 20);
        assert!(unsent_before_start(&remembered(true), &ledger, weeks_later).is_empty());
    }

    #[test]
    fn spend_fields_name_the_day_and_month_and_past_ones_go_stale() {
        let today = date!(2026 - 03 - 02);
        assert_eq!(period_field(Period::Daily, today), "d:2026-03-02");
        assert_eq!(period_field(Period::Monthly, today), "m:2026-03");
        let stale = stale_fields(today);
        assert_eq!(stale.first().map(String::as_str), Some("d:2026-02-28"));
        assert!(stale.contains(&"d:2026-02-22".to_owned()));
        assert!(
            !stale.contains(&"d:2026-03-01".to_owned()),
            "yesterday stays"
        );
        assert_eq!(stale.last().map(String::as_str), Some("m:2026-01"));
        assert!(!stale.contains(&"m:2026-02".to_owned()), "last month stays");
    }
}
