//! Credit: what a replica took from the fleet's limits and budget ahead of
//! its requests, to admit them without a round trip to Redis. A busy
//! owner's (key's or deployment's) admission asks `lua/admit.lua` for
//! about [`HORIZON`] of this replica's demand beside itself; the script
//! grants it only out of plenty (a sixteenth of what each limit has left),
//! takes its cells from the shared limits and holds its budget as one
//! reservation under a lease. Requests then draw on it here until some
//! part runs short, and the next admission that goes to Redis asks again.
//!
//! The fleet's bounds do not move: what a credit holds is taken or held in
//! Redis before any request draws on it, so every replica's admissions
//! together stay within what Redis granted. What credit costs is
//! fairness at the edge: cells or budget one replica holds unused are not
//! another's until it gives them back, at most [`IDLE`] after its last
//! draw (the cells are refunded, the reservation released).

use std::collections::HashMap;
use std::mem;
use std::time::{Duration, Instant};

use time::Date;

use crate::limits::SharedCells;

/// How much demand a credit is sized for: an owner's admissions here in
/// the last this long.
pub const HORIZON: Duration = Duration::from_millis(100);

/// Fewer admissions than this in a [`HORIZON`] ask for no credit: an owner
/// that is not busy goes to Redis for each request, as before credit.
const MIN_DEMAND: u64 = 4;

/// The most units one admission asks for.
const MAX_UNITS: u64 = 10_000;

/// A credit not drawn on for this long is given back.
pub const IDLE: Duration = Duration::from_millis(100);

/// Nor is any credit drawn on once this old: cells taken from a GCRA
/// limit are used within a second of being taken.
const MAX_AGE: Duration = Duration::from_secs(1);

/// A key's budget, as an admission asks it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Budgeted {
    /// Daily and monthly limits (nano-USD, -1: none): a credit sized
    /// under other limits (before a reload) is not drawn on.
    pub limits: [i64; 2],
    pub want: u64,
    pub day: Date,
}

/// What one admission takes: a request from `cells`, `tokens` of
/// prompt, and for a key with a budget, `budget.want`.
pub struct Terms<'a> {
    pub cells: &'a SharedCells,
    pub tokens: u64,
    /// With the key's name.
    pub budget: Option<(&'a str, Budgeted)>,
}

/// What is left of one limit's cells.
struct Cells {
    field: String,
    per_minute: u32,
    left: u64,
}

/// A credit's budget: its reservation in Redis and what of it no request
/// holds.
struct Held {
    key: String,
    id: String,
    limits: [i64; 2],
    day: Date,
    left: u64,
}

struct Credit {
    requests: Option<Cells>,
    tokens: Option<Cells>,
    budget: Option<Held>,
    born: Instant,
    drawn: Instant,
    /// Requests drawn on its budget that have not settled: it is not
    /// released before they have.
    in_flight: u32,
}

fn same_cells(mine: &Option<Cells>, theirs: &Option<(String, u32)>) -> bool {
    match (mine, theirs) {
        (None, None) => true,
        (Some(mine), Some((field, _))) => mine.field == *field,
        _ => false,
    }
}

impl Credit {
    /// Whether it was granted for requests like these, and may still be
    /// drawn on.
    fn serves(&self, terms: &Terms<'_>, now: Instant) -> bool {
        now.duration_since(self.born) < MAX_AGE
            && same_cells(&self.requests, &terms.cells.requests)
            && same_cells(&self.tokens, &terms.cells.tokens)
            && match (&self.budget, &terms.budget) {
                (None, None) => true,
                (Some(held), Some((_, budget))) => {
                    held.limits == budget.limits && held.day == budget.day
                }
                _ => false,
            }
    }

    /// Takes one request of `terms`, if every part of it is left.
    fn draw(&mut self, terms: &Terms<'_>, now: Instant) -> Option<Option<(String, u64)>> {
        let want = terms.budget.map_or(0, |(_, b)| b.want);
        let has = |cells: &Option<Cells>, n: u64| cells.as_ref().is_none_or(|c| c.left >= n);
        if !has(&self.requests, 1)
            || !has(&self.tokens, terms.tokens)
            || self.budget.as_ref().is_some_and(|h| h.left < want)
        {
            return None;
        }
        if let Some(c) = &mut self.requests {
            c.left -= 1;
        }
        if let Some(c) = &mut self.tokens {
            c.left -= terms.tokens;
        }
        self.drawn = now;
        Some(self.budget.as_mut().map(|held| {
            held.left -= want;
            self.in_flight += 1;
            (held.id.clone(), want)
        }))
    }

    fn idle(&self, now: Instant) -> bool {
        now.duration_since(self.drawn) >= IDLE || now.duration_since(self.born) >= MAX_AGE
    }
}

