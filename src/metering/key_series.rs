//! Which keys have series of their own in `/metrics`: those that opt in
//! (`keys[].metrics = true`) and the `[metrics] top_keys` that spent most
//! this month; every other key's cost is counted under [`OTHER_KEYS`]. So
//! a config of 100,000 keys has at most `top_keys` + the opted-in keys
//! per family, whatever its traffic.

use foldhash::HashSet;
use time::Date;

use crate::config::Config;

/// The `key` label of keys without series of their own. No key can be
/// named so: names hold no parentheses.
pub const OTHER_KEYS: &str = "(other)";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySeries {
    /// No more keys than `top_keys`: every key has its series.
    Every,
    Only(HashSet<String>),
}

impl KeySeries {
    /// The `key` label `key`'s series are counted under.
    pub fn label<'k>(&self, key: &'k str) -> &'k str {
        match self {
            Self::Every => key,
            Self::Only(keys) if keys.contains(key) => key,
            Self::Only(_) => OTHER_KEYS,
        }
    }

    /// The keys `config` gives series: the opted-in ones, and the
    /// `top_keys` with the most `spent_this_month` (nano-USD; ties go to
    /// the name first in byte order, so every replica picks the same).
    pub fn of(config: &Config, spent_this_month: impl Fn(&str) -> u64) -> Self {
        let top = config.metrics.top_keys;
        if config.keys.len() <= top {
            return Self::Every;
        }
        let mut keys: HashSet<String> = config
            .keys
            .iter()
            .filter(|k| k.metrics)
            .map(|k| k.name.clone())
            .collect();
        let mut ranked: Vec<(u64, &str)> = config
            .keys
            .iter()
            .filter(|k| !k.metrics)
            .map(|k| (spent_this_month(&k.name), k.name.as_str()))
            .collect();
        let by_spend = |a: &(u64, &str), b: &(u64, &str)| b.0.cmp(&a.0).then(a.1.cmp(b.1));
        if top > 0 && top < ranked.len() {
            ranked.select_nth_unstable_by(top - 1, by_spend);
        }
        keys.extend(ranked.iter().take(top).map(|(_, name)| (*name).to_owned()));
        Self::Only(keys)
    }
}

/// The first day of `today`'s month: where "this month" starts.
pub fn month_start(today: Date) -> Date {
    today.replace_day(1).expect("every month has a first day")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_keys(keys: &[(&str, bool)], top_keys: usize) -> Config {
        let mut text = String::from(
            "[[backends]]\nname = \"b\"\nkind = \"simulated\"\n\
             [[models]]\nalias = \"m\"\n[[models.deployments]]\nbackend = \"b\"\nmodel = \"x\"\ncontext_window = 8192\n",
        );
        text.push_str(&format!("[metrics]\ntop_keys = {top_keys}\n"));
        for (i, (name, metrics)) in keys.iter().enumerate() {
            text.push_str(&format!(
                "[[keys]]\nname = \"{name}\"\nsha256 = \"{i:064x}\"\nmodels = [\"*\"]\nmetrics = {metrics}\n"
            ));
        }
        crate::config::parse(&text, &|_| None).expect("a valid config")
    }

    #[test]
    fn the_opted_in_and_the_biggest_spenders_have_series_and_the_rest_are_other() {
        let config = with_keys(
            &[
                ("a", false),
                ("b", true),
                ("c", false),
                ("d", false),
                ("e", false),
            ],
            2,
        );
        let spent = |key: &str| match key {
            "c" => 30,
            "d" => 30,
            "e" => 10,
            "b" => 0,
            _ => 5,
        };
        let series = KeySeries::of(&config, spent);
        for (key, label) in [
            ("a", OTHER_KEYS),
            ("b", "b"),
            ("c", "c"),
            ("d", "d"),
            ("e", OTHER_KEYS),
        ] {
            assert_eq!(series.label(key), label, "{key}");
        }
        // Ties go to the name first in byte order.
        let even = KeySeries::of(&config, |_| 7);
        assert_eq!(
            ["a", "b", "c", "d", "e"].map(|k| even.label(k)),
            ["a", "b", "c", OTHER_KEYS, OTHER_KEYS]
        );
        let none = KeySeries::of(
            &with_keys(&[("a", false), ("b", true), ("c", false)], 0),
            |_| 9,
        );
        assert_eq!(
            ["a", "b", "c"].map(|k| none.label(k)),
            [OTHER_KEYS, "b", OTHER_KEYS]
        );
    }

    #[test]
    fn up_to_top_keys_every_key_has_its_series() {
        let config = with_keys(&[("a", false), ("b", false)], 2);
        assert_eq!(KeySeries::of(&config, |_| 0), KeySeries::Every);
        assert_eq!(KeySeries::Every.label("b"), "b");
    }
}
