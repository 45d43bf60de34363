//! Alerts: the pure rules engine ([`rules`]), delivery by e-mail and webhook
//! ([`delivery`]), and [`Alerter`], which runs the engine after every poll, records each
//! alert and delivery in the store, and sends the notifications.

pub mod delivery;
pub mod rules;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::store::{DeliveryRow, Store};
use delivery::ChannelSettings;
use rules::{Condition, Engine, Observations, RuleSettings, TransitionKind};

/// The store key of [`AlertSettings`].
pub const SETTINGS_KEY: &str = "alerts";

/// Everything about alerts an operator sets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AlertSettings {
    /// Which conditions alert.
    pub rules: RuleSettings,
    /// Where notifications go.
    pub channels: ChannelSettings,
    /// The console's own URL, for links in mails.
    pub console_url: String,
}

/// Runs the rules after each poll and delivers transitions.
pub struct Alerter {
    store: Arc<Store>,
    engine: Mutex<Engine>,
    /// Notifications a channel failed to take, sent again at later polls.
    retries: Mutex<Vec<Retry>>,
    /// Internal networks webhooks may target.
    webhook_allow: delivery::WebhookAllow,
}

/// A notification to send again to one channel.
struct Retry {
    alert_id: i64,
    transition: rules::Transition,
    channel: &'static str,
    /// Failed attempts so far.
    attempts: u32,
    /// Not before (UNIX s).
    next_at: i64,
}

/// Attempts per notification and channel: with the back-off below, about thirty hours
/// of a mail server or webhook being down.
const MAX_ATTEMPTS: u32 = 18;

/// Wait before attempt `n + 1` after `n` failures: 10 s, doubling, at most 4 h.
fn backoff_s(failures: u32) -> i64 {
    (10i64 << failures.saturating_sub(1).min(20)).min(4 * 3600)
}

fn transition_name(kind: &TransitionKind) -> &'static str {
    match kind {
        TransitionKind::Start => "start",
        TransitionKind::Clear => "clear",
    }
}

impl Alerter {
    /// An alerter that knows the alerts already active in the store.
    pub fn new(store: Arc<Store>, webhook_allow: delivery::WebhookAllow) -> Self {
        let active = store.alerts(0).map(|(a, _)| a).unwrap_or_default();
        let engine = Engine::with_active(active.into_iter().map(|a| {
            let hosts = rules::hosts_of_key(&a.key, &a.host);
            (
                Condition {
                    key: a.key,
                    rule: rule_name(&a.rule),
                    host: a.host,
                    hosts,
                    vm: a.vm,
                    message: a.message,
                    hold_s: 0,
                },
                a.started_at,
            )
        }));
        Self {
            store,
            engine: Mutex::new(engine),
            retries: Mutex::new(Vec::new()),
            webhook_allow,
        }
    }

    /// One evaluation: opens and clears alerts in the store and delivers each transition.
    pub async fn evaluate(&self, obs: &Observations, now: i64) {
        let settings: AlertSettings = match self.store.setting(SETTINGS_KEY) {
            Ok(s) => s.unwrap_or_default(),
            Err(e) => {
                tracing::error!("cannot read alert settings: {e}");
                return;
            }
        };
        self.send_again(&settings, now).await;
        let present = rules::conditions(obs, &settings.rules, now);
        let transitions = self.engine.lock().await.step(
            present,
            &obs.observed(),
            i64::from(settings.rules.debounce_s),
            now,
        );
        for t in transitions {
            let c = &t.condition;
            let id = match t.kind {
                TransitionKind::Start => self.store.open_alert(
                    &c.key,
                    c.rule,
                    &c.host,
                    c.vm.as_deref(),
                    &c.message,
                    t.at,
                ),
                TransitionKind::Clear => self
                    .store
                    .clear_alert(&c.key, t.at)
                    .map(|id| id.unwrap_or(0)),
            };
            let id = match id {
                Ok(id) => id,
                Err(e) => {
                    tracing::error!("cannot record alert {}: {e}", c.key);
                    continue;
                }
            };
            tracing::info!(alert = id, key = %c.key, kind = ?t.kind, "alert transition");
            for o in delivery::deliver(
                &settings.channels,
                &t,
                id,
                &settings.console_url,
                &self.webhook_allow,
            )
            .await
            {
                self.record(id, &t, o, 0, now).await;
            }
        }
    }

    /// Records one delivery; a failed one is queued to be sent again later.
    async fn record(
        &self,
        id: i64,
        t: &rules::Transition,
        o: delivery::Outcome,
        failures_before: u32,
        now: i64,
    ) {
        if let Some(e) = &o.error {
            tracing::warn!(alert = id, channel = o.channel, "delivery failed: {e}");
            let attempts = failures_before + 1;
            if attempts < MAX_ATTEMPTS {
                self.retries.lock().await.push(Retry {
                    alert_id: id,
                    transition: t.clone(),
                    channel: o.channel,
                    attempts,
                    next_at: now + backoff_s(attempts),
                });
            }
        }
        let row = DeliveryRow {
            transition: transition_name(&t.kind).into(),
            channel: o.channel.into(),
            at: now,
            ok: o.error.is_none(),
            error: o.error,
        };
        if let Err(e) = self.store.add_delivery(id, &row) {
            tracing::error!("cannot record a delivery: {e}");
        }
    }

    /// Sends again the notifications that are due, each to the channel that failed (the
    /// channel's current settings: an operator may have fixed them meanwhile).
    async fn send_again(&self, settings: &AlertSettings, now: i64) {
        let due: Vec<Retry> = {
            let mut q = self.retries.lock().await;
            let (due, later): (Vec<Retry>, Vec<Retry>) =
                q.drain(..).partition(|r| r.next_at <= now);
            *q = later;
            due
        };
        for r in due {
            let channels = settings.channels.only(r.channel);
            let outcomes = delivery::deliver(
                &channels,
                &r.transition,
                r.alert_id,
                &settings.console_url,
                &self.webhook_allow,
            )
            .await;
            // A channel that was switched off meanwhile has nothing to send to.
            for o in outcomes.into_iter().filter(|o| o.channel == r.channel) {
                self.record(r.alert_id, &r.transition, o, r.attempts, now)
                    .await;
            }
        }
    }
}

/// The static name of a stored rule (unknown names from a newer console stay "other").
fn rule_name(s: &str) -> &'static str {
    [
        "host_unreachable",
        "health",
        "rpo",
        "resync_required",
        "initial_not_finished",
        "failover_not_reversed",
        "test_failover_age",
        "storage_free",
        "cluster_quorum",
        "node_fenced",
        "ha_vm_unplaced",
    ]
    .into_iter()
    .find(|r| *r == s)
    .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_deliveries_back_off_and_go_to_the_failed_channel_only() {
        let waits: Vec<i64> = (1..MAX_ATTEMPTS).map(backoff_s).collect();
        assert_eq!(&waits[..4], &[10, 20, 40, 80]);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*waits.last().unwrap(), 4 * 3600);
        // Together more than a day before a notification is given up.
        let total: i64 = waits.iter().sum();
        assert!((86_400..3 * 86_400).contains(&total), "{total}");
        let both = ChannelSettings {
            smtp_host: "mail".into(),
            webhook_url: "http://h/x".into(),
            ..ChannelSettings::default()
        };
        assert!(both.only("email").webhook_url.is_empty());
        assert_eq!(both.only("email").smtp_host, "mail");
        assert!(both.only("webhook").smtp_host.is_empty());
        assert_eq!(both.only("webhook").webhook_url, "http://h/x");
    }
}