/// How many admissions an owner had here lately.
struct Demand {
    since: Instant,
    count: u64,
    /// In the [`HORIZON`] before `since`.
    last: u64,
}

impl Demand {
    fn count(&mut self, now: Instant) -> u64 {
        let elapsed = now.duration_since(self.since);
        if elapsed >= HORIZON {
            self.last = if elapsed < 2 * HORIZON { self.count } else { 0 };
            self.count = 0;
            self.since = now;
        }
        self.count += 1;
        self.count.max(self.last)
    }
}

struct Home {
    demand: Demand,
    credit: Option<Credit>,
    /// An admission asking for credit is out: no other asks, and the
    /// credit stays until it answers (Redis adds to its reservation).
    asking: bool,
}

/// What an admission does, told by [`Credits::draw`].
pub enum Draw {
    /// Admitted from credit, with its budget reservation (the credit's
    /// id, and what the request holds of it).
    Taken(Option<(String, u64)>),
    /// To Redis, asking for this many units of credit, the budget's held
    /// under this id.
    Ask { units: u64, id: String },
}

/// A credit given back: its budget reservation to release, and the cells
/// it did not use, to refund.
pub struct Released {
    pub home: String,
    /// The key, and the reservation's id.
    pub reservation: Option<(String, String)>,
    pub refunds: Vec<(String, u32, u64)>,
}

/// Every owner's credit on this replica.
#[derive(Default)]
pub struct Credits {
    homes: HashMap<String, Home>,
    /// Credits no longer drawn on whose requests have not all settled.
    retired: Vec<(String, Credit)>,
    /// The owner of each credit that holds budget, by its reservation's
    /// id: a settlement tells a credit's draw from a request's own
    /// reservation without building the owner's name.
    owners: HashMap<String, String>,
}

impl Credits {
    /// Admits a request from its owner's credit, or says what to ask Redis
    /// for; `fresh` names a new credit's reservation.
    pub fn draw(
        &mut self,
        terms: &Terms<'_>,
        now: Instant,
        fresh: impl FnOnce() -> String,
    ) -> Draw {
        let home = match self.homes.get_mut(&terms.cells.home) {
            Some(home) => home,
            None => self.homes.entry(terms.cells.home.clone()).or_insert(Home {
                demand: Demand {
                    since: now,
                    count: 0,
                    last: 0,
                },
                credit: None,
                asking: false,
            }),
        };
        let demand = home.demand.count(now);
        if let Some(credit) = &mut home.credit
            && credit.serves(terms, now)
            && let Some(reservation) = credit.draw(terms, now)
        {
            return Draw::Taken(reservation);
        }
        if home.asking || demand < MIN_DEMAND {
            return Draw::Ask {
                units: 0,
                id: String::new(),
            };
        }
        // A credit for other terms (or too old) draws no more.
        if let Some(credit) = home.credit.take_if(|c| !c.serves(terms, now)) {
            self.retired.push((terms.cells.home.clone(), credit));
        }
        home.asking = true;
        let id = match (&home.credit, terms.budget) {
            (
                Some(Credit {
                    budget: Some(held), ..
                }),
                _,
            ) => held.id.clone(),
            (_, Some(_)) => fresh(),
            (_, None) => String::new(),
        };
        Draw::Ask {
            units: demand.min(MAX_UNITS),
            id,
        }
    }

    /// An ask for `home`'s credit that will not be answered: the request
    /// that asked was cancelled (its client left) while it waited. The
    /// next admission may ask.
    pub fn unasked(&mut self, home: &str) {
        if let Some(home) = self.homes.get_mut(home) {
            home.asking = false;
        }
    }

    /// Redis granted `units` of credit (0 or none: it did not answer)
    /// for requests of `terms`, the budget's under `id`. Returns the id
    /// when it names a new reservation, which the replica renews from now
    /// on.
    pub fn granted(
        &mut self,
        terms: &Terms<'_>,
        units: u64,
        id: String,
        now: Instant,
    ) -> Option<String> {
        let home = self.homes.get_mut(&terms.cells.home)?;
        home.asking = false;
        if units == 0 {
            return None;
        }
        let credit = home.credit.get_or_insert(Credit {
            requests: None,
            tokens: None,
            budget: None,
            born: now,
            drawn: now,
            in_flight: 0,
        });
        let add = |cells: &mut Option<Cells>, of: &Option<(String, u32)>, each: u64| {
            if let Some((field, per_minute)) = of {
                let cells = cells.get_or_insert_with(|| Cells {
                    field: field.clone(),
                    per_minute: *per_minute,
                    left: 0,
                });
                cells.left = cells.left.saturating_add(units.saturating_mul(each));
            }
        };
        add(&mut credit.requests, &terms.cells.requests, 1);
        add(&mut credit.tokens, &terms.cells.tokens, terms.tokens);
        credit.drawn = now;
        let (key, budget) = terms.budget?;
        let extra = units.saturating_mul(budget.want);
        match &mut credit.budget {
            Some(held) => {
                held.left = held.left.saturating_add(extra);
                None
            }
            None => {
                credit.budget = Some(Held {
                    key: key.to_owned(),
                    id: id.clone(),
                    limits: budget.limits,
                    day: budget.day,
                    left: extra,
                });
                self.owners.insert(id.clone(), terms.cells.home.clone());
                Some(id)
            }
        }
    }

    /// A request drawn on credit `id` settled: it held `held` and cost
    /// `cost`, and what it did not use goes back to the credit. Whether
    /// `id` is a credit's.
    pub fn settled(&mut self, id: &str, held: u64, cost: u64) -> bool {
        let Some(home) = self.owners.get(id) else {
            return false;
        };
        let credit = self
            .homes
            .get_mut(home)
            .and_then(|h| h.credit.as_mut())
            .filter(|c| c.budget.as_ref().is_some_and(|b| b.id == id))
            .or_else(|| {
                self.retired
                    .iter_mut()
                    .map(|(_, c)| c)
                    .find(|c| c.budget.as_ref().is_some_and(|b| b.id == id))
            });
        let Some(credit) = credit else {
            return false;
        };
        credit.in_flight = credit.in_flight.saturating_sub(1);
        if let Some(budget) = &mut credit.budget {
            budget.left = budget.left.saturating_add(held).saturating_sub(cost);
        }
        true
    }

    /// Gives back credit that is idle, too old, of another day, or (while
    /// Redis is away: `all`) any, once no request holds part of it; and
    /// forgets owners not busy for a while.
    pub fn release(&mut self, now: Instant, today: Date, all: bool) -> Vec<Released> {
        for (name, home) in &mut self.homes {
            if !home.asking
                && let Some(credit) = home.credit.take_if(|c| {
                    all || c.idle(now) || c.budget.as_ref().is_some_and(|b| b.day != today)
                })
            {
                self.retired.push((name.clone(), credit));
            }
        }
        self.homes.retain(|_, home| {
            home.credit.is_some()
                || home.asking
                || now.duration_since(home.demand.since) < 10 * HORIZON
        });
        let (done, waiting) = mem::take(&mut self.retired)
            .into_iter()
            .partition(|(_, c)| c.in_flight == 0);
        self.retired = waiting;
        for (_, credit) in &done {
            if let Some(held) = &credit.budget {
                self.owners.remove(&held.id);
            }
        }
        done.into_iter()
            .map(|(home, credit)| Released {
                home,
                reservation: credit.budget.map(|b| (b.key, b.id)),
                refunds: [credit.requests, credit.tokens]
                    .into_iter()
                    .flatten()
                    .filter(|c| c.left > 0)
                    .map(|c| (c.field, c.per_minute, c.left))
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use time::macros::date;

    use super::*;

    fn cells() -> SharedCells {
        SharedCells {
            home: "t:key:a".into(),
            requests: Some(("rpm:600".into(), 600)),
            tokens: Some(("tpm:9000".into(), 9000)),
        }
    }

    const DAY: Date = date!(2026 - 12 - 05);

    fn budgeted(want: u64) -> Budgeted {
        Budgeted {
            limits: [1_000_000, -1],
            want,
            day: DAY,
        }
    }

    /// Asks until demand earns a credit ask, as a busy owner would.
    fn ask(credits: &mut Credits, terms: &Terms<'_>, now: Instant) -> (u64, String) {
        for _ in 0..MIN_DEMAND {
            if let Draw::Ask { units, id } = credits.draw(terms, now, || "c1".into())
                && units > 0
            {
                return (units, id);
            }
        }
        panic!("no credit asked for");
    }

    #[test]
    fn an_owner_that_is_not_busy_asks_for_no_credit() {
        let (mut credits, cells, now) = (Credits::default(), cells(), Instant::now());
        let terms = Terms {
            cells: &cells,
            tokens: 10,
            budget: None,
        };
        for _ in 1..MIN_DEMAND {
            assert!(matches!(
                credits.draw(&terms, now, String::new),
                Draw::Ask { units: 0, .. }
            ));
        }
    }

    #[test]
    fn draws_take_every_part_until_one_runs_short() {
        let (mut credits, cells, now) = (Credits::default(), cells(), Instant::now());
        let terms = Terms {
            cells: &cells,
            tokens: 10,
            budget: Some(("a", budgeted(100))),
        };
        let (units, id) = ask(&mut credits, &terms, now);
        assert_eq!((units, id.as_str()), (MIN_DEMAND, "c1"));
        // While the ask is out, others go to Redis without asking.
        assert!(matches!(
            credits.draw(&terms, now, String::new),
            Draw::Ask { units: 0, .. }
        ));
        assert_eq!(credits.granted(&terms, 2, id, now).as_deref(), Some("c1"));
        for _ in 0..2 {
            match credits.draw(&terms, now, String::new) {
                Draw::Taken(Some((id, held))) => assert_eq!((id.as_str(), held), ("c1", 100)),
                _ => panic!("not drawn"),
            }
        }
        // Two requests' worth: the third goes to Redis, adding to the
        // same reservation.
        match credits.draw(&terms, now, || "other".into()) {
            Draw::Ask { units, id } => assert_eq!((units > 0, id.as_str()), (true, "c1")),
            Draw::Taken(_) => panic!("drew past the credit"),
        }
        assert_eq!(credits.granted(&terms, 0, String::new(), now), None);
        // Held while its requests run, whatever its age.
        let later = now + IDLE;
        assert!(credits.release(later, DAY, false).is_empty());
        assert!(credits.settled("c1", 100, 40));
        assert!(credits.settled("c1", 100, 100));
        let released = credits.release(later, DAY, false);
        assert_eq!(released.len(), 1);
        assert_eq!(
            released[0].reservation,
            Some(("a".to_owned(), "c1".to_owned()))
        );
        assert!(released[0].refunds.is_empty(), "every cell was used");
        assert!(
            !credits.settled("c1", 100, 0),
            "a released credit's id is a request's own reservation again"
        );
        assert!(
            !credits.settled("r7", 100, 0),
            "nor is a request's id a credit's"
        );
    }

    #[test]
    fn unused_cells_are_refunded_and_other_terms_draw_nothing() {
        let (mut credits, now) = (Credits::default(), Instant::now());
        let quota = cells();
        let terms = Terms {
            cells: &quota,
            tokens: 10,
            budget: None,
        };
        let (_, id) = ask(&mut credits, &terms, now);
        assert_eq!(id, "", "no budget, no reservation");
        assert_eq!(credits.granted(&terms, 5, id, now), None);
        assert!(matches!(
            credits.draw(&terms, now, String::new),
            Draw::Taken(None)
        ));
        // A prompt larger than the tokens left goes to Redis.
        let big = Terms {
            cells: &quota,
            tokens: 45,
            budget: None,
        };
        assert!(matches!(
            credits.draw(&big, now, String::new),
            Draw::Ask { .. }
        ));
        assert_eq!(credits.granted(&big, 0, String::new(), now), None);
        assert!(credits.release(now, DAY, false).is_empty(), "not idle");
        // So does a changed quota.
        let requoted = SharedCells {
            requests: Some(("rpm:601".into(), 601)),
            ..cells()
        };
        let other = Terms {
            cells: &requoted,
            tokens: 10,
            budget: None,
        };
        assert!(matches!(
            credits.draw(&other, now, String::new),
            Draw::Ask { .. }
        ));
        // It retired the credit of the old quota, given back at once.
        let released = credits.release(now, DAY, false);
        assert_eq!(released.len(), 1);
        let mut refunds = released[0].refunds.clone();
        refunds.sort();
        assert_eq!(
            refunds,
            vec![("rpm:600".into(), 600, 4), ("tpm:9000".into(), 9000, 40)]
        );
    }

    #[test]
    fn a_credit_of_another_day_or_too_old_is_not_drawn_on() {
        let (mut credits, cells, now) = (Credits::default(), cells(), Instant::now());
        let terms = Terms {
            cells: &cells,
            tokens: 1,
            budget: Some(("a", budgeted(10))),
        };
        let (_, id) = ask(&mut credits, &terms, now);
        credits.granted(&terms, 100, id, now);
        let tomorrow = Terms {
            budget: Some((
                "a",
                Budgeted {
                    day: DAY.next_day().unwrap(),
                    ..budgeted(10)
                },
            )),
            ..terms
        };
        assert!(matches!(
            credits.draw(&tomorrow, now, String::new),
            Draw::Ask { .. }
        ));
        // Nor is a credit granted under limits a reload has since lowered.
        credits.granted(&tomorrow, 0, String::new(), now);
        let (_, id) = ask(&mut credits, &terms, now);
        credits.granted(&terms, 100, id, now);
        let lowered = Terms {
            budget: Some((
                "a",
                Budgeted {
                    limits: [500_000, -1],
                    ..budgeted(10)
                },
            )),
            ..terms
        };
        assert!(matches!(
            credits.draw(&lowered, now, String::new),
            Draw::Ask { .. }
        ));
        let old = now + MAX_AGE;
        let _ = credits.release(old - IDLE / 2, DAY, false);
        assert!(!matches!(
            credits.draw(&terms, old, || "c2".into()),
            Draw::Taken(_)
        ));
    }
}
